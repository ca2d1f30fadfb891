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
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.python.failure import Failure

from jobworker.errors import RequestError
from jobworker.host import contract
from jobworker.jobs.config import JobManagerConfig
from jobworker.jobs.fate import decide_fate
from jobworker.jobs.helper import StatusLine, parse_status_line, spawn_helper
from jobworker.jobs.lifecycle import Event, LifeCycle, Phase
from jobworker.jobs.pipes import OutputPump
from jobworker.jobs.report import error_text, now_us, read_usage
from jobworker.jobs.spec import JobSpec
from jobworker.jobs.supervisor import BacklogReader, SupervisorLink, Zygote, spawn_supervised
from jobworker.jobs.timers import JobTimers
from jobworker.limits import Limits
from jobworker.logs import Logger
from jobworker.output.log import OutputLog
from jobworker.output.spool import FileSpool
from jobworker.protocol.messages import UID_UNKNOWN, JobState, JobStatus, JobUsage, Network


def _has_content(path: str) -> bool:
    try:
        return os.stat(path).st_size > 0
    except OSError:
        return False


def protocol_factory(link: SupervisorLink) -> Any:
    """
    A factory that builds C{link} once (to adopt a connected socket).
    """
    from twisted.internet.protocol import Factory

    factory = Factory()
    factory.buildProtocol = lambda addr: link  # type: ignore[method-assign]
    return factory

__all__ = ["CGROUP_KILL_AFTER_S", "EOF_GRACE_S", "Job", "JobHost"]

log = Logger()

# After the helper ends, wait this long for the pipes' EOF before closing
# them ourselves (a process that escaped the job could hold them open).
EOF_GRACE_S = 2.0
# A SIGKILL through a job's supervisor ends the job in milliseconds; the
# job's cgroup is killed too if it has not ended this long after.
CGROUP_KILL_AFTER_S = 1.0

