"""
The state directory: one JSON record and one output spool per job.

Layout::

    STATE_DIR/jobs/<uuid>.json   the job's record (status, environment)
    STATE_DIR/jobs/<uuid>.out    its output spool (see jobworker.output.log)
    STATE_DIR/jobs/<uuid>.times  when its output was read (ditto); may be absent
    STATE_DIR/jobs/<uuid>.backlog  output its supervisor read while no server ran
    STATE_DIR/jobs/<uuid>.end    its supervisor's record of the job's end
    STATE_DIR/run/<uuid>.sock    its supervisor's socket, while it runs
    STATE_DIR/format             the state format, {"format": 2}
    STATE_DIR/lock               held by the server using the directory

(see L{jobworker.jobs.supervisor}).  A server reads a directory of its own
format or older (a directory without a C{format} file is format 1: no job
in it has a supervisor), and refuses a newer one, touching nothing.

Records are replaced atomically (write a temporary file completely, fsync,
rename), so a crash or a full disk leaves either the old record or the new
one, never a torn one: a write that fails, short or not, removes the
temporary file and leaves the old record in place.

Write-behind (L{JobStore.write_behind}, what the server turns on): every
save of a job that has a record already is written by a thread of the
store's, so that the ~1-3 ms of creating, syncing and renaming files is not
spent on the reactor's thread, where a burst of jobs ending (a stop of
hundreds) held every client up for tens of milliseconds, and a start paid
it three times.  What is saved is taken at
the call (the record is encoded there); saves of one job still queued are
merged (only the newest is written); one that fails is logged and tried
again every L{WRITE_RETRY_S} seconds until it is written or replaced; a job
forgotten drops what is queued for it and waits for a write under way;
closing the store writes what is queued; and the files a job's supervisor
left go once its final record is written, by the same thread
(L{JobStore.forget_supervisor_once_saved}).  A job's first save (the one that
makes its record, when it starts) is written at once, so that a start on a
full disk is still refused with the cause, and so that a server that dies
at any moment after it leaves a record that tells the next server how to
take the job back; it is not synced there (a server's crash cannot lose
what the kernel has; a host's crash can, but the job's next save, which
always follows within milliseconds, as it starts or fails, is written and
synced by the thread).  Later saves of a running job add nothing the next
server needs: the supervisor's hello tells it the rest.

Loading trusts nothing on disk: every record is validated
(L{jobworker.records.salvage_status}); a damaged one, and a spool whose
record is missing, still load as a job (with what could be read, and the
problems found), so that an operator sees them in C{jobcli list}.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from jobworker.logs import Logger
from jobworker.protocol.messages import JobStatus
from jobworker.records import salvage_status, status_to_dict

__all__ = ["STATE_FORMAT", "JobStore", "LoadedRecord", "StateDirLocked", "StateFormatTooNew", "check_state_format", "discard"]

log = Logger()

# With write-behind: how often a record that could not be written (a full
# disk) is tried again; a try costs one small write.
WRITE_RETRY_S = 1.0

# A record is a few KiB (at most ~512 KiB with the largest argv and env);
# one bigger than this is not ours, and is not read into memory.
MAX_RECORD_BYTES = 16 << 20


@dataclass
class LoadedRecord:
    """
    One job found in the state directory.

    @ivar problems: what is wrong with the record (empty when it is sound);
        the fields they name have their defaults in C{status}.
    """

    status: JobStatus
    env: list[tuple[str, str]]
    problems: list[str] = field(default_factory=list)
    # The job's supervisor ({"format", "pid"}) if it had one.
    supervisor: dict[str, int] | None = None


def _env(value: Any) -> tuple[list[tuple[str, str]], list[str]]:
    if value is None:
        return [], []
    if isinstance(value, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(isinstance(item, str) for item in pair) for pair in value
    ):
        return [(key, item) for key, item in value], []
    return [], ["env: not a list of [name, value] pairs"]


def _supervisor(value: Any) -> tuple[dict[str, int] | None, list[str]]:
    if value is None:
        return None, []
    if (
        isinstance(value, dict)
        and all(isinstance(value.get(key), int) and not isinstance(value.get(key), bool) for key in ("format", "pid"))
        and value["pid"] >= 0  # 0: not known yet (the job was starting)
    ):
        return {"format": value["format"], "pid": value["pid"]}, []
    return None, ["supervisor: not an object with a format and a pid"]


def discard(path: str) -> None:
    """
    Unlink C{path} if it is there; log (without a traceback) when it is
    something unlink cannot remove, such as a directory.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warn("could not remove {path}: {error}; left as it is", path=path, error=exc.strerror or exc)


