"""
The server's Twisted glue without root, sockets or a reactor: the real
L{ServerProtocol} and the real Twisted client (L{JobworkerClientProtocol})
over real TLS 1.3 with the development PKI, run in memory by Twisted's
L{iosim} on a L{task.Clock}, over a stand-in for the job manager.

What is checked is what only the glue can get wrong: a follower whose job
is removed, a connection lost while a response and a stream are under way,
and keep-alive on the fake clock.  Each test also checks that nothing the
connection held stays behind: streams and connections counted by the
factory, subscriptions to a job's output and to the manager's removal
event, waits held by a job, calls left on the clock, failures in the log.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet import defer, task
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from jobworker.client import ClientConnectionLost, JobworkerClientProtocol
from jobworker.errors import ErrorCode, RequestError
from jobworker.output.log import MemorySpool, OutputLog
from jobworker.policy import Identity, Operation
from jobworker.protocol import messages as m
from jobworker.server.connection import ServerProtocol
from jobworker.server.factory import ServerFactory, ServerLimits
from jobworker.tls import BulkTLSMemoryBIOFactory, client_tls_options, server_tls_options


class CountingLog(OutputLog):
    """
    An output log that knows who is subscribed to it.
    """

    def __init__(self) -> None:
        super().__init__(MemorySpool())
        self.listeners: list[Callable[[], None]] = []

    def subscribe(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)
        super().subscribe(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        if callback in self.listeners:
            self.listeners.remove(callback)
        super().unsubscribe(callback)


class FakeJob:
    """
    A running job whose output the test writes; it never ends by itself.
    """

    def __init__(self, owner: str = "alice") -> None:
        self.job_id = uuid.uuid4()
        self.owner = owner
        self.output = CountingLog()
        self.state = m.JobState.RUNNING
        self.stopped_by: list[str] = []
        # Deferreds of waits, as a real job holds them until it ends.
        self.waiters: list[defer.Deferred[m.JobStatus]] = []

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    def status(self) -> m.JobStatus:
        return m.JobStatus(self.job_id, self.owner, ("sleep", "1000"), self.state, output_bytes=self.output.end)

    def when_ended(self) -> defer.Deferred[m.JobStatus]:
        waiter: defer.Deferred[m.JobStatus] = defer.Deferred(lambda d: self.waiters.remove(d))
        self.waiters.append(waiter)
        return waiter

    def stop(self, by: str, grace_s: float) -> None:
        self.stopped_by.append(by)

    def end(self) -> None:
        self.state = m.JobState.EXITED
        self.output.close()
        for waiter in list(self.waiters):
            waiter.callback(self.status())
        self.waiters.clear()


class FakeManager:
    """
    The part of L{JobManager} the server uses, with the removal event
    (L{JobManager.on_removed}); every identity sees every job.
    """

    def __init__(self) -> None:
        self.jobs: dict[uuid.UUID, FakeJob] = {}
        self.removal_observers: list[Callable[[FakeJob], None]] = []

    def add(self) -> FakeJob:
        job = FakeJob()
        self.jobs[job.job_id] = job
        return job

    def get(self, identity: Identity, operation: Operation, job_id: uuid.UUID) -> FakeJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise RequestError(f"no job {job_id}", ErrorCode.NOT_FOUND)
        return job

    def list(self, identity: Identity, after: tuple[int, int] = (0, 0), newest_first: bool = False) -> list[FakeJob]:
        if newest_first:
            return sorted(
                (job for job in self.jobs.values() if after == (0, 0) or (job.created_at, job.job_id.int) < after),
                key=lambda job: (job.created_at, job.job_id.int),
                reverse=True,
            )
        return [job for job in self.jobs.values() if (job.created_at, job.job_id.int) > after]

    def start(self, identity: Identity, request: m.StartRequest) -> Any:
        raise RequestError("not in these tests", ErrorCode.START_FAILED)

    def remove(self, job: FakeJob) -> None:
        if not job.is_final:
            raise RequestError("still running", ErrorCode.JOB_RUNNING)
        del self.jobs[job.job_id]
        for observer in list(self.removal_observers):
            observer(job)

    def on_removed(self, observer: Callable[[FakeJob], None]) -> Callable[[], None]:
        self.removal_observers.append(observer)
        return lambda: self.removal_observers.remove(observer)


class _Given(Factory):
    def __init__(self, client: JobworkerClientProtocol) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> JobworkerClientProtocol:
        return self.client


class Link:
    """
    One client connection over in-memory TLS: the server's factory and
    protocol, the client, and the pump that moves bytes between them.
    """

    def __init__(self, certs: Path, *, identity: str = "alice", keepalive_s: float = 0.0, **limits: Any) -> None:
        self.clock = task.Clock()
        self.manager = FakeManager()
        self.factory = ServerFactory(self.manager, self.clock, limits=ServerLimits(**limits))  # type: ignore[arg-type]
        server_tls = BulkTLSMemoryBIOFactory(
            server_tls_options(certs / "ca.pem", certs / "server.pem", certs / "server.key"),
            False,
            self.factory,
            clock=self.clock,
        )
        self.client = JobworkerClientProtocol(clock=self.clock, keepalive_interval=keepalive_s)
        client_tls = TLSMemoryBIOFactory(
            client_tls_options(certs / "ca.pem", certs / f"{identity}.pem", certs / f"{identity}.key", "localhost"),
            True,
            _Given(self.client),
            # Twisted's client TLS gathers small writes for a later turn of
            # this clock's (the global reactor's, by default).
            clock=self.clock,
        )
        server_side = server_tls.buildProtocol(iosim.FakeAddress())
        client_side = client_tls.buildProtocol(iosim.FakeAddress())
        self.server = cast(ServerProtocol, server_side.wrappedProtocol)
        self.io = iosim.connect(
            server_side,
            iosim.FakeTransport(server_side, isServer=True),
            client_side,
            iosim.FakeTransport(client_side, isServer=False),
            clock=self.clock,
        )
        assert self.client.hello is not None, "the hello exchange did not end"

    def flush(self) -> None:
        self.io.flush()

    def server_calls(self) -> list[Any]:
        """
        Calls on the clock that belong to the server's connection (its
        timers, its pump, its abort): none may be left once it is gone.
        """
        mine = []
        for call in self.clock.getDelayedCalls():
            owner = getattr(call.func, "__self__", None)
            if owner is self.server or owner is self.server.pump or owner is self.server.timers:
                mine.append(call)
            elif getattr(owner, "abortConnection", None) is not None and owner is self.server.transport:
                mine.append(call)
        return mine

    def assert_nothing_held(self, *jobs: FakeJob) -> None:
        assert self.server.streams == {}
        assert self.server.waiting == {}
        assert self.factory.open_connections == 0
        assert self.factory.streams_of("alice") == 0
        assert self.factory.connections_of("alice") == 0
        assert self.manager.removal_observers == []
        for job in jobs:
            assert job.output.listeners == []
            assert job.waiters == []
        assert self.server_calls() == []


@pytest.fixture
def logged_failures() -> Any:
    """
    Every failure or error logged while the test runs.
    """
    failures: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_failure") is not None or event.get("log_level") is not None and event["log_level"].name in ("error", "critical"):
            failures.append(event)

    globalLogPublisher.addObserver(cast(ILogObserver, observe))
    yield failures
    globalLogPublisher.removeObserver(cast(ILogObserver, observe))


def failure_of(d: defer.Deferred[Any]) -> Failure:
    """
    The failure C{d} has fired with, consumed (so that it is not logged as
    an unhandled error when C{d} is collected, perhaps in a later test).
    """
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, f"{d!r} has not failed"
    return failures[0]


def _collect(into: list[tuple[int, bytes]]) -> Callable[[int, bytes], None]:
    return lambda fd, data: into.append((fd, data))


# -- a follower whose job is removed -------------------------------------------------


def _stalled_follower(link: Link, job: FakeJob, window: int = 64 << 10) -> tuple[Any, list[tuple[int, bytes]]]:
    """
    A follower of C{job} that has spent its window and grants no credit
    (paused, as a slow reader is): the server holds its stream open, the
    rest of the output unsent.
    """
    received: list[tuple[int, bytes]] = []
    follower = link.client.follow(job.job_id, _collect(received), window=window)
    follower.pause()
    link.flush()
    assert list(link.server.streams).count(follower.stream_id) == 1
    return follower, received


def test_a_follower_whose_job_is_removed_gets_its_end_and_nothing_leaks(certs: Path, logged_failures: list[LogEvent]) -> None:
    """
    A finished job removed while a slow follower is still reading it (C{jobcli
    rm} from elsewhere, or pruning) ends that follower's stream at once with
    C{REMOVED} and the job's last status, after the output it was sent and
    without the rest; nothing else has to happen first (no output, no
    credit, no request).  The connection lets go of the job's output and of
    the manager's removal event, and goes on serving.
    """
    link = Link(certs)
    job = link.manager.add()
    job.output.append(1, b"x" * (1 << 20))
    job.end()
    follower, received = _stalled_follower(link, job)
    assert len(link.manager.removal_observers) == 1, "a connection with streams listens for removals"

    link.manager.remove(job)
    link.flush()
    follower.resume()
    link.flush()
    assert follower.done.called, "the follower of a removed job was never told"
    assert follower.end_reason is m.EndReason.REMOVED
    status = follower.done.result
    assert status.job_id == job.job_id and status.state is m.JobState.EXITED
    assert 0 < sum(len(data) for _, data in received) < 1 << 20
    assert link.server.streams == {}
    assert job.output.listeners == []
    assert link.manager.removal_observers == []
    assert link.factory.streams_of("alice") == 0
    # The connection is still good for other requests.
    listed = link.client.list()
    link.flush()
    assert listed.result == ()
    assert logged_failures == []


def test_only_the_removed_jobs_followers_end(certs: Path, logged_failures: list[LogEvent]) -> None:
    """
    Of two stalled followers on one connection, only the removed job's
    ends; the other is served on when it reads again, and once it ends the
    connection no longer listens for removals.
    """
    link = Link(certs)
    gone_job, kept_job = link.manager.add(), link.manager.add()
    for job in (gone_job, kept_job):
        job.output.append(1, b"y" * (256 << 10))
        job.end()
    gone, _ = _stalled_follower(link, gone_job)
    kept, received = _stalled_follower(link, kept_job)

    link.manager.remove(gone_job)
    link.flush()
    gone.resume()
    link.flush()
    assert gone.end_reason is m.EndReason.REMOVED
    assert not kept.done.called
    assert list(link.server.streams) == [kept.stream_id]
    assert gone_job.output.listeners == []
    assert len(link.manager.removal_observers) == 1, "still one stream open, still listening"

    kept.resume()
    link.flush()
    assert kept.end_reason is m.EndReason.JOB_ENDED
    assert sum(len(data) for _, data in received) == 256 << 10
    assert link.manager.removal_observers == []
    assert kept_job.output.listeners == []
    assert logged_failures == []


# -- a connection lost mid-response --------------------------------------------------


def test_a_connection_lost_mid_response_leaks_nothing_and_the_job_goes_on(
    certs: Path, logged_failures: list[LogEvent]
) -> None:
    """
    The connection drops while the server is sending a follow's output (8
    MiB, more than one turn of the pump and more than the client's window)
    and a wait is pending: everything it held is let go at once (the
    stream, its subscription, the wait held by the job, the counts, the
    clock's calls), nothing is logged as a failure, and the job neither
    stops nor notices.  Another client then reads all of the output.
    """
    link = Link(certs)
    job = link.manager.add()
    output = bytes(range(256)) * (32 << 10)  # 8 MiB
    job.output.append(1, output)
    received: list[tuple[int, bytes]] = []
    follower = link.client.follow(job.job_id, _collect(received), window=1 << 20)
    waited = link.client.wait(job.job_id)
    # A few exchanges only: the stream is under way, far from done.
    for _ in range(6):
        link.io.pump()
    got = sum(len(data) for _, data in received)
    assert 0 < got < len(output), got
    assert link.server.streams and link.server.waiting and job.waiters

    # The connection is reset: what was on the wire is lost, and both
    # ends are told.
    for transport in (link.io.clientIO, link.io.serverIO):
        transport.stream.clear()
        transport.disconnectReason = ConnectionLost("reset by peer")
        transport.abortConnection()
    link.flush()
    link.clock.advance(10)  # any timer left would fire now

    assert failure_of(follower.done).check(ClientConnectionLost)
    assert failure_of(waited).check(ClientConnectionLost)
    link.assert_nothing_held(job)
    assert not job.is_final and job.stopped_by == []
    assert logged_failures == [], [event.get("log_format") for event in logged_failures]

    # The output is all there for the next follower.
    again = Link(certs)
    again.manager.jobs[job.job_id] = job
    job.output.append(2, b"more\n")
    received = []
    again.client.follow(job.job_id, _collect(received), offset=0)
    again.flush()
    assert b"".join(data for fd, data in received if fd == 1) == output
    assert received[-1] == (2, b"more\n")


# -- keep-alive on the fake clock ----------------------------------------------------


def test_keepalive_closes_a_connection_whose_client_went_silent(certs: Path, logged_failures: list[LogEvent]) -> None:
    """
    A client that stops answering (its host went away without closing) is
    pinged after C{keepalive_interval_s} of silence and dropped, with
    C{GoAway(TIMEOUT)}, when the ping goes unanswered for as long again,
    although it has a wait pending (so the idle timer does not run): the
    wait is let go of, and the job goes on.
    """
    link = Link(certs, keepalive_interval_s=5.0, idle_timeout_s=300.0)
    job = link.manager.add()
    waited = link.client.wait(job.job_id)
    link.flush()
    assert job.waiters

    # Nothing is delivered from now on: the client is silent.
    link.clock.advance(5.0)
    assert link.server.connected, "closed before the ping was due"
    link.clock.advance(4.9)
    assert link.server.connected, "closed before the ping's answer was due"
    link.clock.advance(0.2)
    assert not link.server.connected or link.server.transport.disconnecting, "a silent client was never dropped"

    link.flush()
    assert waited.called
    failure = failure_of(waited)
    assert failure.check(ClientConnectionLost)
    assert failure.value.code is ErrorCode.TIMEOUT
    link.clock.advance(10)
    link.assert_nothing_held(job)
    assert not job.is_final and job.stopped_by == []
    assert logged_failures == []


def test_keepalive_keeps_a_connection_whose_client_answers(certs: Path) -> None:
    """
    The other half: a client that answers the pings (the Twisted client
    does, as it reads) stays connected through many intervals of silence
    of its own, with its wait pending.
    """
    link = Link(certs, keepalive_interval_s=5.0, idle_timeout_s=300.0)
    job = link.manager.add()
    waited = link.client.wait(job.job_id)
    for _ in range(20):
        link.clock.advance(2.5)
        link.flush()
    assert link.server.connected and not link.server.transport.disconnecting
    assert not waited.called
    job.end()
    link.flush()
    assert waited.result.state is m.JobState.EXITED
