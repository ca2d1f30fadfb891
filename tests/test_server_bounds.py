"""
What a client can make the server hold is bounded: unsent responses, the
receive buffer of a frame that never completes, connections (in total and
per identity), followers per identity, and the audit log.

These run the real server protocol behind real TLS on the loopback
interface, in this process, over a stand-in for the job manager (the
server's bounds are what is under test, not the jobs).
"""

from __future__ import annotations

import gc
import uuid
import weakref
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor as global_reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from jobworker.errors import ErrorCode, RequestError
from jobworker.outputlog import MemorySpool, OutputLog
from jobworker.policy import Operation
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection, Role
from jobworker.server import WRITE_BUFFER, ServerFactory, ServerLimits
from jobworker.testing import job_status
from jobworker.tls import BulkTLSMemoryBIOFactory, client_tls_options, server_tls_options


# -- a stand-in job manager -----------------------------------------------------


class FakeJob:
    def __init__(self, owner: str, argv: tuple[str, ...]) -> None:
        self.job_id = uuid.uuid4()
        self.owner = owner
        self.output = OutputLog(MemorySpool())
        self.is_final = False
        self._status = job_status(self.job_id, owner=owner, argv=argv, state=m.JobState.RUNNING)

    def status(self) -> m.JobStatus:
        return self._status

    def when_ended(self) -> defer.Deferred[m.JobStatus]:
        return defer.Deferred()


class FakeManager:
    """
    Every identity may see every job; that is enough for these tests.
    """

    def __init__(self) -> None:
        self.jobs: dict[uuid.UUID, FakeJob] = {}

    def add(self, argv: tuple[str, ...] = ("true",), owner: str = "alice") -> FakeJob:
        job = FakeJob(owner, argv)
        self.jobs[job.job_id] = job
        return job

    def get(self, identity: Any, operation: Operation, job_id: uuid.UUID) -> FakeJob:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise RequestError(f"no job {job_id}", ErrorCode.NOT_FOUND) from None

    def list(self, identity: Any) -> list[FakeJob]:
        return list(self.jobs.values())


# -- a raw client over real TLS ---------------------------------------------------


class RawClient(Protocol):
    """
    A client driving the sans-IO core directly, so a test can do what no
    well-behaved client does (pipeline without reading, stop reading).
    """

    def __init__(self) -> None:
        self.conn = Connection(Role.CLIENT)
        self.messages: list[m.Message] = []
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self.received_bytes = 0
        self.hello: m.ServerHello | m.GoAway | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received_bytes += len(data)
        for message in self.conn.receive_data(data):
            if isinstance(message, m.ServerHello):
                self.hello = message
                self.transport.write(self.conn.send(m.ClientHello(m.PROTOCOL_VERSION, self.conn.max_frame_size)))
                self.ready.callback(None)
            else:
                if isinstance(message, m.GoAway) and self.hello is None:
                    self.hello = message
                self.messages.append(message)

    def send(self, *messages: m.Message) -> None:
        self.transport.write(b"".join(self.conn.send(message) for message in messages))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class Harness:
    def __init__(self, certs: Path, limits: ServerLimits) -> None:
        self.certs = certs
        self.manager = FakeManager()
        self.protocols: list[weakref.ref[Any]] = []
        factory = ServerFactory(self.manager, global_reactor, server_name="test", limits=limits)  # type: ignore[arg-type]
        build = factory.buildProtocol

        def building(addr: Any) -> Any:
            protocol = build(addr)
            self.protocols.append(weakref.ref(protocol))
            return protocol

        factory.buildProtocol = building  # type: ignore[method-assign]
        self.factory = factory
        self.port: Any = None

    async def listen(self) -> None:
        tls = server_tls_options(self.certs / "ca.pem", self.certs / "server.pem", self.certs / "server.key")
        endpoint = TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(BulkTLSMemoryBIOFactory(tls, False, self.factory))

    async def connect(self, identity: str = "alice", wait: bool = True) -> RawClient:
        options = client_tls_options(
            self.certs / "ca.pem", self.certs / f"{identity}.pem", self.certs / f"{identity}.key", "localhost"
        )
        endpoint = SSL4ClientEndpoint(global_reactor, "127.0.0.1", self.port.getHost().port, options)
        client = await endpoint.connect(Factory.forProtocol(RawClient))
        if wait:
            await _first(client)
        return client

    def live(self) -> list[Any]:
        return [protocol for ref in self.protocols if (protocol := ref()) is not None]

    async def close(self) -> None:
        await self.port.stopListening()


async def _first(client: RawClient) -> None:
    """
    Wait for the server's first frame: its hello or a GoAway.
    """
    for _ in range(500):
        if client.hello is not None or client.lost.called:
            return
        await sleep(0.01)
    raise AssertionError("the server said nothing")