def _read_record(fd: int, size: int) -> bytes:
    """
    The file's content, at most C{MAX_RECORD_BYTES + 1} bytes of it, read
    in a buffer of the size C{fstat} gave (a read of the maximum at once
    allocated 16 MiB per record: 60 us of every record's start-up).
    """
    chunks = []
    left = MAX_RECORD_BYTES + 1
    want = min(size + 1, left)
    while left > 0:
        chunk = os.read(fd, want)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
        want = min(1 << 16, left)  # it grew meanwhile: on in small steps
    return b"".join(chunks)


class _RecordWriter:
    """
    The thread of L{JobStore.write_behind}: what is queued, by job, and
    what could not be written, until it is.
    """

    def __init__(self, store: JobStore, call_soon: Callable[..., None]) -> None:
        self._store = store
        self._call_soon = call_soon
        self._lock = threading.Condition()
        self._queued: dict[uuid.UUID, bytes] = {}  # in the order first queued
        self._failed: dict[uuid.UUID, float] = {}  # when to try again (monotonic)
        self._with_record: set[uuid.UUID] = set()
        self._writing: uuid.UUID | None = None
        # Files to unlink once the job's queued record is written.
        self._after_record: dict[uuid.UUID, tuple[str, ...]] = {}
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="jobworker-records", daemon=True)
        self._thread.start()

    def made(self, job_id: uuid.UUID) -> None:
        with self._lock:
            self._with_record.add(job_id)

    def queue(self, job_id: uuid.UUID, content: bytes) -> bool:
        """
        Queue C{content} as the job's record; False (the caller writes it
        now) for a job without a record yet.
        """
        with self._lock:
            if job_id not in self._with_record or self._closing:
                return False
            self._queued.pop(job_id, None)  # merged, and last in the order
            self._queued[job_id] = content
            self._lock.notify()
            return True

    def discard_after_record(self, job_id: uuid.UUID, paths: tuple[str, ...]) -> None:
        """
        Unlink C{paths} once the job's record queued now is written (soon,
        when none is queued); never while it cannot be written.
        """
        with self._lock:
            self._after_record[job_id] = self._after_record.get(job_id, ()) + paths
            self._lock.notify()

    def drop(self, job_id: uuid.UUID) -> None:
        """
        Forget the job: nothing queued for it is written, and a write under
        way has ended when this returns.
        """
        with self._lock:
            self._queued.pop(job_id, None)
            self._failed.pop(job_id, None)
            self._with_record.discard(job_id)
            while self._writing == job_id:
                self._lock.wait()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._failed = dict.fromkeys(self._failed, 0.0)  # each tried once more, now
            self._lock.notify()
        self._thread.join()

    def _next(self) -> tuple[uuid.UUID, bytes] | None:
        # With the lock held: the first job due, or None when there is none.
        now = time.monotonic()
        for job_id in self._queued:
            if self._failed.get(job_id, 0.0) <= now:
                return job_id, self._queued.pop(job_id)
        return None

    def _discards_due(self) -> list[str]:
        # With the lock held: the files of the jobs whose record is written.
        due = [job_id for job_id in self._after_record if job_id not in self._queued]
        return [path for job_id in due for path in self._after_record.pop(job_id)]

    def _work(self) -> tuple[uuid.UUID, bytes] | list[str] | None:
        # With the lock held: the next record to write, else files to
        # unlink, waiting for either; None once closing leaves neither.
        while True:
            item = self._next()
            if item is not None:
                return item
            paths = self._discards_due()
            if paths:
                return paths
            if self._closing:
                return None  # what failed was tried once more: left as it is
            due = min((self._failed[job_id] for job_id in self._queued if job_id in self._failed), default=None)
            self._lock.wait(None if due is None else max(0.0, due - time.monotonic()))

    def _discard(self, paths: list[str]) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._call_soon(
                    lambda path=path, exc=exc: log.warn("could not remove {path}: {error}; left as it is", path=path, error=exc.strerror or exc)
                )

    def _run(self) -> None:
        while True:
            with self._lock:
                work = self._work()
                if work is None:
                    return
                if isinstance(work, list):
                    paths = work
                else:
                    paths = []
                    job_id, content = work
                    self._writing = job_id
                    failed_before = job_id in self._failed
            if paths:
                self._discard(paths)
                continue
            try:
                self._store._replace(self._store._record_path(job_id), content)
                error = None
            except OSError as exc:
                error = exc
            with self._lock:
                self._writing = None
                self._lock.notify_all()
                if job_id not in self._with_record:
                    continue  # forgotten meanwhile (forget() removes the file)
                if error is None:
                    self._failed.pop(job_id, None)
                    if failed_before:
                        self._call_soon(lambda job_id=job_id: log.info("job {job_id}: its record is saved again", job_id=job_id))
                    continue
                if job_id not in self._queued:
                    self._queued[job_id] = content  # newer content, if queued meanwhile, wins
                self._failed[job_id] = time.monotonic() + WRITE_RETRY_S
                closing = self._closing
            self._report_failure(job_id, error, failed_before, closing)

    def _report_failure(self, job_id: uuid.UUID, error: OSError, failed_before: bool, closing: bool) -> None:
        if closing:
            self._call_soon(
                lambda: log.error(
                    "job {job_id}: its record could not be saved before shutdown ({error}); it may read as lost after a restart",
                    job_id=job_id,
                    error=error.strerror or error,
                )
            )
        elif not failed_before:
            self._call_soon(
                lambda: log.error(
                    "could not save job {job_id}: {error}; retrying every {interval} s",
                    job_id=job_id,
                    error=error.strerror or error,
                    interval=WRITE_RETRY_S,
                )
            )