class JobHost(Protocol):
    """
    What a job needs of the server that runs it (the L{JobManager}).
    """

    reactor: Any
    config: JobManagerConfig
    helper_path: str
    zygote: Zygote | None

    def job_changed(self, job: Job) -> None:
        """Save the job's record: its state changed."""

    def job_ended(self, job: Job) -> None:
        """The job is final and its waiters are told."""

    def kill_cgroup(self, cgroup: Any, job_id: uuid.UUID) -> defer.Deferred[None]:
        """SIGKILL every process of the cgroup, off the reactor thread."""

    def remove_cgroup(self, cgroup: Any) -> defer.Deferred[None]:
        """Remove the (empty) cgroup, off the reactor thread."""

    def in_turn(self, call: Callable[[], object]) -> None:
        """Call C{call} in a later turn of the reactor, a few such calls a turn."""

    def socket_path(self, job_id: uuid.UUID) -> str:
        """Where the job's supervisor listens."""

    def backlog_path(self, job_id: uuid.UUID) -> str:
        """The output its supervisor kept while no server ran."""

    def end_path(self, job_id: uuid.UUID) -> str:
        """Its supervisor's end record."""

    def supervisor_files_done(self, job_id: uuid.UUID) -> None:
        """The job's end is settled: its supervisor's files may go."""

    def connect_supervisor(self, job: Job) -> None:
        """Connect (again) to the job's supervisor on its socket."""


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
        # A supervised (isolated) job's supervisor: the link to it while
        # connected, and its format and pid (saved in the record).
        self.link: SupervisorLink | None = None
        self.supervisor: dict[str, int] | None = None
        self._supervisor_lost = False  # it went without telling the job's end
        self._detached = False  # left running for the next server (live restore)
        self._ingesting = False  # reading the supervisor's backlog
        self._ended_at_hint = 0  # when the job ended, if it ended while no server ran
        self._reconnected = False  # connected again once after losing its supervisor's connection
        self._settle_queued = False  # its processes and output are done with; it settles in a turn of its own
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

    def status(self, *, live: bool = True) -> JobStatus:
        """
        @param live: read a running job's usage from its cgroup now (else
            the last one read: a record does not need it).
        """
        usage = self.usage
        if live and not self.is_final and self.cgroup is not None:
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
        if not self.manager.config.isolate:
            self.transport, read_ends = spawn_helper(reactor, self.manager.helper_path, self, helper_config, self.job_id)
            self.pid = self.transport.pid
            self.pipes.attach(read_ends)
        else:
            config = dict(
                helper_config,
                **contract.helper_config(
                    supervise=True,
                    timeout_ms=self.limits.timeout_ms,
                    grace_ms=int(self.manager.config.default_grace_s * 1000),
                    retention=self.output.retention,
                ),
            )
            self.transport, ours = spawn_supervised(
                reactor, self.manager.helper_path, config, self.job_id, self.manager, self.manager.zygote
            )
            self.pid = self.transport.pid if self.transport is not None else None
            try:
                self.connect(ours)
            finally:
                ours.close()
        assert self._started is not None
        return self._started

    # -- the supervisor ------------------------------------------------------------

    def new_link(self) -> SupervisorLink:
        """
        A link to the job's supervisor, which this job then listens to.
        """
        link = SupervisorLink(self.manager.reactor, self, self.job_id, lambda: self.output.stored_end)
        self.link = link
        self.pipes.attach_relay(link.pause, link.resume)
        return link

    def connect(self, sock: Any) -> None:
        """
        Talk to the supervisor over C{sock}, a connected socket (which the
        caller then closes: the reactor has its own copy).
        """
        link = self.new_link()
        factory = protocol_factory(link)
        self.manager.reactor.adoptStreamConnection(sock.fileno(), sock.family, factory)

    def take_back(self, status: JobStatus, supervisor: dict[str, int]) -> None:
        """
        Become the job a record tells of, still running under its
        supervisor (of an earlier server): the supervisor's hello then says
        what happened meanwhile.
        """
        for name in ("state", "created_at", "started_at", "stopped_by", "usage", "uid"):
            setattr(self, name, getattr(status, name))
        self.supervisor = dict(supervisor)
        self._started = None
        # Its status lines come again in the hello, from the first.
        self.life = LifeCycle()

    def supervisor_hello(self, hello: dict[str, Any]) -> None:
        """
        The supervisor said hello: on a take-back, catch up with what it
        says happened, and read its backlog before any newer output.
        """
        pid, format_ = hello.get("pid"), hello.get("format")
        if isinstance(pid, int) and isinstance(format_, int):
            self.supervisor = {"format": format_, "pid": pid}
        lines = hello.get("lines")
        if isinstance(lines, list) and self.life.phase is Phase.STARTING and self._started is None:
            started_at = hello.get("started_at")
            for line in lines:
                if isinstance(line, str):
                    self.supervisor_line(line)
            if isinstance(started_at, int) and started_at > 0:
                self.started_at = started_at
        backlog = hello.get("backlog")
        link = self.link
        if backlog is not None and link is not None:
            link.pause("backlog")
            self.read_backlog(lambda: link.resume("backlog"))

    def read_backlog(self, then: Any) -> None:
        """
        Read the supervisor's backlog into the output log, a step per turn
        of the reactor (waiting while the spool is congested); then call
        C{then()}.
        """
        reader = BacklogReader(self.manager.backlog_path(self.job_id))
        self._ingesting = True

        def step() -> None:
            if self.output.closed:
                reader.close()
                self._ingesting = False
                return
            if self.spool is not None and self.spool.congested:
                self.manager.reactor.callLater(0.05, step)
                return
            chunks = reader.step()
            if chunks is None:
                if reader.damage is not None:
                    log.error("job {job_id}: {damage}; readers get a gap there", job_id=self.job_id, damage=reader.damage)
                self._ingesting = False
                then()
                return
            for fd, offset, data in chunks:
                self.supervisor_output(fd, offset, data)
            self.manager.reactor.callLater(0, step)

        step()

    def supervisor_line(self, line: str) -> None:
        if line == contract.TIMEOUT:
            self._supervisor_timed_out()
            return
        try:
            status = parse_status_line(line)
        except ValueError:
            log.warn("job {job_id}: bad status line {line!r}", job_id=self.job_id, line=line)
            return
        self.helper_status(status)

    def supervisor_output(self, fd: int, offset: int, data: bytes) -> None:
        """
        A chunk of output at C{offset}: what the log has already (a backlog
        overlapping the spool) is skipped; what it lacks before it is a gap.
        """
        output = self.output
        if output.closed:
            return
        end = output.end
        if offset + len(data) <= end:
            return
        if offset < end:
            data = data[end - offset :]
        elif offset > end:
            log.warn("job {job_id}: {count} bytes of output were lost", job_id=self.job_id, count=offset - end)
            output.skip_to(offset)
        self.pipes.received(fd, data)

    def supervisor_output_closed(self) -> None:
        self.pipes.relay_closed()

    def supervisor_gone(self, end: tuple[int, int] | None, *, final: bool = False) -> None:
        """
        The supervisor's socket closed: after the job's end it told
        (C{end}), or without it: the supervisor died, and the job with it
        (its init has a parent-death signal).
        """
        self.link = None
        if self._detached or self.is_final or self.life.phase in (Phase.SETTLING, Phase.ENDED):
            return
        if end is None and not final and not self._reconnected:
            # The connection went without the job's end: the supervisor
            # may live on (it accepts a new server at any time), or have
            # written its end record.  Ask it once before calling it lost.
            self._reconnected = True
            log.warn("job {job_id}: its supervisor's connection closed before the job's end; connecting again", job_id=self.job_id)
            self.manager.connect_supervisor(self)
            return
        if end is not None and not self._ingesting and _has_content(self.manager.backlog_path(self.job_id)):
            # A supervisor that ended without our acknowledgement of its last
            # output wrote it to its backlog: read that first.
            self.read_backlog(lambda: self._supervisor_ended(end))
            return
        self._supervisor_ended(end)

    def _supervisor_ended(self, end: tuple[int, int] | None) -> None:
        self.pipes.relay_closed()
        if end is None:
            self._supervisor_lost = True
            exit_code, signum = None, None
        else:
            code, signum_ = end
            exit_code, signum = (None, signum_) if signum_ else (code, None)
        if self.life.allows(Event.STATUS_EOF):
            self.life.fire(Event.STATUS_EOF)
        self.helper_ended(exit_code, signum)

    def supervisor_ended_unseen(self, record: dict[str, Any]) -> None:
        """
        The job ended while no server ran: take its end from the
        supervisor's end record, and its output from the backlog.
        """
        self.supervisor_hello(dict(record, backlog=None))

        def done() -> None:
            exit_ = record.get("exit")
            if isinstance(exit_, list) and len(exit_) == 2 and all(isinstance(n, int) for n in exit_):
                end: tuple[int, int] | None = (exit_[0], exit_[1])
            else:
                end = None
            ended_at = record.get("ended_at")
            if isinstance(ended_at, int) and ended_at > 0:
                self._ended_at_hint = ended_at
            self._supervisor_ended(end)

        # (Its link never connected: the output comes from the backlog alone.)
        self.link = None
        self.read_backlog(done)

    def _supervisor_timed_out(self) -> None:
        """
        The supervisor stopped the job at its timeout (SIGTERM, and SIGKILL
        after the grace period, its own timers: they count from the job's
        start, whichever server runs).
        """
        log.info("job {job_id} ran past its timeout of {ms} ms", job_id=self.job_id, ms=self.limits.timeout_ms)
        if self.life.allows(Event.STOP):
            self.life.fire(Event.STOP)
        if self._stop_reason is None:
            self._stop_reason = JobState.TIMEOUT
            self.stopped_by = "timeout"
        # The cgroup kill, should the supervisor's own fail.
        self._timers.start_by("kill", self.manager.config.default_grace_s + 1.0, self._kill_all)

    def detach(self) -> None:
        """
        Leave the job running for the next server (live restore): its
        supervisor keeps its output meanwhile.
        """
        self._detached = True
        self._timers.cancel_all()
        self.pipes.cancel_retry()
        if self.link is not None:
            self.link.leave()

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
        if timeout_s is not None and self.supervisor is None and not self.manager.config.isolate:
            # A supervised job's supervisor keeps its timeout.
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
        if not self.life.phase.is_alive:
            return
        if self.link is not None:
            # It forwards it to the job; SIGKILL kills all of it.
            self.link.send_signal(signum)
            return
        if self.pid is None or self.manager.config.isolate:
            return
        try:
            # A direct job's helper became the command, the leader of its
            # own process group.
            os.killpg(self.pid, signum)
        except OSError:
            pass

    def _kill_all(self) -> None:
        if self.cgroup is not None and self.link is not None and self.link.connected_to:
            # The supervisor SIGKILLs the job's init, and the kernel every
            # other process of its PID namespace with it: no process of the
            # job is outside it, and none can fork meanwhile.  Its end says
            # when all are gone, and the cgroup's removal then kills what
            # might be left; the cgroup's own kill (a freeze, a read of its
            # pids, a thaw, a poll: ~2 ms of a pool thread, for each of
            # hundreds of jobs in a mass stop) waits for a supervisor that
            # does not end the job in time.
            self._signal_helper(signal.SIGKILL)
            self._timers.start_by("cgroup-kill", CGROUP_KILL_AFTER_S, self._kill_cgroup)
            return
        self._kill_cgroup()
        self._signal_helper(signal.SIGKILL)

    def _kill_cgroup(self) -> None:
        if self.cgroup is not None:
            self.manager.kill_cgroup(self.cgroup, self.job_id)

    # -- end -------------------------------------------------------------------

    def helper_ended(self, exit_code: int | None, signum: int | None) -> None:
        """
        The helper was reaped, with this exit code or signal.
        """
        self.life.fire(Event.HELPER_ENDED)
        self._helper_exit = (exit_code, signum)
        # Whatever the helper left behind goes now: processes that escaped
        # into the background would otherwise hold the pipes open.  (With
        # every pipe closed the job settles now, and the removal of its
        # cgroup kills what is left.)
        if self.cgroup is not None:
            if self.pipes.open_count:
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
        # Called when the helper ended and whenever a pipe closes.  The job
        # settles in a turn of the reactor of its own (JobHost.in_turn):
        # jobs stopped together end together.
        if self.life.phase is not Phase.DRAINING or self.pipes.open_count > 0 or self._settle_queued:
            return
        self._settle_queued = True
        self._timers.cancel_all()
        self.pipes.cancel_retry()
        self.manager.in_turn(self._settle)

    def _settle(self) -> None:
        self.life.fire(Event.OUTPUT_CLOSED)
        if self.cgroup is not None:
            self.usage = self._read_usage()
        fate = decide_fate(
            supervisor_lost=self._supervisor_lost,
            helper_exit=self._helper_exit,
            final_line=self._final_line,
            start_failure=self._start_failure,
            started=self.state is not JobState.STARTING,
            oom=bool(self.cgroup is not None and self._last_oom),
            stop_reason=self._stop_reason,
            timeout_ms=self.limits.timeout_ms,
        )
        self.ended_at = self._ended_at_hint or now_us()
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
        if self.supervisor is not None:
            self.manager.supervisor_files_done(self.job_id)
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