def sleep(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import task

    return task.deferLater(global_reactor, seconds, lambda: None)


def unsent_bytes(protocol: Any) -> int:
    """
    Bytes the server holds for the client in user space: TLS plaintext
    waiting for the handshake, and ciphertext in the TCP transport's buffer.
    """
    tls = protocol.transport
    tcp = tls.transport
    held = sum(len(piece) for piece in getattr(tls, "_appSendBuffer", []))
    held += len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen
    return held


@pytest.fixture
def log_events() -> Iterator[list[dict]]:
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- unsent responses -------------------------------------------------------------


BIG_ARGV = tuple(["x" * 1000] * 260)  # a StatusResponse of ~260 KB


@pytest_twisted.ensureDeferred
async def test_responses_a_client_does_not_read_are_bounded(certs: Path) -> None:
    """
    A client that pipelines status requests for a job with a large command
    and never reads makes the server hold at most its write buffer plus one
    response, not every response; the requests wait, unread, and are all
    answered, in order, once the client reads again.
    """
    harness = Harness(certs, ServerLimits())
    await harness.listen()
    try:
        job = harness.manager.add(BIG_ARGV)
        client = await harness.connect()
        client.transport.pauseProducing()  # read nothing
        count = 120  # below the pending-request cap: every one must be answered
        client.send(*(m.StatusRequest(client.conn.next_request_id(), job.job_id) for _ in range(count)))
        await sleep(1.0)
        [server] = harness.live()
        response = 260 * 1000 + 4096
        held = unsent_bytes(server)
        assert held <= WRITE_BUFFER + 2 * response, held
        client.transport.resumeProducing()
        for _ in range(300):
            if len(client.messages) >= count:
                break
            await sleep(0.02)
        assert [type(message) for message in client.messages] == [m.StatusResponse] * count
        assert [message.request_id for message in client.messages] == list(range(1, count + 1))  # type: ignore[attr-defined]
        client.transport.loseConnection()
        await client.lost
    finally:
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_a_closed_connection_is_freed_without_the_garbage_collector(certs: Path) -> None:
    """
    Once a connection is lost, nothing keeps its protocol (and with it its
    buffers) alive: no reference cycle waits for a full collection.
    """
    harness = Harness(certs, ServerLimits())
    await harness.listen()
    gc.collect()
    gc.disable()
    try:
        job = harness.manager.add(BIG_ARGV)
        client = await harness.connect()
        client.transport.pauseProducing()
        client.send(*(m.StatusRequest(client.conn.next_request_id(), job.job_id) for _ in range(20)))
        client.send(m.FollowRequest(client.conn.next_request_id(), job.job_id, client.conn.next_stream_id()))
        client.send(m.WaitRequest(client.conn.next_request_id(), job.job_id))
        await sleep(0.3)
        [server] = harness.live()
        tcp = weakref.ref(server.transport.transport)
        del server
        client.transport.abortConnection()
        await client.lost
        await sleep(0.2)
        assert harness.live() == []
        assert tcp() is None
    finally:
        gc.enable()
        await harness.close()


# -- a frame that never completes -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_frame_trickled_in_is_cut_off_by_the_frame_timeout(certs: Path) -> None:
    """
    A client that starts a large frame and sends one byte at a time resets
    no timer for ever: the frame must arrive within the frame timeout, or
    the connection is closed with GoAway(TIMEOUT).
    """
    harness = Harness(certs, ServerLimits(frame_timeout_s=0.6, idle_timeout_s=300))
    await harness.listen()
    try:
        client = await harness.connect()
        frame = client.conn.send(m.StartRequest(client.conn.next_request_id(), ("x" * 1000,) * 100))
        started = global_reactor.seconds()
        for byte in range(len(frame)):
            if client.lost.called:
                break
            client.transport.write(frame[byte : byte + 1])
            await sleep(0.02)
        assert client.lost.called
        elapsed = global_reactor.seconds() - started
        assert 0.5 <= elapsed <= 3, elapsed
        [goaway] = [message for message in client.messages if isinstance(message, m.GoAway)]
        assert goaway.code == ErrorCode.TIMEOUT and "frame" in goaway.message
    finally:
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_frames_that_each_arrive_in_time_are_served(certs: Path) -> None:
    """
    The frame timeout bounds one frame, not the connection: many frames,
    each slower than nothing but faster than the timeout, go on for longer
    than the timeout in all.
    """
    harness = Harness(certs, ServerLimits(frame_timeout_s=0.5))
    await harness.listen()
    try:
        job = harness.manager.add()
        client = await harness.connect()
        for _ in range(8):
            frame = client.conn.send(m.StatusRequest(client.conn.next_request_id(), job.job_id))
            client.transport.write(frame[:3])
            await sleep(0.15)
            client.transport.write(frame[3:])
        await sleep(0.2)
        assert not client.lost.called
        assert [type(message) for message in client.messages] == [m.StatusResponse] * 8
        client.transport.loseConnection()
        await client.lost
    finally:
        await harness.close()


# -- connections and followers, in total and per identity --------------------------


@pytest_twisted.ensureDeferred
async def test_connections_per_identity_are_capped(certs: Path, log_events: list[dict]) -> None:
    """
    One identity may hold at most C{max_connections_per_identity}
    connections; the next gets GoAway(TOO_MANY_CONNECTIONS) instead of a
    hello, other identities are not affected, and a slot freed is usable.
    """
    harness = Harness(certs, ServerLimits(max_connections_per_identity=2))
    await harness.listen()
    try:
        first, second = await harness.connect("alice"), await harness.connect("alice")
        assert isinstance(first.hello, m.ServerHello) and isinstance(second.hello, m.ServerHello)
        refused = await harness.connect("alice")
        assert isinstance(refused.hello, m.GoAway), refused.hello
        assert refused.hello.code == ErrorCode.TOO_MANY_CONNECTIONS
        assert "alice" in refused.hello.message and "2" in refused.hello.message
        await refused.lost
        other = await harness.connect("bob")
        assert isinstance(other.hello, m.ServerHello)
        first.transport.loseConnection()
        await first.lost
        await sleep(0.1)
        again = await harness.connect("alice")
        assert isinstance(again.hello, m.ServerHello)
        assert any("too many connections" in event.get("log_format", "") for event in log_events)
        for client in (second, other, again):
            client.transport.loseConnection()
            await client.lost
    finally:
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_connections_in_total_are_capped(certs: Path, log_events: list[dict]) -> None:
    """
    Beyond C{max_connections} open connections (whoever holds them, TLS
    finished or not), a new one is closed at once, before any handshake,
    and the refusal is logged with the peer's address.
    """
    harness = Harness(certs, ServerLimits(max_connections=3, max_connections_per_identity=10))
    await harness.listen()
    try:
        clients = [await harness.connect(name) for name in ("alice", "bob", "viewer")]
        assert all(isinstance(client.hello, m.ServerHello) for client in clients)
        refused = await harness.connect("admin", wait=False)
        await refused.lost
        assert refused.hello is None
        assert any(
            "max_connections" in event.get("log_format", "") or "--max-connections" in str(event.get("log_format", ""))
            for event in log_events
        )
        assert any("127.0.0.1" in str(event.get("peer", "")) for event in log_events if event.get("limit") == "max-connections")
        clients[0].transport.loseConnection()
        await clients[0].lost
        await sleep(0.1)
        again = await harness.connect("admin")
        assert isinstance(again.hello, m.ServerHello)
        for client in (*clients[1:], again):
            client.transport.loseConnection()
            await client.lost
        await sleep(0.1)
        assert harness.factory.open_connections == 0
    finally:
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_followers_per_identity_are_capped_across_connections(certs: Path) -> None:
    """
    The follower cap per identity counts streams on all of its connections:
    two connections of 2 streams each reach a cap of 3 on the fourth.
    """
    harness = Harness(certs, ServerLimits(max_streams_per_identity=3))
    await harness.listen()
    try:
        job = harness.manager.add()
        one, two = await harness.connect("alice"), await harness.connect("alice")
        bob = await harness.connect("bob")
        for client in (one, one, two, two, bob):
            client.send(m.FollowRequest(client.conn.next_request_id(), job.job_id, client.conn.next_stream_id()))
        await sleep(0.3)
        answers = [type(message) for message in one.messages + two.messages]
        assert answers.count(m.OkResponse) == 3
        [refusal] = [message for message in two.messages if isinstance(message, m.ErrorResponse)]
        assert refusal.code == ErrorCode.TOO_MANY_STREAMS and "identity" in refusal.message
        assert [type(message) for message in bob.messages] == [m.OkResponse]
        # A stream ended frees its place.
        one.send(m.CancelStream(1))
        await sleep(0.2)
        two.send(m.FollowRequest(two.conn.next_request_id(), job.job_id, two.conn.next_stream_id()))
        await sleep(0.2)
        assert isinstance(two.messages[-1], m.OkResponse), two.messages[-1]
        one.transport.loseConnection()
        await one.lost
        await sleep(0.1)
        assert harness.factory.streams_of("alice") == 2
        for client in (two, bob):
            client.transport.loseConnection()
            await client.lost
        await sleep(0.1)
        assert harness.factory.streams_of("alice") == 0
    finally:
        await harness.close()
