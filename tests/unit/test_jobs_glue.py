"""
The job manager's Twisted glue without root, processes or a real reactor:
a fake process reactor plays the isolation helper (its status lines, its
output, its end) and L{MemoryReactorClock} is the clock, as Twisted's
procmon tests do (C{twisted/runner/test/test_procmon.py}).

What is real: the job manager, its jobs, the state directory, the output
pipes (a fake helper writes into the very pipes a real one would inherit).
"""

from __future__ import annotations

import errno
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from jobworker.errors import ErrorCode, RequestError
from jobworker.host import contract
from jobworker.host.cgroups import Usage
from jobworker.jobs.job import CGROUP_KILL_AFTER_S, Job
from jobworker.jobs.manager import ENDS_PER_TURN, JobManager, JobManagerConfig
from jobworker.limits import Limits
from jobworker.policy import Identity, Role
from jobworker.protocol.messages import JobState, StartRequest
from tests.support import one_turn

ADMIN = Identity("admin", Role.ADMIN)
GRACE_S = 5.0


class FakeHelper:
    """
    The supervisor of one isolated job (the process transport the server
    gets, and the server's end of its socket), played by the test: it
    records its configuration and the signals the server sends it, and
    speaks the supervisor's frames (its status lines, output, end).
    """

    def __init__(self, reactor: FakeProcessReactor, protocol: Any, args: list[str], child_fds: dict[int, Any]) -> None:
        self.reactor = reactor
        self.protocol = protocol
        self.args = args
        self.pid = 0x7FFF_0000 + id(self) % 0xFFFF  # never signalled for real (isolated jobs)
        self.config = bytearray()
        self.stdin_closed = False
        self.ended = False
        self.link: Any = None  # the server's SupervisorLink
        self.wire: Any = None  # what the server wrote to it
        self.offset = 0
        self.output_open = True

    # -- the transport the server uses -----------------------------------------

    def write(self, data: bytes) -> None:
        self.config += data

    def closeStdin(self) -> None:
        self.stdin_closed = True

    @property
    def signals(self) -> list[int]:
        frames, _ = contract.split_frames(self.wire.value())
        return [payload[0] for kind, payload in frames if kind == contract.SEND_SIGNAL]

    # -- what the test makes the supervisor do ---------------------------------------

    def _frame(self, data: bytes) -> None:
        if not self.ended:
            self.link.dataReceived(data)

    def say(self, line: str) -> None:
        self._frame(contract.frame(contract.LINE, line.encode()))

    def close_status(self) -> None:
        pass  # a supervisor has no status pipe: its end closes the socket

    def output(self, fd: int, data: bytes) -> None:
        self._frame(contract.data_header(fd, self.offset, len(data)) + data)
        self.offset += len(data)

    def close_output(self) -> None:
        if self.output_open:
            self.output_open = False
            self._frame(contract.frame(contract.CLOSED, b""))

    @property
    def outputs(self) -> bool:
        return self.output_open and not self.ended

    def end(self, code: int | None = 0, signum: int | None = None, *, told: bool = True, turn: bool = True) -> None:
        """
        The supervisor ends: after telling the job's end (C{told}), or
        killed without a word; then the reactor turns (C{turn}), until
        the job has settled.
        """
        if told:
            self._frame(contract.frame(contract.END, b"%d %d" % (-1 if code is None else code, signum or 0)))
        self.ended = True
        self.link.connectionLost(Failure(ConnectionDone()))
        if turn:
            self.reactor.advance(0)


class SynchronousPool:
    """
    A thread pool that does its work at once (its result still comes back
    through the reactor's callFromThread, as a real pool's does).
    """

    def callInThreadWithCallback(self, on_result: Any, work: Any, *args: Any, **kwargs: Any) -> None:
        try:
            result = work(*args, **kwargs)
        except Exception:
            on_result(False, Failure())
        else:
            on_result(True, result)