class _NotAFile(Exception):
    """
    A job record path that holds a directory, a FIFO, a device.
    """


class StateDirLocked(Exception):
    """
    Another server holds the state directory.
    """


class StateFormatTooNew(Exception):
    """
    The state directory was written by a newer server, in a format this one
    cannot read.
    """


# The state format this server writes (see the module docstring).
STATE_FORMAT = 2


def check_state_format(state_dir: str) -> int | None:
    """
    The format of the state directory (None: it has no format file, so
    it is new, or of format 1); changes nothing.

    @raise StateFormatTooNew: it is in a newer format, or its format file
        is not one.
    """
    path = os.path.join(state_dir, "format")
    try:
        with open(path, "rb") as handle:
            content = handle.read(4096)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFormatTooNew(f"cannot read the format file {path}: {exc.strerror or exc}") from None
    try:
        found = json.loads(content).get("format")
    except (ValueError, AttributeError):
        found = None
    if not isinstance(found, int) or isinstance(found, bool):
        raise StateFormatTooNew(f"the state directory {state_dir} has a damaged format file {path}")
    if found > STATE_FORMAT:
        raise StateFormatTooNew(
            f"the state directory {state_dir} is in format {found}; this server reads formats up to "
            f"{STATE_FORMAT} (a newer jobworker wrote it: run that, or use another --state-dir)"
        )
    return found


