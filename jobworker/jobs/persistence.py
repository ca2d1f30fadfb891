"""
Job records kept: saved on every change, again and again while the state
directory is full, and turned back into jobs when the server starts.

Twisted glue over L{jobworker.jobs.store.JobStore} (the files); the reactor
is passed in.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

from jobworker.jobs.job import Job, JobHost
from jobworker.jobs.spec import JobSpec
from jobworker.jobs.store import JobStore, LoadedRecord
from jobworker.logs import Logger
from jobworker.output.log import MemorySpool, OutputLog
from jobworker.output.spool import FileSpool
from jobworker.protocol.messages import JobStatus

__all__ = ["SAVE_RETRY_S", "RecordSaver", "restored_job"]

log = Logger()

# While the state directory is full: how often unsaved job records are
# saved again.  A try costs one small write (a record of a few KiB).
SAVE_RETRY_S = 1.0


class RecordSaver:
    """
    Saves job records; one that cannot be saved (a full disk) is tried
    again every L{SAVE_RETRY_S} seconds, so that a final state does not read
    C{lost} after a restart.

    @param lookup: the job of an id, or None once it is removed.
    """

    def __init__(self, reactor: Any, store: JobStore, lookup: Callable[[uuid.UUID], Job | None]) -> None:
        self._reactor = reactor
        self._store = store
        self._lookup = lookup
        self._unsaved: set[uuid.UUID] = set()
        self._retry: Any = None

    def save(self, job: Job) -> None:
        """
        Replace the job's record (on a failure: log it, retry later).
        """
        self._unsaved.discard(job.job_id)
        try:
            self._store.save(job)
        except OSError as exc:
            log.error(
                "could not save job {job_id}: {error}; retrying every {interval} s",
                job_id=job.job_id,
                error=exc.strerror or exc,
                interval=SAVE_RETRY_S,
            )
            self._unsaved.add(job.job_id)
            if self._retry is None or not self._retry.active():
                self._retry = self._reactor.callLater(SAVE_RETRY_S, self.save_unsaved)

    def save_unsaved(self, final: bool = False) -> None:
        """
        Save again the records that could not be saved; logged once per job
        when it succeeds (and, at shutdown, when it still fails).
        """
        self._retry = None
        for job_id in sorted(self._unsaved):
            job = self._lookup(job_id)
            if job is None:
                self._unsaved.discard(job_id)
                continue
            try:
                self._store.save(job)
            except OSError as exc:
                if final:
                    log.error(
                        "job {job_id}: its record could not be saved before shutdown ({error}); "
                        "it may read as lost after a restart",
                        job_id=job_id,
                        error=exc.strerror or exc,
                    )
                continue
            self._unsaved.discard(job_id)
            log.info("job {job_id}: its record is saved again", job_id=job_id)
        if self._unsaved and not final:
            self._retry = self._reactor.callLater(SAVE_RETRY_S, self.save_unsaved)
        if final and self._retry is not None and self._retry.active():
            self._retry.cancel()


def restored_job(
    host: JobHost, store: JobStore, record: LoadedRecord, ring_size: int, *, retention: int | None = None
) -> Job:
    """
    The job a record tells of, with its output spool (a spool that cannot
    be read is a gap, logged); final as the record says, unless
    C{retention} is given: then the job is one to take back from its
    supervisor (L{Job.take_back}), and its spool is reopened for more
    output, after its last whole record.
    """
    status: JobStatus = record.status
    spec = JobSpec(
        owner=status.owner,
        argv=tuple(status.argv),
        env=tuple(record.env),
        workdir=status.workdir,
        network=status.network,
        user=status.user,
        limits=status.limits,
        cgroup_limits=status.limits,
        name=status.name,
        labels=status.labels,
    )
    path = store.spool_path(status.job_id)
    times_path = store.times_path(status.job_id)
    spool: FileSpool | None

    def open_times() -> FileSpool | None:
        try:
            return FileSpool(times_path, create=False)
        except OSError:
            return None  # no times file: a spool written before times were recorded

    def times_damaged(damage: str) -> None:
        log.error("job {job_id}: {damage}; later output has no times", job_id=status.job_id, damage=damage)

    # A job to take back writes on into its times file: read it now.  A
    # finished job's is read when its times are first asked for, if ever.
    times = open_times() if retention is not None else None
    found_times = times if retention is not None else open_times
    try:
        spool = FileSpool(path, create=False)
        output = OutputLog.from_spool(
            spool, ring_size=ring_size, expected_end=status.output_bytes, times=found_times, on_times_damage=times_damaged
        )
    except OSError as exc:
        spool = None
        output = OutputLog.from_spool(MemorySpool(), expected_end=status.output_bytes)
        if status.output_bytes:
            output.damage = f"output spool {path} cannot be read: {exc.strerror or exc}"
    if output.damage is not None:
        log.error("job {job_id}: {damage}; readers get a gap there", job_id=status.job_id, damage=output.damage)
    if retention is not None:
        spool, times = _reopened(store, status.job_id, output, spool, times, retention)
    job = Job(host, status.job_id, spec, output, spool)
    job.times = times
    if retention is None:
        job.restore(status)
    else:
        assert record.supervisor is not None
        job.take_back(status, record.supervisor)
    return job


def _reopened(
    store: JobStore,
    job_id: uuid.UUID,
    output: OutputLog,
    spool: FileSpool | None,
    times: FileSpool | None,
    retention: int,
) -> tuple[FileSpool | None, FileSpool | None]:
    """
    Open a running job's spool and times file for more output, the spool
    cut back to its last whole record (a server killed mid-write leaves a
    torn one).  A spool that cannot be opened leaves the job's output in
    memory only (logged).
    """
    path = store.spool_path(job_id)
    if times is not None:
        times.seal()
    try:
        if spool is not None:
            spool.seal()
            os.truncate(path, output.spool_bytes)
        writable: FileSpool | None = FileSpool(path)
    except OSError as exc:
        log.error("job {job_id}: cannot reopen its output spool {path}: {error}", job_id=job_id, path=path, error=exc)
        writable = None
    try:
        new_times: FileSpool | None = FileSpool(store.times_path(job_id))
    except OSError:
        new_times = None
    output.continue_on(writable if writable is not None else MemorySpool(), retention, new_times)
    return writable, new_times