class RecordingCgroup:
    """
    A job's cgroup that records its kills and its removal.
    """

    path_description = "a recording cgroup"

    def __init__(self, directory: Path) -> None:
        self.procs_files = (str(directory / "cgroup.procs"),)
        self.kills = 0
        self.removed = False

    def kill(self) -> None:
        self.kills += 1

    def remove(self) -> None:
        self.removed = True

    def usage(self) -> Usage:
        return Usage()


class RecordingDriver:
    """
    A cgroup driver whose cgroups are L{RecordingCgroup}s.
    """

    name = "recording"
    controllers: frozenset[str] = frozenset()
    base_description = "nowhere"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.made: list[RecordingCgroup] = []
        self.primed = 0
        self.when_primed: list[int] = []  # how many cgroups there were

    def prepare(self) -> None:
        pass

    def prime_moves(self) -> None:
        self.primed += 1
        self.when_primed.append(len(self.made))

    def cleanup_stale(self, keep: frozenset[str] = frozenset()) -> list[str]:
        return []

    def release(self) -> None:
        pass

    def create(self, job_id: str, limits: Limits) -> RecordingCgroup:
        self.made.append(RecordingCgroup(self.directory))
        return self.made[-1]


class FakeProcessReactor(MemoryReactorClock):
    """
    A memory reactor with a clock whose spawnProcess starts a L{FakeHelper}
    and whose adoptStreamConnection connects its socket to it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.helpers: list[FakeHelper] = []

    def spawnProcess(self, processProtocol: Any, executable: Any, args: Any = (), env: Any = None, path: Any = None,
                     uid: Any = None, gid: Any = None, usePTY: bool = False, childFDs: Any = None) -> FakeHelper:
        helper = FakeHelper(self, processProtocol, list(args), childFDs)
        processProtocol.makeConnection(helper)
        self.helpers.append(helper)
        return helper

    def adoptStreamConnection(self, fileDescriptor: int, addressFamily: Any, factory: Any) -> None:
        helper = self.helpers[-1]
        helper.link = factory.buildProtocol(None)
        helper.wire = StringTransport()
        helper.link.makeConnection(helper.wire)

    def connectUNIX(self, address: Any, factory: Any, timeout: Any = 30, checkPID: Any = 0) -> Any:
        # No supervisor listens: a fake one that ended without a word is gone.
        connector = super().connectUNIX(address, factory, timeout, checkPID)
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        return connector

    def callFromThread(self, callable: Any, *args: Any, **kwargs: Any) -> None:
        self.callLater(0, callable, *args, **kwargs)

    def getThreadPool(self) -> SynchronousPool:
        return SynchronousPool()

    def read_pipes(self) -> None:
        for reader in list(self.readers):
            if reader not in self.readers:
                continue
            why = reader.doRead()
            if why is not None:
                reader.connectionLost(Failure(why))


class Setup:
    def __init__(self, tmp_path: Path, cgroups: RecordingDriver | None = None) -> None:
        self.reactor = FakeProcessReactor()
        config = JobManagerConfig(state_dir=str(tmp_path / "state"), isolate=True, default_grace_s=GRACE_S, zygote=False)
        self.manager = JobManager(self.reactor, config, cgroup_driver=cgroups)
        self.manager.startService()

    def start(self, *argv: str, limits: Limits | None = None) -> tuple[defer.Deferred[Job], FakeHelper]:
        started = self.manager.start(ADMIN, StartRequest(1, argv or ("sleep", "100"), limits=limits or Limits()))
        return started, self.reactor.helpers[-1]

    def running(self, **kwargs: Any) -> tuple[Job, FakeHelper]:
        started, helper = self.start(**kwargs)
        helper.say("started")
        return result_of(started), helper

    def finish(self, helper: FakeHelper, code: int | None = 0, signum: int | None = None) -> None:
        helper.close_status()
        helper.close_output()
        self.reactor.read_pipes()
        helper.end(code, signum)


def _set_up(made: Setup) -> Iterator[Setup]:
    yield made
    for reader in list(made.reactor.readers):
        reader.connectionLost(Failure(Exception("test over")))
    made.manager.store.close()


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    yield from _set_up(Setup(tmp_path))


@pytest.fixture
def cgroups(tmp_path: Path) -> RecordingDriver:
    return RecordingDriver(tmp_path)


@pytest.fixture
def with_cgroups(tmp_path: Path, cgroups: RecordingDriver) -> Iterator[Setup]:
    yield from _set_up(Setup(tmp_path, cgroups))


def result_of(deferred: defer.Deferred[Any]) -> Any:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(deferred: defer.Deferred[Any]) -> Failure:
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results and isinstance(results[0], Failure), results
    return results[0]


def output_of(job: Job) -> bytes:
    return b"".join(bytes(chunk.data) for chunk in job.output.read(0, 1 << 20))


# -- the helper's start -------------------------------------------------------------


def test_the_helper_gets_its_configuration_on_stdin(setup: Setup) -> None:
    started, helper = setup.start("echo", "hi")
    config = json.loads(helper.config)
    assert config["argv"] == ["echo", "hi"] and config["isolate"] is True
    assert helper.stdin_closed and helper.args[-1] == "-"
    assert not started.called  # nothing said yet
    helper.say("started")
    job = result_of(started)
    assert job.state is JobState.RUNNING


# -- stop: TERM, the grace period on the clock, KILL --------------------------------------


def test_stop_sends_term_then_kill_when_the_grace_period_is_over(setup: Setup) -> None:
    job, helper = setup.running()
    job.stop("alice", GRACE_S)
    assert helper.signals == [signal.SIGTERM]
    setup.reactor.advance(GRACE_S - 0.01)
    assert helper.signals == [signal.SIGTERM]
    setup.reactor.advance(0.01)
    assert helper.signals == [signal.SIGTERM, signal.SIGKILL]
    setup.finish(helper, code=None, signum=signal.SIGKILL)
    assert job.state is JobState.STOPPED and job.stopped_by == "alice"
    assert setup.reactor.getDelayedCalls() == []


def test_a_job_that_ends_within_the_grace_period_is_not_killed(setup: Setup) -> None:
    job, helper = setup.running()
    job.stop("alice", GRACE_S)
    setup.reactor.advance(1)
    helper.say(f"signal {signal.SIGTERM}")
    setup.finish(helper, code=128 + signal.SIGTERM)
    setup.reactor.advance(GRACE_S * 2)
    assert helper.signals == [signal.SIGTERM]
    assert job.state is JobState.STOPPED and job.signal == signal.SIGTERM


def test_a_second_stop_shortens_the_grace_period_never_lengthens_it(setup: Setup) -> None:
    job, helper = setup.running()
    job.stop("alice", GRACE_S)
    job.stop("bob", 60)
    setup.reactor.advance(GRACE_S)
    assert helper.signals[-1] == signal.SIGKILL
    job2, helper2 = setup.running()
    job2.stop("alice", GRACE_S)
    job2.stop("bob", 1)
    setup.reactor.advance(1)
    assert helper2.signals[-1] == signal.SIGKILL
    assert job2.stopped_by == "alice"  # the first stop's


def test_a_forced_stop_kills_at_once(setup: Setup) -> None:
    job, helper = setup.running()
    job.stop("alice", 0)
    assert helper.signals == [signal.SIGKILL]


def test_a_forced_stop_kills_through_the_supervisor_and_the_cgroup_only_if_the_job_lives_on(
    with_cgroups: Setup, cgroups: RecordingDriver
) -> None:
    setup = with_cgroups
    job, helper = setup.running()
    job.stop("alice", 0)
    assert helper.signals == [signal.SIGKILL]
    [cgroup] = cgroups.made
    assert cgroup.kills == 0  # the supervisor's SIGKILL ends its whole PID namespace
    setup.finish(helper, code=None, signum=signal.SIGKILL)
    assert job.state is JobState.STOPPED
    assert cgroup.removed  # (which kills whatever might be left)
    setup.reactor.advance(CGROUP_KILL_AFTER_S)
    assert cgroup.kills == 0
    # A supervisor that does not end its job: the cgroup is killed.
    stuck, stuck_helper = setup.running()
    stuck.stop("alice", 0)
    setup.reactor.advance(CGROUP_KILL_AFTER_S)
    assert cgroups.made[1].kills == 1
    assert stuck_helper.signals == [signal.SIGKILL]


def test_a_start_primes_the_cgroup_moves_once_the_jobs_cgroup_is_made(with_cgroups: Setup, cgroups: RecordingDriver) -> None:
    """
    Each start moves the service into its own cgroup (prime_moves) through
    the thread pool, so that the kernel's grace period for the command's
    move has begun by the time the supervisor moves it; and only once the
    job's cgroup is made: the priming holds the kernel's cgroup lock for
    that grace period, and the job's directories would wait it out
    (measured in the server on this v1 host: mkdir 1.0 ms a call after the
    priming, 0.11 ms before it; six a job).
    """
    with_cgroups.running()
    assert cgroups.when_primed == [1]


def test_jobs_that_end_together_settle_a_few_per_turn_of_the_reactor(setup: Setup) -> None:
    # Their supervisors' sockets close in one poll of the reactor: settled
    # in that one turn, the reactor served no other client meanwhile.
    jobs = [setup.running() for _ in range(3 * ENDS_PER_TURN)]
    for job, _ in jobs:
        job.stop("alice", 0)
    for _, helper in jobs:
        helper.close_output()
        helper.end(None, signal.SIGKILL, turn=False)
    states = [job.state for job, _ in jobs]
    assert JobState.STOPPED not in states
    ended: list[Job] = []
    while len(ended) < len(jobs):
        assert one_turn(setup.reactor) > 0, "a job never settled"
        now = [job for job, _ in jobs if job.state is JobState.STOPPED]
        assert 0 < len(now) - len(ended) <= ENDS_PER_TURN
        ended = now
    assert ended == [job for job, _ in jobs]  # in the order they ended


def jobs_looked_at(monkeypatch: pytest.MonkeyPatch) -> set[int]:
    """
    From now on, the ids of the jobs whose C{is_final} is asked for.
    """
    looked_at: set[int] = set()
    is_final = Job.is_final

    def counted(job: Job) -> bool:
        looked_at.add(id(job))
        return bool(is_final.fget(job))

    monkeypatch.setattr(Job, "is_final", property(counted))
    return looked_at


def test_a_start_and_an_end_do_not_look_at_every_finished_job(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    # A server keeps thousands of finished jobs (--max-finished-jobs): a
    # start that counted its owner's running jobs among all of them, or an
    # end that listed the finished ones to prune, cost each start and end
    # milliseconds per 10,000 kept.
    for _ in range(40):
        _, helper = setup.running()
        setup.finish(helper)
    assert len(setup.manager.jobs) == 40 and all(job.is_final for job in setup.manager.jobs.values())
    looked_at = jobs_looked_at(monkeypatch)
    job, helper = setup.running()
    setup.finish(helper)
    assert job.state is JobState.EXITED
    finished_before = {id(other) for other in setup.manager.jobs.values() if other is not job}
    assert not looked_at & finished_before


def test_a_start_does_not_look_at_each_running_job_of_its_owner(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    # Admission counted the owner's running jobs one by one: with 500
    # running, 0.8 ms of every start (cProfile of a server).
    jobs = [setup.running()[0] for _ in range(30)]
    looked_at = jobs_looked_at(monkeypatch)
    setup.running()
    assert not looked_at & {id(job) for job in jobs}


def test_the_cap_on_running_jobs_holds_and_frees_as_jobs_end(setup: Setup) -> None:
    setup.manager.config = replace(setup.manager.config, max_jobs_per_identity=3)
    helpers = [setup.running()[1] for _ in range(3)]
    with pytest.raises(RequestError) as refused:
        setup.manager.start(ADMIN, StartRequest(1, ("true",)))
    assert refused.value.code is ErrorCode.TOO_MANY_JOBS and "already has 3 running jobs" in str(refused.value)
    setup.finish(helpers[0])
    job, _ = setup.running()  # one ended: room for one
    assert not job.is_final
    with pytest.raises(RequestError):
        setup.manager.start(ADMIN, StartRequest(1, ("true",)))


# -- a helper that dies early -----------------------------------------------------------


def test_a_helper_that_dies_before_its_status_line_fails_the_start(setup: Setup) -> None:
    # Reaped before its status pipe's EOF came: the command never ran.
    started, helper = setup.start()
    helper.end(1)
    helper.close_status()
    helper.close_output()
    setup.reactor.read_pipes()
    failure = failure_of(started)
    assert failure.check(RequestError)
    assert failure.value.code is ErrorCode.START_FAILED
    [job] = setup.manager.jobs.values()
    assert job.state is JobState.FAILED
    assert job.exit_code == 125
    assert job.error == "the job's helper ended before the command started (exit 1)"


def test_a_helper_killed_in_set_up_fails_the_start_in_the_order_a_reactor_reports_it(setup: Setup) -> None:
    # Twisted's process reactor calls processEnded only after every pipe,
    # fd 3 included, is closed: the status pipe's EOF with no status line
    # comes first, and must not be read as the command's start.
    started, helper = setup.start()
    helper.close_status()
    helper.close_output()
    setup.reactor.read_pipes()
    assert not started.called  # the helper's end tells what the EOF meant
    helper.end(None, signal.SIGKILL)
    failure = failure_of(started)
    assert failure.check(RequestError)
    assert failure.value.code is ErrorCode.START_FAILED
    assert "the job's helper ended before the command started (killed by signal 9)" in str(failure.value)
    [job] = setup.manager.jobs.values()
    assert (job.state, job.exit_code, job.signal) == (JobState.FAILED, 125, 0)
    assert job.started_at == 0
    assert job.error == "the job's helper ended before the command started (killed by signal 9)"


def test_a_helper_that_exits_in_set_up_with_no_status_line_fails_the_start(setup: Setup) -> None:
    started, helper = setup.start()
    setup.finish(helper, code=1)
    assert failure_of(started).value.code is ErrorCode.START_FAILED
    [job] = setup.manager.jobs.values()
    assert job.state is JobState.FAILED
    assert job.error == "the job's helper ended before the command started (exit 1)"


def test_a_failed_line_answers_with_its_kind(setup: Setup) -> None:
    started, helper = setup.start("no-such-command")
    helper.say(f"failed not_found {errno.ENOENT} exec no-such-command: No such file or directory")
    setup.finish(helper, code=127)
    failure = failure_of(started)
    assert failure.value.code is ErrorCode.COMMAND_NOT_FOUND
    [job] = setup.manager.jobs.values()
    assert (job.state, job.exit_code) == (JobState.FAILED, 127)
    assert job.error == "exec no-such-command: No such file or directory"


def test_a_helper_killed_after_its_status_line_ended_the_job_by_that_signal(setup: Setup) -> None:
    # Started, then gone with no exit line: the helper itself was killed.
    job, helper = setup.running()
    setup.finish(helper, code=None, signum=signal.SIGKILL)
    assert job.state is JobState.SIGNALED
    assert (job.exit_code, job.signal) == (-1, signal.SIGKILL)
    assert job.when_ended().called


def test_the_exit_line_beats_the_helpers_own_status(setup: Setup) -> None:
    # An isolated command's exit code 137 is not a SIGKILL of the command.
    job, helper = setup.running()
    helper.say("exit 137")
    setup.finish(helper, code=137)
    assert job.state is JobState.EXITED
    assert (job.exit_code, job.signal) == (137, 0)


def test_a_status_line_out_of_turn_is_ignored(setup: Setup) -> None:
    job, helper = setup.running()
    helper.say("failed setup 0 too late")  # the contract: failed or started, never both
    helper.say("started")
    setup.finish(helper, code=0)
    assert job.state is JobState.EXITED and job.error == ""


def test_a_job_stopped_while_its_helper_sets_up_fails_the_start_and_ends_stopped(setup: Setup) -> None:
    # The stop's SIGKILL ends the helper before it says "started".
    started, helper = setup.start()
    [job] = setup.manager.jobs.values()
    job.stop("alice", 0)
    assert helper.signals == [signal.SIGKILL]
    setup.finish(helper, code=None, signum=signal.SIGKILL)
    failure = failure_of(started)
    assert failure.value.code is ErrorCode.START_FAILED
    assert "stopped before the command started (killed by signal 9)" in str(failure.value)
    assert (job.state, job.stopped_by, job.exit_code, job.signal) == (JobState.STOPPED, "alice", -1, 0)
    assert job.started_at == 0


# -- output after the helper ended ----------------------------------------------------------


def test_output_until_the_supervisor_says_it_closed_is_kept(setup: Setup) -> None:
    job, helper = setup.running()
    helper.output(1, b"early\n")
    helper.say("exit 0")  # a background process of the job still holds the pipes
    helper.output(2, b"late\n")
    assert not job.is_final
    assert output_of(job) == b"early\nlate\n"
    helper.close_output()
    helper.end(0)
    assert job.state is JobState.EXITED and job.exit_code == 0
    assert setup.reactor.getDelayedCalls() == []  # no ack or EOF timer left


def test_a_supervisor_killed_without_a_word_loses_the_job(setup: Setup) -> None:
    job, helper = setup.running()
    helper.output(1, b"so far\n")
    helper.end(told=False)  # kill -9 of the supervisor: its init, and the job, die with it
    assert job.state is JobState.LOST
    assert "supervisor died" in job.error
    assert output_of(job) == b"so far\n"
    assert setup.reactor.getDelayedCalls() == []


def test_output_is_acknowledged_once_stored(setup: Setup) -> None:
    job, helper = setup.running()
    helper.output(1, b"x" * 1000)

    def acks() -> list[int]:
        frames, _ = contract.split_frames(helper.wire.value())
        return [int.from_bytes(payload, "big") for kind, payload in frames if kind == contract.ACK]

    for _ in range(200):  # the spool's writer thread writes it meanwhile
        if acks():
            break
        time.sleep(0.01)
        setup.reactor.advance(0.05)
    assert acks() == [1000]
    assert job.output.stored_end == 1000


# -- timeout --------------------------------------------------------------------------------------


def test_the_supervisor_keeps_the_timeout(setup: Setup) -> None:
    # The supervisor's own timers count from the job's start, whichever
    # server runs (or none): the server sets none of its own.
    job, helper = setup.running(limits=Limits(timeout_ms=3000))
    config = json.loads(helper.config)
    assert config["supervise"] is True and config["timeout_ms"] == 3000 and config["grace_ms"] == GRACE_S * 1000
    setup.reactor.advance(10)
    assert helper.signals == []


def test_a_job_the_supervisor_timed_out_ends_timed_out(setup: Setup) -> None:
    job, helper = setup.running(limits=Limits(timeout_ms=3000))
    helper.say("timeout")
    assert job.stopped_by == "timeout"
    # Should the supervisor's SIGKILL not end it, the server's kill follows.
    setup.reactor.advance(GRACE_S + 1)
    assert helper.signals == [signal.SIGKILL]
    helper.say(f"signal {signal.SIGKILL}")
    setup.finish(helper, code=None, signum=signal.SIGKILL)
    assert job.state is JobState.TIMEOUT
    assert job.error == "ran past its timeout of 3 s"


def test_a_job_that_ends_before_its_timeout_leaves_no_timer(setup: Setup) -> None:
    job, helper = setup.running(limits=Limits(timeout_ms=3000))
    setup.finish(helper, code=0)
    assert job.state is JobState.EXITED
    assert setup.reactor.getDelayedCalls() == []


def test_a_job_stopped_while_starting_still_starts_and_ends_stopped(setup: Setup) -> None:
    started, helper = setup.start()
    [job] = setup.manager.jobs.values()
    job.stop("alice", GRACE_S)
    assert helper.signals == [signal.SIGTERM]
    helper.say("started")
    assert result_of(started) is job
    helper.say(f"signal {signal.SIGTERM}")
    setup.finish(helper, code=128 + signal.SIGTERM)
    assert job.state is JobState.STOPPED and job.stopped_by == "alice"
    assert setup.reactor.getDelayedCalls() == []