class JobStore:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.jobs_dir = os.path.join(state_dir, "jobs")
        self.run_dir = os.path.join(state_dir, "run")
        self._run_fd: int | None = None
        self._behind: _RecordWriter | None = None

    def write_behind(self, call_soon: Callable[..., None]) -> None:
        """
        From now on, write the records of jobs that have one in a thread
        (see the module docstring).

        @param call_soon: runs a function on the thread that owns the store
            (the reactor's C{callFromThread}): the store's log lines about
            writes are emitted there.
        """
        if self._behind is None:
            self._behind = _RecordWriter(self, call_soon)

    def open(self) -> None:
        """
        Make the directories and lock the state dir for this process.

        @raise StateDirLocked: another server is using it.
        """
        os.makedirs(self.jobs_dir, mode=0o700, exist_ok=True)
        self._lock_fd: int | None = os.open(os.path.join(self.state_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StateDirLocked(f"another jobworker server is using the state directory {self.state_dir}") from None
        try:
            self._check_format()
            os.makedirs(self.run_dir, mode=0o700, exist_ok=True)
        except BaseException:
            self.close()
            raise

    def _check_format(self) -> None:
        """
        @raise StateFormatTooNew: the directory is in a newer format.
        """
        if check_state_format(self.state_dir) != STATE_FORMAT:
            path = os.path.join(self.state_dir, "format")
            self._replace(path, json.dumps({"format": STATE_FORMAT}).encode() + b"\n", directory=self.state_dir)

    def close(self) -> None:
        """
        Write what is queued (write-behind: each record tried once more if
        it failed), then release the state directory.
        """
        behind, self._behind = self._behind, None
        if behind is not None:
            behind.close()
        if self._run_fd is not None:
            os.close(self._run_fd)
            self._run_fd = None
        fd = getattr(self, "_lock_fd", None)
        if fd is not None:
            os.close(fd)
            self._lock_fd = None

    def spool_path(self, job_id: uuid.UUID) -> str:
        return os.path.join(self.jobs_dir, f"{job_id}.out")

    def times_path(self, job_id: uuid.UUID) -> str:
        """
        The times file beside the job's spool (see L{jobworker.output.log}).
        """
        return os.path.join(self.jobs_dir, f"{job_id}.times")

    def backlog_path(self, job_id: uuid.UUID) -> str:
        return os.path.join(self.jobs_dir, f"{job_id}.backlog")

    def end_path(self, job_id: uuid.UUID) -> str:
        return os.path.join(self.jobs_dir, f"{job_id}.end")

    def socket_path(self, job_id: uuid.UUID) -> str:
        """
        The supervisor's socket, by a path short enough for a unix socket
        address (108 bytes) wherever the state directory is: through this
        process's descriptor of the run directory.
        """
        if self._run_fd is None:
            self._run_fd = os.open(self.run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        return f"/proc/self/fd/{self._run_fd}/{job_id}.sock"

    def socket_file(self, job_id: uuid.UUID) -> str:
        return os.path.join(self.run_dir, f"{job_id}.sock")

    def _supervisor_files(self, job_id: uuid.UUID) -> tuple[str, ...]:
        return (self.backlog_path(job_id), self.end_path(job_id), self.socket_file(job_id))

    def forget_supervisor(self, job_id: uuid.UUID) -> None:
        """
        Remove what the job's supervisor left (its end is settled), now.
        """
        for path in self._supervisor_files(job_id):
            discard(path)

    def forget_supervisor_once_saved(self, job_id: uuid.UUID) -> None:
        """
        As L{forget_supervisor}, once the job's record as last saved is
        written: with write-behind, by the store's thread (three unlinks
        that take milliseconds on a busy disk, for each of hundreds of jobs
        ending together), and never before the final record is on disk,
        so that a crash meanwhile leaves the supervisor's end record to
        tell the next server how the job ended.
        """
        if self._behind is None:
            self.forget_supervisor(job_id)
        else:
            self._behind.discard_after_record(job_id, self._supervisor_files(job_id))

    def _record_path(self, job_id: uuid.UUID) -> str:
        return os.path.join(self.jobs_dir, f"{job_id}.json")

    def save(self, job: Any) -> None:
        """
        Replace the job's record.

        @raise OSError: it could not be written completely (a full disk, too
            many open files); the old record, if any, is left as it was and
            no temporary file is left behind.
        """
        # A running job's usage is read from its cgroup again when asked for.
        status = job.status(live=False)
        record: dict[str, Any] = {"status": status_to_dict(status), "env": [list(pair) for pair in job.env]}
        supervisor = getattr(job, "supervisor", None)
        if supervisor is not None and not job.is_final:
            record["supervisor"] = supervisor
        content = json.dumps(record).encode()
        behind = self._behind
        if behind is not None and behind.queue(job.job_id, content):
            return
        self._replace(self._record_path(job.job_id), content, sync=behind is None)
        if behind is not None:
            behind.made(job.job_id)

    def _replace(self, path: str, content: bytes, directory: str | None = None, sync: bool = True) -> None:
        """
        Write C{path} anew through a temporary file and a rename; synced
        (the file, then its directory) unless C{sync} is false.
        """
        temporary = path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(content)
                while view:
                    # A short write (a nearly full disk) is not an error by
                    # itself: go on until all is written or one fails.
                    written = os.write(fd, view)
                    view = view[written:]
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, path)
        except BaseException:
            try:
                os.unlink(temporary)
            except OSError:
                pass
            raise
        if not sync:
            return
        # The rename itself survives a crash once the directory is synced.
        try:
            dir_fd = os.open(directory or self.jobs_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)

    def forget(self, job_id: uuid.UUID) -> None:
        """
        Remove the job's record.  What cannot be removed (a directory put
        in its place) is logged and left alone: it is not ours to delete.
        """
        if self._behind is not None:
            self._behind.drop(job_id)
        for path in (self._record_path(job_id), self._record_path(job_id) + ".tmp"):
            discard(path)

    def load(self) -> Iterator[LoadedRecord]:
        """
        Every job of the state directory, sound or damaged.

        A record that is damaged (not JSON, fields missing or out of range)
        yields what of it is valid, with its problems; a spool without a
        record yields a job known only by its id and output.  Temporary
        files of interrupted writes are removed.  Files that are not ours
        (names that are not a job id) are logged and left alone.
        """
        names = set(os.listdir(self.jobs_dir))
        # What is made from the records (and from each by the caller,
        # between two of them) lives on: the collector's passes over it
        # while it grows are wasted, half the start-up with 10,000 records.
        # It runs again when the load ends, or is abandoned.
        collecting = gc.isenabled()
        gc.disable()
        try:
            yield from self._load_all(names)
        finally:
            if collecting:
                gc.enable()

    def _load_all(self, names: set[str]) -> Iterator[LoadedRecord]:
        for name in sorted(names):
            path = os.path.join(self.jobs_dir, name)
            stem, dot, suffix = name.partition(".")
            try:
                job_id = uuid.UUID(stem)
            except ValueError:
                job_id = None
            if job_id is None or str(job_id) != stem or suffix not in ("json", "json.tmp", "out", "times", "backlog", "end"):
                log.warn("ignoring {path}: not a file of jobworker's", path=path)
                continue
            if suffix == "json.tmp":
                # A write that never finished: the record beside it (if any)
                # is the one that counts.
                log.info("removing {path}, left by an interrupted write", path=path)
                try:
                    os.unlink(path)
                except OSError as exc:
                    log.warn("could not remove {path}: {error}", path=path, error=exc)
                continue
            if suffix in ("times", "backlog", "end"):
                continue  # read with the job's spool, or by its supervisor's server
            if suffix == "out":
                if f"{stem}.json" not in names:
                    log.error("job {job_id}: its output spool has no record", job_id=job_id)
                    status, _ = salvage_status(None, job_id)
                    yield LoadedRecord(status, [], ["the job record is missing"])
                continue
            yield self._load_one(path, job_id)

    def _load_one(self, path: str, job_id: uuid.UUID) -> LoadedRecord:
        problems: list[str] = []
        data: Any = None
        try:
            # O_NONBLOCK: open() of a FIFO put there would wait for a writer
            # for ever, and the server would never start.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise _NotAFile()
                content = _read_record(fd, info.st_size)
            finally:
                os.close(fd)
            if len(content) > MAX_RECORD_BYTES:
                problems.append(f"the job record is larger than {MAX_RECORD_BYTES} bytes")
            else:
                data = json.loads(content)
        except _NotAFile:
            problems.append("the job record is not a regular file")
        except OSError as exc:
            problems.append(f"the job record cannot be read: {exc.strerror or exc}")
        except (ValueError, RecursionError) as exc:
            problems.append(f"the job record is not JSON: {str(exc)[:200]}")
        if data is not None and not isinstance(data, dict):
            problems.append(f"the job record is not an object (a JSON {type(data).__name__})")
            data = None
        status, found = salvage_status(data["status"] if data is not None and "status" in data else None, job_id)
        if data is not None:
            if "status" not in data:
                problems.append("status: missing")
            else:
                problems.extend(found)
            env, env_problems = _env(data.get("env"))
            problems.extend(env_problems)
            supervisor, supervisor_problems = _supervisor(data.get("supervisor"))
            problems.extend(supervisor_problems)
        else:
            env = []
            supervisor = None
        if problems:
            log.error(
                "job {job_id}: damaged record {path}: {problems}", job_id=job_id, path=path, problems="; ".join(problems)
            )
        return LoadedRecord(status, env, problems, supervisor)
