"""
One job: its spec, its helper process, its output and its fate.

The phases of its processes are the state machine of
L{jobworker.jobs.lifecycle}; the wire state (L{JobState}) follows from them
and from what the helper said (L{jobworker.jobs.fate}).  A stop sends
SIGTERM (the helper forwards it to the command's process group) and, after
the grace period, SIGKILL to every process of the job's cgroup.  Timers run
on the host's reactor, so the tests drive them with a fake clock.
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any, Protocol

from twisted.internet import defer, error as twisted_error
from twisted.python.failure import Failure

from jobworker.errors import RequestError
from jobworker.jobs.config import JobManagerConfig
from jobworker.jobs.fate import decide_fate
from jobworker.jobs.helper import StatusLine, spawn_helper
from jobworker.jobs.lifecycle import Event, LifeCycle, Phase
from jobworker.jobs.pipes import OutputPump
from jobworker.jobs.report import error_text, now_us, read_usage
from jobworker.jobs.spec import JobSpec
from jobworker.jobs.timers import JobTimers
from jobworker.limits import Limits
from jobworker.logs import Logger
from jobworker.output.log import OutputLog
from jobworker.output.spool import FileSpool
from jobworker.protocol.messages import UID_UNKNOWN, JobState, JobStatus, JobUsage, Network

__all__ = ["EOF_GRACE_S", "Job", "JobHost"]

log = Logger()

# After the helper ends, wait this long for the pipes' EOF before closing
# them ourselves (a process that escaped the job could hold them open).
EOF_GRACE_S = 2.0

class JobHost(Protocol):
    """
    What a job needs of the server that runs it (the L{JobManager}).
    """

    reactor: Any
    config: JobManagerConfig
    helper_path: str

    def job_changed(self, job: Job) -> None:
        """Save the job's record: its state changed."""

    def job_ended(self, job: Job) -> None:
        """The job is final and its waiters are told."""

    def kill_cgroup(self, cgroup: Any, job_id: uuid.UUID) -> defer.Deferred[None]:
        """SIGKILL every process of the cgroup, off the reactor thread."""

    def remove_cgroup(self, cgroup: Any) -> defer.Deferred[None]:
        """Remove the (empty) cgroup, off the reactor thread."""


