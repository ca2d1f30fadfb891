"""
The job manager: every job of this server, started (admitted, given a uid,
a spool, a cgroup and a helper), found with authorization, stopped, saved,
and all stopped when the service stops.

Twisted glue over the pure core (admission, the life cycle) and the host
adapters (cgroups, uids, the job store).  The reactor is passed in, never
imported, so the tests drive timers with a fake clock.  Host operations that
may block (waiting for a cgroup to drain before removing it) run in the
reactor's thread pool.

Why it is one module of over 400 lines: it is one class, L{JobManager},
the glue whose start, stop, removal and shutdown paths share its job
table and admission state; what stands alone is already elsewhere
(L{jobworker.jobs.report}, L{jobworker.jobs.timers}, L{jobworker.jobs.job}).
"""

from __future__ import annotations

import errno
import gc
import os
import pwd
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.python.failure import Failure

from jobworker.audit import log_excerpt, log_value
from jobworker.errors import ErrorCode, JobworkerError, RequestError
from jobworker.host import contract
from jobworker.host.cgroups import job_directory_name
from jobworker.host.isolate import compiled_helper
from jobworker.host.uids import UidAllocator, UidLocks, host_has_id, host_live_uids
from jobworker.jobs.admission import AdmissionConfig, admit, check_verdict
from jobworker.jobs.config import JobManagerConfig
from jobworker.jobs.helper import ISOLATE_SCRIPT, HelperSettings, helper_config
from jobworker.jobs.job import Job
from jobworker.jobs.pacing import TurnQueue
from jobworker.jobs.persistence import RecordSaver, restored_job
from jobworker.jobs.report import now_us
from jobworker.jobs.spec import JobSpec
from jobworker.jobs.store import JobStore, LoadedRecord, StateDirLocked, StateFormatTooNew, discard
from jobworker.jobs.supervisor import Zygote, read_end_record
from jobworker.logs import Logger
from jobworker.output.log import OutputLog
from jobworker.output.spool import FileSpool
from jobworker.policy import Identity, Operation, Verdict, authorize, may_see
from jobworker.protocol.listing import ListIndex
from jobworker.protocol.messages import JobState, StartRequest

__all__ = ["ISOLATE_SCRIPT", "Job", "JobManager", "JobManagerConfig"]

log = Logger()

# Seconds the server's shutdown waits for the zygote to end.
ZYGOTE_END_WAIT_S = 2.0
# The most job ends (each a decision of its state, or the announcement
# of it) done in one turn of the reactor: ~1 ms each, so another client's
# request waits a few milliseconds for them at most.
ENDS_PER_TURN = 4

# Errors that mean the server ran out of something (not that the request was
# wrong): answered as OUT_OF_RESOURCES, with the cause named.
_RESOURCE_ERRNOS = {
    errno.ENOSPC: "the server's state directory is full",
    errno.EDQUOT: "the server's disk quota is exhausted",
    errno.EMFILE: "the server has no file descriptors left",
    errno.ENFILE: "the host has no file descriptors left",
    errno.ENOMEM: "the server is out of memory",
    errno.EAGAIN: "the server cannot create more processes",
}


