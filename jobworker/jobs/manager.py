"""
Jobs and the job manager: the Twisted glue between a client's request and a
process on the host.

Life of a job
=============

    start request
        -> cgroup made, limits written        (host adapter: jobworker.cgroups)
        -> helper spawned                     (jobworker/host/isolate.py)
             joins the cgroup, isolates, drops privileges, execs the command
        -> status pipe (fd 3) says started or failed   => STARTING -> RUNNING | FAILED
        -> output read from the job's pipes into its OutputLog
        -> the helper ends, the pipes reach EOF
        -> usage read, cgroup killed and removed      => EXITED | SIGNALED | STOPPED
                                                         | OOM | TIMEOUT

A stop sends SIGTERM to the job (the helper forwards it to the command's
process group inside the namespace) and, after the grace period, SIGKILL to
every process of the job's cgroup.

The reactor is passed in, never imported, so the tests drive timers with a
fake clock.  Host operations that may block (waiting for a cgroup to drain
before removing it) run in the reactor's thread pool.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer, error as twisted_error, protocol, threads
from twisted.internet.interfaces import IReadDescriptor
from jobworker.logs import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker.errors import ErrorCode, JobworkerError, RequestError
from jobworker.host.isolate import compiled_helper
from jobworker.limits import LIMIT_CONTROLLERS, Limits
from jobworker.audit import log_excerpt, log_value
from jobworker.output.log import DEFAULT_RETENTION, DEFAULT_RING_SIZE, MemorySpool, OutputLog
from jobworker.policy import Identity, Operation, Role, Verdict, authorize, may_see
from jobworker.protocol.messages import UID_UNKNOWN, InvalidLimits, JobState, JobStatus, JobUsage, Network, StartRequest
from jobworker.output.spool import FileSpool, SpoolFailure
from jobworker.jobs.store import JobStore, LoadedRecord, StateDirLocked, discard
from jobworker.host.uids import DEFAULT_LOCK_DIRECTORY, UidAllocator, UidLocks, UidRange, host_has_id, host_live_uids

__all__ = ["Job", "JobManager", "JobManagerConfig", "ISOLATE_SCRIPT"]

log = Logger()

ISOLATE_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "host", "isolate.py")

# A job's stdout/stderr pipes are widened to this (the kernel's default
# ceiling for unprivileged pipes), so a job is not held up while the server
# is busy, and read 256 KiB at a time: 32 times fewer calls than Twisted's
# own 8 KiB reads, and each read is one record of the output log, so the
# per-record work in Python is paid once per 256 KiB.  (glibc raises its
# mmap threshold after the first such buffer is freed, so later ones come
# from the heap: about 5,000 page faults per GiB, measured.)
PIPE_SIZE = 1 << 20
READ_SIZE = 256 << 10
READS_PER_TURN = 4

# Limits on a start request, so one request cannot make us hold much.
MAX_ARGV_ITEMS = 4096
MAX_ARGV_BYTES = 256 << 10
MAX_ENV_ITEMS = 1024
MAX_ENV_BYTES = 256 << 10

DEFAULT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


# After the helper ends, wait this long for the pipes' EOF before closing
# them ourselves (a process that escaped the job could hold them open).
EOF_GRACE_S = 2.0

# While the state directory is full: how often a job's spool tries to write
# again, and how often unsaved job records are saved again.  A try costs one
# small write (a 9-byte gap record; a record of a few KiB).
SPOOL_RETRY_S = 1.0
SAVE_RETRY_S = 1.0

# A job's error text, notes on damaged or lost output included, is cut to
# this many characters (the wire carries at most 65,535 bytes of UTF-8).
MAX_ERROR_CHARS = 8192

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


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass
class JobManagerConfig:
    """
    Settings of the job manager; each maps to an option of the plugin.

    @ivar state_dir: where job records and output spools live.
    @ivar isolate: run every job in its own PID, mount, IPC and network
        namespace.
    @ivar job_user: the user jobs run as unless an admin asks otherwise;
        None runs each as a uid of its own from C{job_uids} or, without
        them, as the server's own user (only sensible unprivileged).
    @ivar job_uids: the range of uids given to jobs one each (root only).
    @ivar uid_lock_dir: where servers of one host claim the uids they hand
        out (L{UidLocks}).
    @ivar scratch_bytes: size of the tmpfs that holds an isolated job's
        private C{/tmp}, C{/var/tmp} and C{/dev/shm} together (charged to
        the job's memory); 0: the job sees the host's.
    @ivar private_sys: give an isolated job with its own network namespace
        its own read-only C{/sys}.
    @ivar hidden_paths: paths a job must not reach, besides the state dir
        (always hidden): the server's TLS key, for one.
    @ivar default_limits: applied to every unset limit of every job.
    @ivar caps: the most a non-admin may ask for; 0 fields are uncapped.
    @ivar max_jobs_per_identity: running jobs one identity may have at once.
    @ivar max_finished_jobs: finished jobs kept; the oldest beyond are removed.
    """

    state_dir: str
    isolate: bool = True
    job_user: str | None = None
    job_uids: UidRange | None = None
    uid_lock_dir: str = DEFAULT_LOCK_DIRECTORY
    scratch_bytes: int = 0
    private_sys: bool = True
    hidden_paths: tuple[str, ...] = ()
    default_limits: Limits = field(default_factory=lambda: Limits(pids=1024))
    caps: Limits = field(default_factory=Limits)
    default_grace_s: float = 10.0
    max_jobs_per_identity: int = 256
    max_finished_jobs: int = 1000
    ring_size: int = DEFAULT_RING_SIZE
    retention: int = DEFAULT_RETENTION


@implementer(IReadDescriptor)
class _PipeReader:
    """
    Reads one of a job's output pipes in large chunks.

    Twisted's own process readers read 8 KiB per call; at hundreds of MB/s
    that is a hundred thousand reactor turns per GiB.  This reader takes up
    to L{READ_SIZE} per call from a pipe widened to L{PIPE_SIZE}.
    """

    def __init__(self, reactor: Any, fd: int, received: Callable[[bytes], None], ended: Callable[[], None]) -> None:
        self._reactor = reactor
        self._fd = fd
        self._received = received
        self._ended = ended
        self.closed = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "job-output"

    def doRead(self) -> Any:
        # Up to READS_PER_TURN reads per turn of the reactor: a busy job is
        # drained quickly without starving the other connections.
        for _ in range(READS_PER_TURN):
            try:
                data = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                return None
            except OSError as exc:
                return twisted_error.ConnectionLost(str(exc))
            if not data:
                return twisted_error.ConnectionDone()
            self._received(data)
            if self.closed or len(data) < READ_SIZE:
                return None
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._reactor.removeReader(self)
        os.close(self._fd)
        self._ended()


def _output_pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_end, False)
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # a smaller pipe only costs speed
    return read_end, write_end


class _HelperProtocol(protocol.ProcessProtocol):
    """
    Receives the helper's status lines (fd 3) and its end.
    """

    def __init__(self, job: Job) -> None:
        self.job = job
        self._status = b""

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != 3:
            return
        self._status += data
        while b"\n" in self._status:
            line, self._status = self._status.split(b"\n", 1)
            self.job._status_line(line.decode("utf-8", "replace"))
        # A status line is short; a helper writing megabytes without a
        # newline is broken, and must not make us hold them.
        if len(self._status) > 4096:
            self._status = b""

    def childConnectionLost(self, fd: int) -> None:
        if fd == 3:
            self.job._status_closed()

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.job._helper_ended(getattr(value, "exitCode", None), getattr(value, "signal", None))


class Job:
    """
    One job: its request, its process, its output and its fate.
    """

    def __init__(
        self,
        manager: JobManager,
        job_id: uuid.UUID,
        owner: str,
        request: StartRequest,
        limits: Limits,
        user: str,
        output: OutputLog,
        spool: FileSpool | None,
    ) -> None:
        self.manager = manager
        self.job_id = job_id
        self.owner = owner
        self.argv = tuple(request.argv)
        self.env = tuple(request.env)
        self.workdir = request.workdir or "/"
        self.network = request.network
        self.user = user
        # The uid the command runs as; UID_UNKNOWN until known.
        self.uid = UID_UNKNOWN
        self.limits = limits
        self.output = output
        self.spool = spool
        self.state = JobState.STARTING
        self.exit_code = -1
        self.signal = 0
        self.created_at = _now_us()
        self.started_at = 0
        self.ended_at = 0
        self.error = ""
        self.stopped_by = ""
        self.usage = JobUsage()
        self.cgroup: Any = None
        self.transport: Any = None
        # The helper's pid, kept: Twisted sets transport.pid to None once it
        # has reaped the helper, and without namespaces the pid is also the
        # job's process group, which may outlive the helper.
        self.pid: int | None = None
        self._started: defer.Deferred[Job] | None = defer.Deferred()
        self._ended_waiters: list[defer.Deferred[JobStatus]] = []
        self._status_final: tuple[str, int] | None = None  # ("exit"|"signal", n) from the helper
        self._helper_status: tuple[int | None, int | None] | None = None
        self._open_pipes = 0
        self._failed: tuple[str, str] | None = None
        self._stop_reason: JobState | None = None
        self._timers: dict[str, Any] = {}
        self._finishing = False
        self._readers: list[_PipeReader] = []
        self._reading = False
        self._last_oom = False  # from the last usage read of the cgroup
        self._losing_output = False  # the spool failed and has not recovered
        output.on_damage = self._output_damaged

    # -- queries ---------------------------------------------------------------

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    def status(self) -> JobStatus:
        usage = self.usage
        if not self.is_final and self.cgroup is not None:
            usage = self._read_usage()
        return JobStatus(
            job_id=self.job_id,
            owner=self.owner,
            argv=self.argv,
            state=self.state,
            exit_code=self.exit_code,
            signal=self.signal,
            created_at=self.created_at,
            started_at=self.started_at,
            ended_at=self.ended_at,
            error=self._error_text(),
            stopped_by=self.stopped_by,
            limits=self.limits,
            usage=usage,
            output_bytes=self.output.end,
            workdir=self.workdir,
            user=self.user,
            network=self.network,
            uid=self.uid,
        )

    def _error_text(self) -> str:
        """
        The job's error, with what is wrong with its output: damage found in
        its spool, bytes a full disk kept from being stored.
        """
        notes = [self.error] if self.error else []
        if self.output.damage and self.output.damage not in self.error:
            notes.append(self.output.damage)
        if self.output.lost_bytes:
            lost = f"{self.output.lost_bytes} bytes of output could not be stored (disk full) and are a gap"
            if lost not in self.error:
                notes.append(lost)
        return "; ".join(notes)[:MAX_ERROR_CHARS]

    def when_ended(self) -> defer.Deferred[JobStatus]:
        """
        A Deferred that fires with the final status (at once if final).
        """
        if self.is_final:
            return defer.succeed(self.status())
        waiter: defer.Deferred[JobStatus] = defer.Deferred(lambda d: self._ended_waiters.remove(d))
        self._ended_waiters.append(waiter)
        return waiter

    # -- start -----------------------------------------------------------------

    def spawn(self, reactor: Any, helper_config: dict[str, Any]) -> defer.Deferred[Job]:
        stdout_r, stdout_w = _output_pipe()
        stderr_r, stderr_w = _output_pipe()
        readers = []
        try:
            self.transport = reactor.spawnProcess(
                _HelperProtocol(self),
                sys.executable,
                # The configuration goes through stdin (the helper then puts
                # /dev/null there): argv could not carry a 256 KiB command.
                [sys.executable, "-I", "-S", self.manager.helper_path, "-"],
                env={},
                path="/",
                childFDs={0: "w", 1: stdout_w, 2: stderr_w, 3: "r"},
            )
            self.pid = self.transport.pid
            self.transport.write(json.dumps(helper_config).encode())
            self.transport.closeStdin()
            for fd, read_end in ((1, stdout_r), (2, stderr_r)):
                reader = _PipeReader(reactor, read_end, lambda data, fd=fd: self._output_received(fd, data), self._pipe_closed)
                readers.append(reader)
        except BaseException:
            for fd in (stdout_r, stderr_r):
                os.close(fd)
            raise
        finally:
            for fd in (stdout_w, stderr_w):
                os.close(fd)
        self._open_pipes = 2
        self._readers = readers
        self._reading = True
        if self.spool is not None:
            self.spool.on_drained = lambda: reactor.callFromThread(self._resume_reading)
            self.spool.on_failed = lambda failure: reactor.callFromThread(self._spool_failed, failure)
            self.spool.on_recovered = lambda: reactor.callFromThread(self._spool_recovered)
        for reader in readers:
            reactor.addReader(reader)
        assert self._started is not None
        return self._started

    def _output_received(self, fd: int, data: bytes) -> None:
        self.output.append(fd, data)
        if self.spool is not None and self.spool.congested and self._reading:
            # The disk is behind by HIGH_WATER bytes: let the job wait on its
            # pipe rather than let the backlog grow our memory.
            self._reading = False
            for reader in self._readers:
                if not reader.closed:
                    self.manager.reactor.removeReader(reader)

    def _spool_failed(self, failure: SpoolFailure) -> None:
        """
        The spool could not write (a full disk): the output log keeps the
        newest output in its ring, and what falls out of it before the disk
        has room again becomes a gap.  Logged once per episode; retried every
        L{SPOOL_RETRY_S} seconds while the job runs.
        """
        if not self._losing_output:
            self._losing_output = True
            log.error(
                "job {job_id}: cannot write its output to {path}: {error}; output from byte {offset} on "
                "is kept in memory only (the last {ring} bytes) until there is room again, and what is "
                "dropped meanwhile is recorded as a gap",
                job_id=self.job_id,
                path=getattr(self.spool, "path", "?"),
                error=failure.error.strerror or failure.error,
                offset=failure.mark if failure.mark is not None else self.output.end,
                ring=self.output.ring_size,
            )
        if not self.output.closed and "spool" not in self._timers:
            self._timers["spool"] = self.manager.reactor.callLater(SPOOL_RETRY_S, self._retry_spool)

    def _retry_spool(self) -> None:
        self._timers.pop("spool", None)
        if not self.output.closed:
            self.output.retry_spool()

    def _spool_recovered(self) -> None:
        if self._losing_output:
            self._losing_output = False
            log.info(
                "job {job_id}: writing its output to {path} again; {lost} bytes could not be stored "
                "and are recorded as a gap",
                job_id=self.job_id,
                path=getattr(self.spool, "path", "?"),
                lost=self.output.lost_bytes,
            )

    def _output_damaged(self, what: str) -> None:
        log.error("job {job_id}: {damage}; readers get a gap there", job_id=self.job_id, damage=what)

    def _resume_reading(self) -> None:
        if self._reading:
            return
        self._reading = True
        for reader in self._readers:
            if not reader.closed:
                self.manager.reactor.addReader(reader)

    def _status_line(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "started":
            self._mark_running()
        elif word == "failed":
            kind, _, detail = rest.partition(" ")
            _errno, _, message = detail.partition(" ")
            self._failed = (kind, message or detail)
        elif word in ("exit", "signal"):
            try:
                self._status_final = (word, int(rest))
            except ValueError:
                log.warn("job {job_id}: bad status line {line!r}", job_id=self.job_id, line=line)
        elif word != "pid":
            log.warn("job {job_id}: unknown status line {line!r}", job_id=self.job_id, line=line)

    def _status_closed(self) -> None:
        # Without isolation, the helper's exec closes fd 3 (close-on-exec):
        # EOF with no failure means the command is running.
        if self._failed is None and self.state is JobState.STARTING and self._helper_status is None:
            self._mark_running()

    def _mark_running(self) -> None:
        if self.state is not JobState.STARTING:
            return
        self.state = JobState.RUNNING
        self.started_at = _now_us()
        self.manager._job_changed(self)
        if self.limits.timeout_ms:
            self._timers["timeout"] = self.manager.reactor.callLater(
                self.limits.timeout_ms / 1000, self._timed_out
            )
        started, self._started = self._started, None
        if started is not None:
            started.callback(self)

    # -- stop ------------------------------------------------------------------

    def stop(self, by: str, grace_s: float, *, reason: JobState = JobState.STOPPED) -> None:
        """
        SIGTERM the job now; SIGKILL all of it after C{grace_s} seconds (at
        once when 0).  Stopping a job that is already stopping shortens the
        grace period, never lengthens it.
        """
        if self.is_final:
            return
        if self._stop_reason is None:
            self._stop_reason = reason
            self.stopped_by = by
        if grace_s <= 0:
            self._kill_all()
            return
        self._signal_helper(signal.SIGTERM)
        existing = self._timers.get("kill")
        if existing is not None and existing.active():
            if existing.getTime() <= self.manager.reactor.seconds() + grace_s:
                return
            existing.cancel()
        self._timers["kill"] = self.manager.reactor.callLater(grace_s, self._kill_all)

    def _timed_out(self) -> None:
        self._timers.pop("timeout", None)
        log.info("job {job_id} ran past its timeout of {ms} ms", job_id=self.job_id, ms=self.limits.timeout_ms)
        self.stop("timeout", self.manager.config.default_grace_s, reason=JobState.TIMEOUT)

    def send_signal(self, signum: int) -> None:
        """
        Send C{signum} to the running command's process group (through the
        isolation helper, which forwards it); nothing when the job has
        ended.  Only signals the helper forwards may be sent
        (L{jobworker.protocol.messages.SIGNALS_SENT}).
        """
        if self.is_final:
            return
        log.info("job {job_id}: signal {signum} sent", job_id=self.job_id, signum=signum)
        self._signal_helper(signum)

    def _signal_helper(self, signum: int) -> None:
        if self.transport is None or self._helper_status is not None:
            return
        try:
            if self.manager.config.isolate:
                # The helper forwards it to the command's process group.
                self.transport.signalProcess(signum)
            elif self.pid is not None:
                os.killpg(self.pid, signum)
        except (OSError, twisted_error.ProcessExitedAlready):
            pass

    def _kill_all(self) -> None:
        self._timers.pop("kill", None)
        if self.cgroup is not None:
            self.manager._kill_cgroup(self.cgroup, self.job_id)
        self._signal_helper(signal.SIGKILL)

    # -- end -------------------------------------------------------------------

    def _helper_ended(self, exit_code: int | None, signum: int | None) -> None:
        self._helper_status = (exit_code, signum)
        # Whatever the helper left behind goes now: processes that escaped
        # into the background would otherwise hold the pipes open.
        if self.cgroup is not None:
            self.manager._kill_cgroup(self.cgroup, self.job_id)
        elif not self.manager.config.isolate and self.pid is not None:
            # The group outlives its leader while a member lives, and its
            # id is not reused while it does; once it is empty the id is
            # free, but this runs in the callback of the reaping itself.
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
        if self._open_pipes:
            self._timers["eof"] = self.manager.reactor.callLater(EOF_GRACE_S, self._close_pipes)
        self._maybe_finish()

    def _close_pipes(self) -> None:
        self._timers.pop("eof", None)
        for reader in list(self._readers):
            reader.close()

    def _pipe_closed(self) -> None:
        self._open_pipes -= 1
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._helper_status is None or self._open_pipes > 0 or self._finishing:
            return
        self._finishing = True
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._settle()

    def _settle(self) -> None:
        exit_code, signum = self._helper_status or (None, None)
        if self._status_final is not None:
            word, number = self._status_final
            exit_code, signum = (number, None) if word == "exit" else (None, number)
        if self.cgroup is not None:
            self.usage = self._read_usage()
        oom = bool(self.cgroup is not None and self._last_oom)
        if signum:
            self.signal = signum
            self.exit_code = -1
        elif exit_code is not None:
            self.exit_code = exit_code
        self.ended_at = _now_us()
        if self._failed is not None or self.state is JobState.STARTING:
            kind, message = self._failed or ("setup", "the helper ended before the command started")
            self.state = JobState.FAILED
            self.error = message
            code = {
                "not_found": ErrorCode.COMMAND_NOT_FOUND,
                "not_executable": ErrorCode.COMMAND_NOT_EXECUTABLE,
            }.get(kind, ErrorCode.START_FAILED)
            self.exit_code = {"not_found": 127, "not_executable": 126}.get(kind, 125)
            self.signal = 0
            started, self._started = self._started, None
            if started is not None:
                started.errback(Failure(RequestError(f"{message} (job {self.job_id})", code)))
        elif oom:
            self.state = JobState.OOM
            self.error = "killed by the OOM killer at the memory limit"
        elif self._stop_reason is not None:
            self.state = self._stop_reason
            if self._stop_reason is JobState.TIMEOUT:
                self.error = f"ran past its timeout of {self.limits.timeout_ms / 1000:g} s"
        elif signum:
            self.state = JobState.SIGNALED
        else:
            self.state = JobState.EXITED
        self.output.close()
        if self.spool is not None:
            self.spool.seal()
        log.info(
            "job {job_id} ended: {state} exit_code={exit_code} signal={signal}",
            job_id=self.job_id,
            state=self.state.label,
            exit_code=self.exit_code,
            signal=self.signal,
        )
        cgroup, self.cgroup = self.cgroup, None
        removal = self.manager._remove_cgroup(cgroup) if cgroup is not None else defer.succeed(None)
        removal.addBoth(lambda _: self._announce_end())

    def _announce_end(self) -> None:
        self.manager._job_changed(self)
        self.manager._job_ended(self)
        final = self.status()
        waiters, self._ended_waiters = self._ended_waiters, []
        for waiter in waiters:
            waiter.callback(final)

    def _read_usage(self) -> JobUsage:
        try:
            usage = self.cgroup.usage()
        except OSError:
            return self.usage
        self._last_oom = bool(usage.oom_killed)
        return JobUsage(
            cpu_usec=usage.cpu_usec,
            memory_peak_bytes=usage.memory_peak_bytes,
            io_read_bytes=usage.io_read_bytes,
            io_write_bytes=usage.io_write_bytes,
            pids_peak=usage.pids_peak,
        )


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
        # Told of every job removed (see on_removed), in subscription order.
        self._removal_observers: list[Callable[[Job], None]] = []
        self.store = JobStore(config.state_dir)
        self._shutting_down = False
        self._cleanups: set[defer.Deferred[None]] = set()
        # Jobs whose record could not be saved (a full disk), retried every
        # SAVE_RETRY_S seconds: a final state must not read `lost` later.
        self._unsaved: set[uuid.UUID] = set()
        self._save_retry: Any = None
        # The helper's source until start-up compiles it (see startService).
        self.helper_path = ISOLATE_SCRIPT
        self.uids: UidAllocator | None = None
        self._uid_locks: UidLocks | None = None
        self._hidden: list[str] | None = None
        # Bound over every hidden file in a job (see isolate.hide_paths).
        self.inaccessible_file = os.path.join(os.path.realpath(config.state_dir), "inaccessible")

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        try:
            self.store.open()
        except StateDirLocked as exc:
            # Refusing to start beats two servers killing each other's jobs.
            log.critical("{error}", error=str(exc))
            self.reactor.callWhenRunning(self.reactor.stop)
            raise SystemExit(str(exc)) from None
        # Python recompiles a script named on its command line on every run;
        # running the helper's bytecode saves each job ~5 ms and ~1.3 MiB.
        self.helper_path = compiled_helper(self.store.state_dir)
        if self.cgroups is not None:
            self.cgroups.prepare()
            removed = self.cgroups.cleanup_stale()
            for name in removed:
                log.warn("removed cgroup {name} left by an earlier server", name=name)
        for record in self.store.load():
            job = self._job_from_record(record)
            if record.problems:
                # Nothing in a damaged record is trusted to say how the job
                # ended.  The file stays as it is, for an operator to look
                # at, until the job is removed.
                job.state = JobState.LOST
                job.error = "damaged job record: " + "; ".join(record.problems)
            elif not job.is_final:
                job.state = JobState.LOST
                job.ended_at = _now_us()
                job.error = "the server stopped while the job was running"
                self._job_changed(job)
                log.warn("job {job_id} was running when the server died: lost", job_id=job.job_id)
            self.jobs[job.job_id] = job
        self._prune()
        if self.config.job_user is None and self.config.job_uids is not None:
            try:
                self._uid_locks = UidLocks(self.config.uid_lock_dir)
            except OSError as exc:
                raise SystemExit(f"jobworker: cannot make {self.config.uid_lock_dir}: {exc}") from None
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
        wait until each has ended and its cgroup is gone.
        """
        super().stopService()
        self._shutting_down = True
        running = [job for job in self.jobs.values() if not job.is_final]
        ends = []
        for job in running:
            ends.append(job.when_ended())
            job.stop("shutdown", self.config.default_grace_s)
        log.info("stopping {count} running jobs", count=len(running))
        every_end = defer.DeferredList(ends, consumeErrors=True)
        every_end.addCallback(lambda _: defer.DeferredList(list(self._cleanups), consumeErrors=True))
        every_end.addCallback(lambda _: self._release_cgroups())
        every_end.addCallback(lambda _: self._uid_locks.close() if self._uid_locks is not None else None)
        every_end.addCallback(lambda _: self._save_unsaved(final=True))
        every_end.addCallback(lambda _: self.store.close())
        return every_end

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
        self._check_verdict(authorize(identity, Operation.START))
        if isinstance(request.limits, InvalidLimits):
            raise RequestError(f"invalid limits: {request.limits.reason}", ErrorCode.INVALID_LIMITS)
        is_admin = identity.role is Role.ADMIN
        self._check_request(request)
        limits = self._limits_for(request.limits, is_admin)
        user = self._user_for(request.user, is_admin)
        if request.network is Network.HOST and not is_admin:
            raise RequestError("only an admin may use the host network", ErrorCode.PERMISSION_DENIED)
        running = sum(1 for job in self.jobs.values() if job.owner == identity.name and not job.is_final)
        if running >= self.config.max_jobs_per_identity:
            raise RequestError(
                f"{identity.name} already has {running} running jobs (the limit)", ErrorCode.TOO_MANY_JOBS
            )
        job_id = uuid.uuid4()
        # First of all that the job holds, so that running out makes nothing.
        dynamic_uid = self._allocate_uid(job_id, user)
        try:
            spool = FileSpool(self.store.spool_path(job_id))
        except OSError as exc:
            self._forget_uid(dynamic_uid)
            raise self._resource_error(job_id, "create its output spool", exc) from None
        except BaseException:
            self._forget_uid(dynamic_uid)
            raise
        output = OutputLog(spool, ring_size=self.config.ring_size, retention=self.config.retention)
        job = Job(self, job_id, identity.name, request, limits, user, output, spool)
        try:
            helper_config = self._helper_config(job, request, dynamic_uid)
            if self.cgroups is not None:
                try:
                    job.cgroup = self.cgroups.create(str(job_id), self._enforceable(limits, request.limits))
                except RequestError:
                    raise
                except (OSError, JobworkerError) as exc:
                    log.error("job {job_id}: cannot make its cgroup: {error}", job_id=job_id, error=exc)
                    raise RequestError(f"cannot set up the job's cgroup: {exc}", ErrorCode.START_FAILED) from None
                helper_config["cgroup_procs"] = list(job.cgroup.procs_files)
            else:
                self._refuse_unenforceable(request.limits)
            self.jobs[job_id] = job
            try:
                self.store.save(job)
            except OSError as exc:
                raise self._resource_error(job_id, "save its record", exc) from None
            try:
                started = job.spawn(self.reactor, helper_config)
            except OSError as exc:
                raise self._resource_error(job_id, "spawn it", exc) from None
        except Exception:
            self.jobs.pop(job_id, None)
            if job.cgroup is not None:
                self._remove_cgroup(job.cgroup)
            spool.remove()
            self.store.forget(job_id)
            self._forget_uid(dynamic_uid)
            raise
        log.info(
            "job {job_id} starting for {owner}: {argv}",
            job_id=job_id,
            owner=log_value(identity.name),
            argv=log_excerpt(list(job.argv)),
        )
        return started

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
            self._check_verdict(Verdict.DENIED)
        job = self.jobs.get(job_id)
        if job is None:
            raise RequestError(f"no job {job_id}", ErrorCode.NOT_FOUND)
        verdict = authorize(identity, operation, job.owner)
        if verdict is Verdict.NOT_FOUND:
            raise RequestError(f"no job {job_id}", ErrorCode.NOT_FOUND)
        self._check_verdict(verdict)
        return job

    def list(self, identity: Identity) -> list[Job]:
        self._check_verdict(authorize(identity, Operation.LIST))
        jobs = [job for job in self.jobs.values() if may_see(identity, job.owner)]
        return sorted(jobs, key=lambda job: job.created_at)

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
        if job.spool is not None:
            job.spool.seal()
        # A directory in the spool's place is logged and left (discard).
        discard(self.store.spool_path(job.job_id))
        self.store.forget(job.job_id)
        job.output._notify()
        for observer in list(self._removal_observers):
            try:
                observer(job)
            except Exception:
                log.failure("while telling of the removal of job {job_id}", job_id=job.job_id)

    # -- internals -------------------------------------------------------------

    @staticmethod
    def _check_verdict(verdict: Verdict) -> None:
        if verdict is Verdict.DENIED:
            raise RequestError("permission denied", ErrorCode.PERMISSION_DENIED)
        if verdict is Verdict.NOT_FOUND:
            raise RequestError("no such job", ErrorCode.NOT_FOUND)

    @staticmethod
    def _check_request(request: StartRequest) -> None:
        if not request.argv or not request.argv[0]:
            raise RequestError("empty command", ErrorCode.BAD_REQUEST)
        argv_bytes = sum(len(arg.encode()) + 1 for arg in request.argv)
        if len(request.argv) > MAX_ARGV_ITEMS or argv_bytes > MAX_ARGV_BYTES:
            raise RequestError(
                f"command line too long ({len(request.argv)} arguments, {argv_bytes} bytes; "
                f"at most {MAX_ARGV_ITEMS} and {MAX_ARGV_BYTES})",
                ErrorCode.BAD_REQUEST,
            )
        env_bytes = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in request.env)
        if len(request.env) > MAX_ENV_ITEMS or env_bytes > MAX_ENV_BYTES:
            raise RequestError(
                f"environment too large ({len(request.env)} variables, {env_bytes} bytes; "
                f"at most {MAX_ENV_ITEMS} and {MAX_ENV_BYTES})",
                ErrorCode.BAD_REQUEST,
            )
        for item in (*request.argv, *(k for k, _ in request.env), *(v for _, v in request.env), request.workdir, request.user):
            if "\0" in item:
                raise RequestError("NUL byte in the command, environment, workdir or user", ErrorCode.BAD_REQUEST)
        for key, _ in request.env:
            if not key or "=" in key:
                raise RequestError(f"bad environment variable name {key[:64]!r}", ErrorCode.BAD_REQUEST)
        if request.workdir and not request.workdir.startswith("/"):
            raise RequestError("workdir must be an absolute path", ErrorCode.BAD_REQUEST)

    def _limits_for(self, requested: Limits, is_admin: bool) -> Limits:
        """
        The limits a job gets: what was asked, the server's defaults for the
        rest, and for a non-admin the caps: asking above a cap is refused,
        and a default above a cap (or no default where a cap exists)
        becomes the cap.
        """
        limits = requested.with_defaults(self.config.default_limits)
        if is_admin:
            return limits
        over = requested.describe_above(self.config.caps)
        if over:
            raise RequestError(f"limits above what this server allows a non-admin: {over}", ErrorCode.INVALID_LIMITS)
        return limits.capped(self.config.caps)

    def _enforceable(self, limits: Limits, requested: Limits) -> Limits:
        """
        Drop the server's default limits that this host cannot enforce (they
        are logged at start-up); a limit the client asked for stays, so the
        driver refuses it with a clear error.
        """
        controllers = self.cgroups.controllers
        dropped = {
            name: 0
            for name, controller in LIMIT_CONTROLLERS.items()
            if controller not in controllers and not getattr(requested, name)
        }
        return replace(limits, **dropped)

    def _refuse_unenforceable(self, requested: Limits) -> None:
        resource_limits = replace(requested, timeout_ms=0)
        if not resource_limits.is_empty():
            raise RequestError(
                "this server has no cgroup support, so it cannot enforce the requested limits",
                ErrorCode.UNSUPPORTED_LIMIT,
            )

    def _user_for(self, requested: str, is_admin: bool) -> str:
        """
        The account the job runs as: C{""} for a uid of its own.
        """
        if self.uids is not None:
            default = ""
        else:
            default = self.config.job_user or pwd.getpwuid(os.getuid()).pw_name
        if not requested or requested == default:
            return default
        if not is_admin:
            raise RequestError("only an admin may choose the job user", ErrorCode.PERMISSION_DENIED)
        return requested

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
        log.debug("job {job_id} gets uid {uid}", job_id=job_id, uid=uid)
        return uid

    def _forget_uid(self, uid: int | None) -> None:
        if uid is not None and self.uids is not None:
            self.uids.forget(uid)

    def _release_uid(self, job: Job) -> None:
        # Every job that held a uid of its own ends here, failed starts too.
        if self.uids is not None and self.uids.holder_of(job.uid) == str(job.job_id):
            self.uids.release(job.uid)

    def _helper_config(self, job: Job, request: StartRequest, dynamic_uid: int | None = None) -> dict[str, Any]:
        isolate = self.config.isolate
        scratch = self.config.scratch_bytes if isolate else 0
        if dynamic_uid is not None:
            uid = gid = dynamic_uid
            job.uid = dynamic_uid
            # The only place such a job can write (see read_only_root).
            home = "/tmp" if scratch else "/"
        else:
            try:
                entry = pwd.getpwnam(job.user)
            except KeyError:
                raise RequestError(f"no such user: {job.user}", ErrorCode.START_FAILED) from None
            uid, gid = entry.pw_uid, entry.pw_gid
            job.uid = entry.pw_uid
            if uid == os.getuid() and gid == os.getgid():
                uid = gid = None
            home = entry.pw_dir or "/"
        env = dict(DEFAULT_ENV, HOME=home)
        env.update(dict(request.env))
        config: dict[str, Any] = {
            "argv": list(job.argv),
            "env": env,
            "cwd": job.workdir,
            "uid": uid,
            "gid": gid,
            "cgroup_procs": [],
            "isolate": isolate,
            "network": "host" if job.network is Network.HOST else "none",
            "no_new_privs": True,
            # Keyrings are in no namespace: without these a job could read
            # the server's session keyring and what other jobs put there,
            # and find keys that an earlier job with its uid left behind.
            # Not for a server without root: its jobs run as its own user,
            # who may reach its keyrings anyway, and each keyring would
            # cost that user one of its 200 keys (keyrings(7) quota).
            "session_keyring": os.geteuid() == 0,
            "clear_user_keyrings": dynamic_uid is not None,
        }
        if isolate:
            config.update(
                scratch_bytes=scratch,
                private_sys=self.config.private_sys,
                # A uid of its own can write only where everyone can: keep
                # it out of the host's shared places, where a later job with
                # the same uid (or any job) could read what it left.
                read_only_root=dynamic_uid is not None,
                hide=self._hidden_paths(),
                inaccessible_file=self.inaccessible_file,
            )
        return config

    def _hidden_paths(self) -> list[str]:
        """
        The state dir (every job's records and output, the helper) and the
        configured paths, resolved: a mount follows symbolic links.
        """
        if self._hidden is None:
            # Resolved once: the paths are the server's own, and stay put.
            paths = [self.store.state_dir, *self.config.hidden_paths]
            self._hidden = list(dict.fromkeys(os.path.realpath(path) for path in paths))
        return self._hidden

    def _kill_cgroup(self, cgroup: Any, job_id: uuid.UUID) -> defer.Deferred[None]:
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

    def _remove_cgroup(self, cgroup: Any) -> defer.Deferred[None]:
        removal = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), cgroup.remove)
        removal.addErrback(
            lambda f: log.failure("could not remove cgroup {cgroup}", f, cgroup=getattr(cgroup, "path_description", cgroup))
        )
        self._cleanups.add(removal)
        removal.addBoth(lambda _: self._cleanups.discard(removal))
        return removal

    def _job_changed(self, job: Job) -> None:
        self._unsaved.discard(job.job_id)
        try:
            self.store.save(job)
        except OSError as exc:
            log.error(
                "could not save job {job_id}: {error}; retrying every {interval} s",
                job_id=job.job_id,
                error=exc.strerror or exc,
                interval=SAVE_RETRY_S,
            )
            self._unsaved.add(job.job_id)
            if self._save_retry is None or not self._save_retry.active():
                self._save_retry = self.reactor.callLater(SAVE_RETRY_S, self._save_unsaved)

    def _save_unsaved(self, final: bool = False) -> None:
        """
        Save again the records that could not be saved; logged once per job
        when it succeeds (and, at shutdown, when it still fails).
        """
        self._save_retry = None
        for job_id in sorted(self._unsaved):
            job = self.jobs.get(job_id)
            if job is None:
                self._unsaved.discard(job_id)
                continue
            try:
                self.store.save(job)
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
            self._save_retry = self.reactor.callLater(SAVE_RETRY_S, self._save_unsaved)
        if final and self._save_retry is not None and self._save_retry.active():
            self._save_retry.cancel()

    def _job_ended(self, job: Job) -> None:
        self._release_uid(job)
        self._prune()

    def _prune(self) -> None:
        finished = [job for job in self.jobs.values() if job.is_final]
        excess = len(finished) - self.config.max_finished_jobs
        if excess > 0:
            for job in sorted(finished, key=lambda job: job.ended_at)[:excess]:
                self.remove(job)

    def _job_from_record(self, record: LoadedRecord) -> Job:
        status: JobStatus = record.status
        request = StartRequest(
            request_id=0,
            argv=status.argv,
            env=tuple(record.env),
            workdir=status.workdir,
            user=status.user,
            network=status.network,
            limits=status.limits,
        )
        path = self.store.spool_path(status.job_id)
        spool: FileSpool | None
        try:
            spool = FileSpool(path, create=False)
            output = OutputLog.from_spool(spool, ring_size=self.config.ring_size, expected_end=status.output_bytes)
        except OSError as exc:
            spool = None
            output = OutputLog.from_spool(MemorySpool(), expected_end=status.output_bytes)
            if status.output_bytes:
                output.damage = f"output spool {path} cannot be read: {exc.strerror or exc}"
        if output.damage is not None:
            log.error("job {job_id}: {damage}; readers get a gap there", job_id=status.job_id, damage=output.damage)
        job = Job(self, status.job_id, status.owner, request, status.limits, status.user, output, spool)
        job._started = None
        for name in ("state", "exit_code", "signal", "created_at", "started_at", "ended_at", "error", "stopped_by", "usage", "uid"):
            setattr(job, name, getattr(status, name))
        return job