class Job:
    """
    One job: its spec, its helper process, its output and its fate.
    """

    def __init__(
        self,
        manager: JobHost,
        job_id: uuid.UUID,
        spec: JobSpec,
        output: OutputLog,
        spool: FileSpool | None,
    ) -> None:
        self.manager = manager
        self.job_id = job_id
        self.spec = spec
        # An attribute, not a property of the spec: listing pages read it
        # (jobworker.protocol.listing.ListedJob).
        self.owner = spec.owner
        # Attributes too, for the same reason (list filters).
        self.name = spec.name
        self.labels = spec.labels
        # The uid the command runs as; UID_UNKNOWN until known.
        self.uid = UID_UNKNOWN
        self.output = output
        self.spool = spool
        self.times: FileSpool | None = None  # the times file (jobworker.output.log)
        self.state = JobState.STARTING
        self.exit_code = -1
        self.signal = 0
        self.created_at = now_us()
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
        # The phase of its processes (see jobworker.jobs.lifecycle); what
        # each transition learnt is kept beside it.
        self.life = LifeCycle()
        self._started: defer.Deferred[Job] | None = defer.Deferred()
        self._ended_waiters: list[defer.Deferred[JobStatus]] = []
        # FINAL_LINE: ("exit"|"signal", n), the command's end, from the helper.
        self._final_line: tuple[str, int] | None = None
        # HELPER_ENDED: the helper's own exit code and signal.
        self._helper_exit: tuple[int | None, int | None] = (None, None)
        # FAILED_LINE: (kind, message).
        self._start_failure: tuple[str, str] | None = None
        # STOP: the state a stop ends the job in (the first stop's).
        self._stop_reason: JobState | None = None
        self._timers = JobTimers(manager.reactor)
        self._last_oom = False  # from the last usage read of the cgroup
        self.pipes = OutputPump(manager.reactor, job_id, output, spool, self._maybe_finish)

    def restore(self, status: JobStatus) -> None:
        """
        Take the fate a job record tells, for a job of an earlier server:
        its processes are gone, so its life cycle is over (a record that
        says otherwise is marked lost by the manager).
        """
        self.life = LifeCycle(Phase.ENDED)
        self._started = None
        for name in ("state", "exit_code", "signal", "created_at", "started_at", "ended_at", "error", "stopped_by", "usage", "uid"):
            setattr(self, name, getattr(status, name))

    # -- queries ---------------------------------------------------------------

    @property
    def argv(self) -> tuple[str, ...]:
        return self.spec.argv

    @property
    def env(self) -> tuple[tuple[str, str], ...]:
        return self.spec.env

    @property
    def workdir(self) -> str:
        return self.spec.workdir

    @property
    def network(self) -> Network:
        return self.spec.network

    @property
    def user(self) -> str:
        return self.spec.user

    @property
    def limits(self) -> Limits:
        return self.spec.limits

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
            error=error_text(self.error, self.output),
            stopped_by=self.stopped_by,
            limits=self.limits,
            usage=usage,
            output_bytes=self.output.end,
            workdir=self.workdir,
            user=self.user,
            network=self.network,
            uid=self.uid,
            name=self.name,
            labels=self.labels,
        )

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

    def spawn(self, reactor: Any, helper_config: dict[str, object]) -> defer.Deferred[Job]:
        """
        Start the job's helper with C{helper_config}; the Deferred fires when
        the command runs, or fails with the L{RequestError} saying why not.

        @raise OSError: the helper could not be started.
        """
        self.transport, read_ends = spawn_helper(reactor, self.manager.helper_path, self, helper_config, self.job_id)
        self.pid = self.transport.pid
        self.pipes.attach(read_ends)
        assert self._started is not None
        return self._started

    def helper_status(self, status: StatusLine) -> None:
        """
        One line from the helper's status pipe.  A line the contract does
        not allow where it comes is logged and dropped: the helper shares
        its namespace with the job's code, which is not ours.
        """
        if status.event is None:
            return
        if not self.life.allows(status.event):
            log.warn(
                "job {job_id}: status line {line!r} out of turn (phase {phase}); ignored",
                job_id=self.job_id,
                line=status.line,
                phase=self.life.phase.value,
            )
            return
        self.life.fire(status.event)
        if status.event is Event.STARTED:
            self._now_running()
        elif status.event is Event.FAILED_LINE:
            self._start_failure = status.failure
        elif status.event is Event.FINAL_LINE:
            self._final_line = status.final

    def helper_status_closed(self) -> None:
        """
        The status pipe reached EOF.  Without isolation, the helper's exec
        closes it (close-on-exec): EOF with no failure means the command is
        running.  An isolated helper closes it only as it ends, and says
        C{started} first if the command runs: EOF alone means nothing until
        the helper's end tells how it went (L{jobworker.jobs.lifecycle}).
        """
        event = Event.STATUS_EOF if self.manager.config.isolate else Event.EXEC_EOF
        was = self.life.phase
        if self.life.allows(event):
            self.life.fire(event)
        if was is Phase.STARTING and self.life.phase is Phase.RUNNING:
            self._now_running()

    def _now_running(self) -> None:
        self.state = JobState.RUNNING
        self.started_at = now_us()
        self.manager.job_changed(self)
        timeout_s = self.spec.timeout_s
        if timeout_s is not None:
            self._timers.start("timeout", timeout_s, self._timed_out)
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
        self.life.fire(Event.STOP)
        if self._stop_reason is None:
            self._stop_reason = reason
            self.stopped_by = by
        if grace_s <= 0:
            self._kill_all()
            return
        self._signal_helper(signal.SIGTERM)
        self._timers.start_by("kill", grace_s, self._kill_all)

    def detach(self) -> None:  # lead implements
        """
        Let go of the running job without stopping it (live restore): its
        supervisor keeps it running for the next server.
        """
        raise NotImplementedError("Job.detach: live restore is not built yet")

    def _timed_out(self) -> None:
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
        if self.transport is None or not self.life.phase.is_alive:
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
        if self.cgroup is not None:
            self.manager.kill_cgroup(self.cgroup, self.job_id)
        self._signal_helper(signal.SIGKILL)

    # -- end -------------------------------------------------------------------

    def helper_ended(self, exit_code: int | None, signum: int | None) -> None:
        """
        The helper was reaped, with this exit code or signal.
        """
        self.life.fire(Event.HELPER_ENDED)
        self._helper_exit = (exit_code, signum)
        # Whatever the helper left behind goes now: processes that escaped
        # into the background would otherwise hold the pipes open.
        if self.cgroup is not None:
            self.manager.kill_cgroup(self.cgroup, self.job_id)
        elif not self.manager.config.isolate and self.pid is not None:
            # The group outlives its leader while a member lives, and its
            # id is not reused while it does; once it is empty the id is
            # free, but this runs in the callback of the reaping itself.
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
        if self.pipes.open_count:
            self._timers.start("eof", EOF_GRACE_S, self.pipes.close_all)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        # Called when the helper ended and whenever a pipe closes.
        if self.life.phase is not Phase.DRAINING or self.pipes.open_count > 0:
            return
        self.life.fire(Event.OUTPUT_CLOSED)
        self._timers.cancel_all()
        self.pipes.cancel_retry()
        self._settle()

    def _settle(self) -> None:
        if self.cgroup is not None:
            self.usage = self._read_usage()
        fate = decide_fate(
            helper_exit=self._helper_exit,
            final_line=self._final_line,
            start_failure=self._start_failure,
            started=self.state is not JobState.STARTING,
            oom=bool(self.cgroup is not None and self._last_oom),
            stop_reason=self._stop_reason,
            timeout_ms=self.limits.timeout_ms,
        )
        self.ended_at = now_us()
        self.state, self.exit_code, self.signal, self.error = fate.state, fate.exit_code, fate.signal, fate.error
        if fate.start_error is not None:
            started, self._started = self._started, None
            if started is not None:
                started.errback(Failure(RequestError(f"{fate.error} (job {self.job_id})", fate.start_error)))
        self.output.close()
        if self.spool is not None:
            self.spool.seal()
        if self.times is not None:
            self.times.seal()
        log.info(
            "job {job_id} ended: {state} exit_code={exit_code} signal={signal}",
            job_id=self.job_id,
            state=self.state.label,
            exit_code=self.exit_code,
            signal=self.signal,
        )
        cgroup, self.cgroup = self.cgroup, None
        removal = self.manager.remove_cgroup(cgroup) if cgroup is not None else defer.succeed(None)
        removal.addBoth(lambda _: self._announce_end())

    def _announce_end(self) -> None:
        self.life.fire(Event.SETTLED)
        self.manager.job_changed(self)
        self.manager.job_ended(self)
        final = self.status()
        waiters, self._ended_waiters = self._ended_waiters, []
        for waiter in waiters:
            waiter.callback(final)

    def _read_usage(self) -> JobUsage:
        # What was read last when the cgroup cannot be read now.
        reading = read_usage(self.cgroup)
        if reading is None:
            return self.usage
        self._last_oom = reading.oom
        return reading.usage