@contextmanager
def _collector_paused() -> Iterator[None]:
    """
    The cyclic garbage collector off for the block (back on after it, if
    it was on).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class JobManager(Service):
    """
    All jobs of this server: starting, finding (with authorization), stopping,
    and stopping them all when the service stops.
    """

    def __init__(self, reactor: Any, config: JobManagerConfig, *, cgroup_driver: Any = None) -> None:
        self.reactor = reactor
        self.config = config
        self.cgroups = cgroup_driver
        self.jobs: dict[uuid.UUID, Job] = {}
        # The jobs of self.jobs not yet ended (L{job_ended}), so that a start
        # or an end costs the same with 10,000 finished jobs kept as with
        # none: they are all that admission counts and pruning spares.
        self._unended: dict[uuid.UUID, Job] = {}
        # How many of them each owner has: admission counts an owner's
        # running jobs one by one only when these reach the limit.
        self._unended_of: Counter[str] = Counter()
        # Told of every job removed (see on_removed), in subscription order.
        self._removal_observers: list[Callable[[Job], None]] = []
        self.store = JobStore(config.state_dir)
        self._shutting_down = False
        self._cleanups: set[defer.Deferred[None]] = set()
        self._turns = TurnQueue(reactor, ENDS_PER_TURN)
        self._saver = RecordSaver(reactor, self.store, self.jobs.get)
        # The helper's source until start-up compiles it (see startService).
        self.helper_path = ISOLATE_SCRIPT
        self.zygote: Zygote | None = None
        self._priming = False  # a prime_moves() runs (see _prime_moves)
        self.uids: UidAllocator | None = None
        self._uid_locks: UidLocks | None = None
        self._settings: HelperSettings | None = None
        # Bound over every hidden file in a job (see isolate.hide_paths).
        self.inaccessible_file = os.path.join(os.path.realpath(config.state_dir), "inaccessible")

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        try:
            self.store.open()
        except (StateDirLocked, StateFormatTooNew) as exc:
            # Refusing to start beats two servers killing each other's jobs.
            log.critical("{error}", error=str(exc))
            self.reactor.callWhenRunning(self.reactor.stop)
            raise SystemExit(str(exc)) from None
        # Python recompiles a script named on its command line on every run;
        # running the helper's bytecode saves each job ~5 ms and ~1.3 MiB.
        # Absolute: helpers start in /.
        self.helper_path = os.path.abspath(compiled_helper(self.store.state_dir))
        if self.config.isolate and self.config.zygote:
            self.zygote = Zygote(self.reactor, self.helper_path)
        # Thousands of jobs built from their records are millions of objects
        # that all live on: the collector's passes over them while they are
        # made free nothing (they were a third of a start-up with 10,000
        # records), so it is off meanwhile; then they are frozen, out of
        # every later pass, which would otherwise go over them all once
        # more.  (A job of these removed later is freed by its reference
        # counts; what of it is cyclic stays: once, at most these jobs.)
        with _collector_paused():
            records = list(self.store.load())
            supervised, refused = self._supervised(records)
            if self.cgroups is not None:
                self.cgroups.prepare()
                keep = frozenset(job_directory_name(str(job_id)) for job_id in supervised | refused)
                removed = self.cgroups.cleanup_stale(keep=keep) if keep else self.cgroups.cleanup_stale()
                for name in removed:
                    log.warn("removed cgroup {name} left by an earlier server", name=name)
            taken_back = []
            for record in records:
                job_id = record.status.job_id
                if job_id in refused:
                    continue
                if job_id in supervised:
                    job = restored_job(self, self.store, record, self.config.ring_size, retention=self.config.retention)
                    self._add(job)
                    taken_back.append(job)
                    continue
                job = restored_job(self, self.store, record, self.config.ring_size)
                if record.problems:
                    # Nothing in a damaged record is trusted to say how the job
                    # ended.  The file stays as it is, for an operator to look
                    # at, until the job is removed.
                    job.state = JobState.LOST
                    job.error = "damaged job record: " + "; ".join(record.problems)
                elif not job.is_final:
                    job.state = JobState.LOST
                    job.ended_at = now_us()
                    job.error = "the server stopped while the job was running"
                    self.job_changed(job)
                    log.warn("job {job_id} was running when the server died: lost", job_id=job.job_id)
                self._add(job)
            self._prune()
        gc.freeze()
        if self.config.job_user is None and self.config.job_uids is not None:
            try:
                self._uid_locks = UidLocks(self.config.uid_lock_dir)
            except OSError as exc:
                raise SystemExit(f"jobworker: cannot make {self.config.uid_lock_dir}: {exc}") from None
            # The uids of the jobs taken back stay theirs.
            for job in taken_back:
                if job.uid in self.config.job_uids:
                    try:
                        self._uid_locks.claim(job.uid)
                    except OSError as exc:
                        log.warn("job {job_id}: cannot claim its uid {uid} again: {error}", job_id=job.job_id, uid=job.uid, error=exc)
            swept = self._uid_locks.sweep()
            if swept:
                log.info(
                    "removed {count} uid claims left in {directory} by servers that died",
                    count=len(swept),
                    directory=self.config.uid_lock_dir,
                )
            self.uids = UidAllocator(
                self.config.job_uids,
                is_taken=host_has_id,
                live_uids=host_live_uids,
                claim=self._uid_locks.claim,
                unclaim=self._uid_locks.unclaim,
            )
            for job in taken_back:
                if job.uid in self.config.job_uids:
                    self.uids.adopt(job.uid, str(job.job_id))
            # After the stale cgroups' processes were killed: what still
            # runs as a job uid is not ours to reuse yet.
            lingering = self.uids.retire_lingering()
            if lingering:
                log.warn(
                    "{count} job uids have processes from before this server started; they stay unused until those end: {uids}",
                    count=len(lingering),
                    uids=sorted(lingering)[:20],
                )
        if self.config.isolate:
            self._make_inaccessible_file()
        for job in taken_back:
            self._take_back(job)

    def _supervised(self, records: list[LoadedRecord]) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
        """
        The running jobs of the records that have a supervisor: those to
        take back, and those of a newer format, which this server leaves
        alone (running, their files and cgroup untouched), as Docker does.
        """
        supervised: set[uuid.UUID] = set()
        refused: set[uuid.UUID] = set()
        for record in records:
            supervisor = record.supervisor
            if supervisor is None or record.problems or record.status.state.is_final:
                continue
            job_id = record.status.job_id
            if supervisor["format"] > contract.SUPERVISOR_FORMAT:
                log.error(
                    "job {job_id}: its supervisor uses state format {found}, this server speaks {ours}; "
                    "left running and untouched (a newer jobworker can take it back)",
                    job_id=job_id,
                    found=supervisor["format"],
                    ours=contract.SUPERVISOR_FORMAT,
                )
                refused.add(job_id)
            else:
                supervised.add(job_id)
        return supervised, refused

    def _take_back(self, job: Job) -> None:
        """
        Take back a job of an earlier server from its supervisor.
        """
        if self.cgroups is not None:
            job.cgroup = self.cgroups.attach(str(job.job_id))
        self.connect_supervisor(job)

    def connect_supervisor(self, job: Job) -> None:
        """
        Connect to the job's supervisor on its socket (JobHost).  If none
        answers, the job ended while no server was connected (its end
        record says how), or its supervisor died with it: lost.
        """
        from twisted.internet.endpoints import UNIXClientEndpoint

        from jobworker.jobs.job import protocol_factory

        link = job.new_link()
        endpoint = UNIXClientEndpoint(self.reactor, self.store.socket_path(job.job_id), timeout=5)
        connecting = endpoint.connect(protocol_factory(link))

        def absent(failure: Any) -> None:
            record = read_end_record(self.store.end_path(job.job_id))
            if record is not None:
                log.info("job {job_id} ended while no server was connected; its end is taken from its supervisor", job_id=job.job_id)
                job.supervisor_ended_unseen(record)
                return
            log.warn(
                "job {job_id}: its supervisor is gone ({error}) and left no end record: lost",
                job_id=job.job_id,
                error=failure.getErrorMessage(),
            )
            job.supervisor_gone(None, final=True)

        def connected(_: Any) -> None:
            log.info("job {job_id}: connected to its supervisor", job_id=job.job_id)

        connecting.addCallbacks(connected, absent)
        connecting.addErrback(lambda f: log.failure("job {job_id}: take-back failed", f, job_id=job.job_id))

    # -- the supervisor's files (JobHost) -------------------------------------------------

    def socket_path(self, job_id: uuid.UUID) -> str:
        return self.store.socket_path(job_id)

    def backlog_path(self, job_id: uuid.UUID) -> str:
        return self.store.backlog_path(job_id)

    def end_path(self, job_id: uuid.UUID) -> str:
        return self.store.end_path(job_id)

    def supervisor_files_done(self, job_id: uuid.UUID) -> None:
        self.store.forget_supervisor_once_saved(job_id)

    def _make_inaccessible_file(self) -> None:
        """
        An empty root-owned file of mode 000, bound over hidden files.
        """
        try:
            fd = os.open(self.inaccessible_file, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0)
            try:
                os.ftruncate(fd, 0)
                os.fchmod(fd, 0)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SystemExit(f"jobworker: cannot make {self.inaccessible_file}: {exc}") from None

    def stopService(self) -> defer.Deferred[None]:
        """
        Stop every job (SIGTERM, then SIGKILL after the default grace) and
        wait until each has ended and its cgroup is gone.  With
        C{live_restore}, leave every running job running instead (each is
        detached from this server, its supervisor goes on) and wait for none.
        """
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted's Service is unannotated
        self._shutting_down = True
        # Jobs whose end is under way settle first: the reactor may not
        # turn much longer, and a job left running is one to detach.
        self._turns.flush()
        running = [job for job in self.jobs.values() if not job.is_final]
        ends = []
        if self.config.live_restore:
            for job in running:
                job.detach()
            log.info("leaving {count} running jobs running for the next server (live restore)", count=len(running))
        else:
            for job in running:
                ends.append(job.when_ended())
                job.stop("shutdown", self.config.default_grace_s)
            log.info("stopping {count} running jobs", count=len(running))
        left = {job.uid for job in running} if self.config.live_restore else set()
        every_end: defer.Deferred[Any] = defer.DeferredList(ends, consumeErrors=True)
        every_end.addCallback(lambda _: defer.DeferredList(list(self._cleanups), consumeErrors=True))
        if not left:
            # (The base holds the cgroups of the jobs left running.)
            every_end.addCallback(lambda _: self._release_cgroups())
        every_end.addCallback(lambda _: self._uid_locks.close(leave=left) if self._uid_locks is not None else None)
        every_end.addCallback(lambda _: self._saver.save_unsaved(final=True))
        every_end.addCallback(lambda _: self.store.close())
        every_end.addCallback(lambda _: self._close_zygote())
        return every_end

    def _close_zygote(self) -> defer.Deferred[None] | None:
        if self.zygote is None:
            return None
        # Bounded: a zygote that does not end at its socket's EOF is not
        # worth a hung shutdown (it dies with the server anyway).
        ended = self.zygote.close().addTimeout(ZYGOTE_END_WAIT_S, self.reactor)
        ended.addErrback(lambda failure: failure.trap(defer.TimeoutError))
        return ended

    def _release_cgroups(self) -> None:
        if self.cgroups is None:
            return
        try:
            self.cgroups.release()
        except Exception as exc:
            log.warn("could not release the cgroup base: {error}", error=exc)

    # -- requests --------------------------------------------------------------

    def start(self, identity: Identity, request: StartRequest) -> defer.Deferred[Job]:
        """
        Start a job for C{identity}.  The Deferred fires when the command is
        running, or fails with a L{RequestError} saying why it could not.
        """
        if self._shutting_down:
            raise RequestError("the server is shutting down", ErrorCode.SHUTTING_DOWN)
        admission = self.admission_config()
        spec = admit(identity, request, admission, running=self._running_of(identity.name, admission.max_jobs_per_identity))
        self._check_name_free(spec)
        job_id = uuid.uuid4()
        # First of all that the job holds, so that running out makes nothing.
        dynamic_uid = self._allocate_uid(job_id, spec.user)
        try:
            spool = FileSpool(self.store.spool_path(job_id))
        except OSError as exc:
            self._forget_uid(dynamic_uid)
            raise self._resource_error(job_id, "create its output spool", exc) from None
        except BaseException:
            self._forget_uid(dynamic_uid)
            raise
        times = self._open_times(job_id)
        output = OutputLog(spool, ring_size=self.config.ring_size, retention=self.config.retention, times=times)
        job = Job(self, job_id, spec, output, spool)
        job.times = times
        try:
            config, job.uid = helper_config(spec, self._helper_settings(), dynamic_uid)
            if self.cgroups is not None:
                try:
                    job.cgroup = self.cgroups.create(str(job_id), spec.cgroup_limits)
                except RequestError:
                    raise
                except (OSError, JobworkerError) as exc:
                    log.error("job {job_id}: cannot make its cgroup: {error}", job_id=job_id, error=exc)
                    raise RequestError(f"cannot set up the job's cgroup: {exc}", ErrorCode.START_FAILED) from None
                config.update(contract.helper_config(cgroup_procs=list(job.cgroup.procs_files)))
            # Not before the job's cgroup is made: the priming holds the
            # kernel's cgroup lock through a grace period, and the reactor's
            # mkdirs would wait for it.
            self._prime_moves()
            if self.config.isolate:
                # Its first record says it is supervised (its pid comes with
                # the supervisor's hello): a crash of the server at any
                # moment after this leaves a job the next server takes back.
                job.supervisor = {"format": contract.SUPERVISOR_FORMAT, "pid": 0}
            self._add(job)
            try:
                self.store.save(job)
            except OSError as exc:
                raise self._resource_error(job_id, "save its record", exc) from None
            try:
                started = job.spawn(self.reactor, config)
            except OSError as exc:
                raise self._resource_error(job_id, "spawn it", exc) from None
        except Exception:
            self.jobs.pop(job_id, None)
            self._drop_unended(job_id)
            if job.cgroup is not None:
                self.remove_cgroup(job.cgroup)
            spool.remove()
            if times is not None:
                times.remove()
            self.store.forget(job_id)
            self._forget_uid(dynamic_uid)
            raise
        # One line a job (each costs the reactor ~0.3 ms): its uid is here.
        log.info(
            "job {job_id} starting for {owner} as uid {uid}: {argv}",
            job_id=job_id,
            owner=log_value(identity.name),
            uid=job.uid,
            argv=log_excerpt(list(job.argv)),
        )
        return started

    def _check_name_free(self, spec: JobSpec) -> None:
        """
        A job's name is not that of another of its owner's jobs not removed
        (as docker's container names: a finished job keeps its name until it
        is removed).  Jobs of other owners may have it.

        @raise RequestError: C{NAME_IN_USE}.
        """
        if not spec.name:
            return
        for job in self.jobs.values():
            if job.owner == spec.owner and job.name == spec.name:
                raise RequestError(
                    f"the name {spec.name!r} is in use by job {job.job_id} (remove it first, or choose another)",
                    ErrorCode.NAME_IN_USE,
                )

    def _open_times(self, job_id: uuid.UUID) -> FileSpool | None:
        """
        The job's times file; None when it cannot be made (the job runs;
        its output's times are then known only while the server runs).
        """
        try:
            # Made by the spool writer: a file creation off the start's path.
            return FileSpool(self.store.times_path(job_id), lazy=True)
        except OSError as exc:
            log.warn("job {job_id}: no times file: {error}", job_id=job_id, error=exc.strerror or exc)
            return None

    def admission_config(self) -> AdmissionConfig:
        """
        The settings admission decides a start by, as they stand now (the
        uid range is known once the service has started).
        """
        if self.uids is not None:
            default_user = ""
        else:
            default_user = self.config.job_user or pwd.getpwuid(os.getuid()).pw_name
        return AdmissionConfig(
            default_limits=self.config.default_limits,
            caps=self.config.caps,
            default_user=default_user,
            controllers=None if self.cgroups is None else frozenset(self.cgroups.controllers),
            max_jobs_per_identity=self.config.max_jobs_per_identity,
        )

    @staticmethod
    def _resource_error(job_id: uuid.UUID, step: str, exc: OSError) -> RequestError:
        """
        The answer to a start that failed on the host (a full disk, no file
        descriptors): the request's own error, naming the cause, and one
        log line without a traceback.
        """
        cause = _RESOURCE_ERRNOS.get(exc.errno or 0)
        detail = exc.strerror or str(exc)
        log.error("job {job_id}: cannot {step}: {error}", job_id=job_id, step=step, error=detail)
        if cause is None:
            return RequestError(f"cannot start the job: cannot {step}: {detail}", ErrorCode.START_FAILED)
        return RequestError(f"cannot start the job: {cause} ({detail})", ErrorCode.OUT_OF_RESOURCES)

    def get(self, identity: Identity, operation: Operation, job_id: uuid.UUID) -> Job:
        """
        The job C{job_id} if C{identity} may perform C{operation} on it.

        @raise RequestError: C{NOT_FOUND} for a job that does not exist or
            that the caller may not see (the same answer for both, so ids do
            not leak); C{PERMISSION_DENIED} when the role lacks the operation.
        """
        if authorize(identity, operation) is Verdict.DENIED:
            check_verdict(Verdict.DENIED)
        job = self.jobs.get(job_id)
        if job is None:
            raise RequestError(f"no job {job_id}", ErrorCode.NOT_FOUND)
        verdict = authorize(identity, operation, job.owner)
        if verdict is Verdict.NOT_FOUND:
            raise RequestError(f"no job {job_id}", ErrorCode.NOT_FOUND)
        check_verdict(verdict)
        return job

    def list(self, identity: Identity, after: tuple[int, int] = (0, 0), newest_first: bool = False) -> Iterator[Job]:
        """
        The jobs C{identity} may see that come after C{after} (a
        C{(created_at, job id as a number)} cursor) in list order, lazily:
        a page reads only as many as it lists (L{ListIndex}).  With
        C{newest_first}, those before C{after} (every job for C{(0, 0)}),
        in reverse.

        @raise RequestError: C{PERMISSION_DENIED} when the role may not list.
        """
        check_verdict(authorize(identity, Operation.LIST))
        # Made on the first list, so that nothing else here knows of it.
        index: ListIndex[Job] | None = self.__dict__.get("_list_index")
        if index is None:
            index = self.__dict__["_list_index"] = ListIndex()
        known = list(self.jobs.values())
        jobs = index.before(known, after) if newest_first else index.after(known, after)
        # No identity is named "": one allowed to see that owner's jobs sees
        # every owner's (an admin, a viewer), and needs no check per job.
        if authorize(identity, Operation.STATUS, "") is Verdict.ALLOW:
            return jobs
        return (job for job in jobs if may_see(identity, job.owner))

    def on_removed(self, observer: Callable[[Job], None]) -> Callable[[], None]:
        """
        Call C{observer(job)} each time a job is removed (by a client, or
        pruned as one finished job too many), once it is gone from L{jobs}.
        An exception from an observer is logged and the others are still
        told.

        @return: a function that ends the subscription (call it once).
        """
        self._removal_observers.append(observer)
        return lambda: self._removal_observers.remove(observer)

    def remove(self, job: Job) -> None:
        """
        Forget a finished job: its record and its output spool; then tell
        the observers (L{on_removed}).
        """
        if not job.is_final:
            raise RequestError(f"job {job.job_id} is still running; stop it first", ErrorCode.JOB_RUNNING)
        self.jobs.pop(job.job_id, None)
        self._drop_unended(job.job_id)
        if job.spool is not None:
            job.spool.seal()
        if job.times is not None:
            job.times.seal()
        # A directory in the spool's place is logged and left (discard).
        discard(self.store.spool_path(job.job_id))
        discard(self.store.times_path(job.job_id))
        self.store.forget_supervisor(job.job_id)
        self.store.forget(job.job_id)
        job.output.wake_listeners()
        for observer in list(self._removal_observers):
            try:
                observer(job)
            except Exception:
                log.failure("while telling of the removal of job {job_id}", job_id=job.job_id)

    # -- internals -------------------------------------------------------------

    def _allocate_uid(self, job_id: uuid.UUID, user: str) -> int | None:
        """
        A uid of the job's own, or None when it runs as a named user.
        """
        if user or self.uids is None:
            return None
        try:
            uid = self.uids.allocate(str(job_id))
        except OSError as exc:
            # The lock file is the first file a start makes: no descriptors
            # or a full disk here is OUT_OF_RESOURCES, as at every later step.
            raise self._resource_error(job_id, "claim a uid for it", exc) from None
        return uid

    def _forget_uid(self, uid: int | None) -> None:
        if uid is not None and self.uids is not None:
            self.uids.forget(uid)

    def _release_uid(self, job: Job) -> None:
        # Every job that held a uid of its own ends here, failed starts too.
        if self.uids is not None and self.uids.holder_of(job.uid) == str(job.job_id):
            self.uids.release(job.uid)

    def _helper_settings(self) -> HelperSettings:
        """
        What every job's helper gets: the state dir (every job's records and
        output, the helper) and the configured paths hidden, resolved: a
        mount follows symbolic links.
        """
        if self._settings is None:
            # Resolved once: the paths are the server's own, and stay put.
            paths = [self.store.state_dir, *self.config.hidden_paths]
            self._settings = HelperSettings(
                isolate=self.config.isolate,
                scratch_bytes=self.config.scratch_bytes,
                private_sys=self.config.private_sys,
                hidden_paths=tuple(dict.fromkeys(os.path.realpath(path) for path in paths)),
                inaccessible_file=self.inaccessible_file,
            )
        return self._settings

    def kill_cgroup(self, cgroup: Any, job_id: uuid.UUID) -> defer.Deferred[None]:
        """
        SIGKILL every process of C{cgroup}, in the thread pool: a driver
        freezes the cgroup and polls until it is empty, for up to seconds.
        """
        killing = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), cgroup.kill)

        def failed(failure: Any) -> None:
            if failure.check(OSError, JobworkerError):
                log.warn("job {job_id}: cgroup kill failed: {error}", job_id=job_id, error=failure.value)
            else:
                log.failure("job {job_id}: cgroup kill failed", failure, job_id=job_id)

        killing.addErrback(failed)
        self._cleanups.add(killing)
        killing.addBoth(lambda _: self._cleanups.discard(killing))
        return killing

    def _prime_moves(self) -> None:
        """
        Begin, on a thread, the kernel's wait that the move of the job's
        command into its cgroups would otherwise make in full, a few
        milliseconds from now (L{CgroupDriver.prime_moves}); one at a time.
        """
        if self.cgroups is None or self._priming:
            return
        self._priming = True

        def primed(result: object) -> None:
            self._priming = False
            if isinstance(result, Failure):
                log.debug("could not prime cgroup moves: {error}", error=result.getErrorMessage())

        threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.cgroups.prime_moves).addBoth(primed)

    def remove_cgroup(self, cgroup: Any) -> defer.Deferred[None]:
        """
        Remove C{cgroup} in the thread pool; the Deferred fires in a turn of
        the reactor's of its own (L{in_turn}): removals done together come
        back together.
        """
        removal = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), cgroup.remove)
        removal.addErrback(
            lambda f: log.failure("could not remove cgroup {cgroup}", f, cgroup=getattr(cgroup, "path_description", cgroup))
        )
        removed = self._turns.fired(removal)
        self._cleanups.add(removed)
        removed.addBoth(lambda _: self._cleanups.discard(removed))
        return removed

    def in_turn(self, call: Callable[[], object]) -> None:
        """
        Call C{call} in a later turn of the reactor, at most
        L{ENDS_PER_TURN} such calls in a turn: the ends of jobs stopped
        together (L{jobworker.jobs.pacing}).
        """
        self._turns.call(call)

    def job_changed(self, job: Job) -> None:
        self._saver.save(job)

    def _add(self, job: Job) -> None:
        self.jobs[job.job_id] = job
        if not job.is_final and job.job_id not in self._unended:
            self._unended[job.job_id] = job
            self._unended_of[job.owner] += 1

    def _drop_unended(self, job_id: uuid.UUID) -> None:
        job = self._unended.pop(job_id, None)
        if job is not None:
            self._unended_of[job.owner] -= 1
            if not self._unended_of[job.owner]:
                del self._unended_of[job.owner]

    def _running_of(self, owner: str, limit: int) -> int:
        """
        How many of C{owner}'s jobs run (not final), exactly if that may be
        C{limit} or more; else a number below C{limit}, which is all that
        admission asks.  A start with 500 jobs running walked all 500.
        """
        unended = self._unended_of[owner]
        if unended < limit:
            return unended
        return sum(1 for job in self._unended.values() if job.owner == owner and not job.is_final)

    def job_ended(self, job: Job) -> None:
        self._drop_unended(job.job_id)
        self._release_uid(job)
        self._prune()

    def _prune(self) -> None:
        # Those ended at most (a job settling is final but not yet ended):
        # the finished are listed only when there are too many.
        if len(self.jobs) - len(self._unended) <= self.config.max_finished_jobs:
            return
        finished = [job for job in self.jobs.values() if job.is_final]
        excess = len(finished) - self.config.max_finished_jobs
        if excess > 0:
            for job in sorted(finished, key=lambda job: job.ended_at)[:excess]:
                self.remove(job)
