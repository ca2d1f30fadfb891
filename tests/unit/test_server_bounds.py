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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, reactor as global_reactor
from twisted.internet.endpoints import SSL4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogPublisher

from jobworker.errors import ErrorCode
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection, Role
from jobworker.server.factory import ServerFactory, ServerLimits
from jobworker.server.transport import WRITE_BUFFER
from jobworker.tls import BulkTLSMemoryBIOFactory, client_tls_options, server_tls_options
from tests.fuzzing import FakeManager

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
        factory = ServerFactory(self.manager, global_reactor, server_name="test", limits=limits)  # type: ignore[arg-type]  # a stand-in manager
        build = factory.buildProtocol

        def building(addr: Any) -> Any:
            protocol = build(addr)
            self.protocols.append(weakref.ref(protocol))
            return protocol

        factory.buildProtocol = building  # type: ignore[method-assign]  # watched
        self.factory = factory
        self.port: Any = None

    async def listen(self) -> None:
        tls = server_tls_options(self.certs / "ca.pem", self.certs / "server.pem", self.certs / "server.key")
        endpoint = TCP4ServerEndpoint(global_reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(BulkTLSMemoryBIOFactory(tls, False, self.factory))

    async def connect(self, identity: str = "alice", wait: bool = True, directory: Path | None = None) -> RawClient:
        keys = directory or self.certs
        options = client_tls_options(self.certs / "ca.pem", keys / f"{identity}.pem", keys / f"{identity}.key", "localhost")
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
    globalLogPublisher.addObserver(events.append)  # type: ignore[arg-type]  # a callable of one event is an observer
    yield events
    globalLogPublisher.removeObserver(events.append)  # type: ignore[arg-type]  # a callable of one event is an observer


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
        assert [message.request_id for message in client.messages] == list(range(1, count + 1))
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


# -- the audit log ----------------------------------------------------------------


def rendered(events: list[dict]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in events]


@pytest_twisted.ensureDeferred
async def test_audit_lines_quote_what_the_client_chose_and_name_the_peer(
    certs: Path, tmp_path: Path, log_events: list[dict]
) -> None:
    """
    A CN with a newline cannot forge a second audit line, nor a NUL reach
    the log raw, nor spaces blur the key=value pairs; every audit line
    names the peer's address.
    """
    from jobworker.pki import make_client_cert

    tricky = {
        "forger": "eve verdict=allow\naudit identity=root role=admin operation=stop",
        "nul": "nul\x00byte",
        "spaced": "carol smith",
    }
    for name, cn in tricky.items():
        make_client_cert(tmp_path, certs / "ca.pem", certs / "ca.key", cn, "user", name=name)
    harness = Harness(certs, ServerLimits())
    await harness.listen()
    try:
        job = harness.manager.add()
        for name in tricky:
            client = await harness.connect(name, directory=tmp_path)
            client.send(m.StatusRequest(client.conn.next_request_id(), job.job_id))
            await sleep(0.1)
            client.transport.loseConnection()
            await client.lost
        lines = [line for line in rendered(log_events) if line.startswith("audit ")]
        assert len(lines) == 3
        text = "\n".join(rendered(log_events))
        assert "\x00" not in text
        assert sum(line.startswith("audit identity=root") for line in text.splitlines()) == 0
        from tests.unit.test_audit import parse_pairs

        for line, cn in zip(lines, tricky.values()):
            pairs = parse_pairs(line[len("audit ") :])
            assert pairs["identity"] == cn
            assert pairs["operation"] == "status" and pairs["verdict"] == "allow"
            assert pairs["peer"].startswith("127.0.0.1:")
    finally:
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_audit_lines_are_rate_limited_per_identity_with_a_summary(certs: Path, log_events: list[dict]) -> None:
    """
    An identity flooding the server with requests writes at most the burst
    of audit lines per interval; the rest are counted in one summary when
    the interval ends; another identity's lines are not held back.
    """
    harness = Harness(certs, ServerLimits(audit_burst=20, audit_interval_s=0.5))
    await harness.listen()
    try:
        job = harness.manager.add()
        flood, quiet = await harness.connect("alice"), await harness.connect("bob")
        flood.send(*(m.StatusRequest(flood.conn.next_request_id(), job.job_id) for _ in range(100)))
        flood.send(*(m.StatusRequest(flood.conn.next_request_id(), uuid.uuid4()) for _ in range(10)))
        for _ in range(100):
            if len(flood.messages) >= 110:
                break
            await sleep(0.02)
        quiet.send(m.StatusRequest(quiet.conn.next_request_id(), job.job_id))
        await sleep(0.8)
        lines = rendered(log_events)
        alice = [line for line in lines if line.startswith("audit identity=alice ")]
        bob = [line for line in lines if line.startswith("audit identity=bob ")]
        assert len(alice) == 20 and len(bob) == 1
        [summary] = [line for line in lines if line.startswith("audit suppressed=")]
        assert "suppressed=90 identity=alice" in summary
        assert "status allow: 80" in summary and "status not_found: 10" in summary
        for client in (flood, quiet):
            client.transport.loseConnection()
            await client.lost
    finally:
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_refused_tls_handshakes_are_logged_with_peer_and_reason(
    certs: Path, tmp_path: Path, log_events: list[dict]
) -> None:
    from jobworker.pki import make_ca, make_client_cert

    other_ca = make_ca(tmp_path / "other", name="another CA")
    make_client_cert(tmp_path, *other_ca, "alice", "user", name="stranger")
    make_client_cert(tmp_path, certs / "ca.pem", certs / "ca.key", "dave", "user", name="no-eku", extended_key_usage=())
    harness = Harness(certs, ServerLimits())
    await harness.listen()
    try:
        for name in ("stranger", "no-eku"):
            client = await harness.connect(name, wait=False, directory=tmp_path)
            client.transport.write(b"x")  # TLS 1.3: the client learns of the refusal on its first read
            await client.lost
        await sleep(0.1)
        failed = [line for line in rendered(log_events) if line.startswith("TLS handshake with 127.0.0.1:")]
        assert len(failed) == 2, rendered(log_events)
        assert any("certificate verify failed" in line for line in failed), failed
        refused_eku = [line for line in rendered(log_events) if "clientAuth" in line]
        assert refused_eku and "from 127.0.0.1:" in refused_eku[0]
    finally:
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_a_connection_closed_by_the_frame_timeout_is_freed_without_the_garbage_collector(certs: Path) -> None:
    """
    As above, for a connection the server closes itself (a late frame: its
    GoAway, then the client goes).
    """
    harness = Harness(certs, ServerLimits(frame_timeout_s=0.3))
    await harness.listen()
    gc.collect()
    gc.disable()
    try:
        client = await harness.connect()
        client.transport.write(b"\x00\x01\x00\x00\x10" + b"\x00" * 60_000)
        await sleep(0.05)
        [server] = harness.live()
        tcp = weakref.ref(server.transport.transport)
        del server
        for _ in range(100):
            if any(isinstance(message, m.GoAway) for message in client.messages):
                break
            await sleep(0.05)
        assert any(isinstance(message, m.GoAway) for message in client.messages)
        client.transport.loseConnection()
        await client.lost
        await sleep(0.3)
        assert harness.live() == []
        assert tcp() is None
    finally:
        gc.enable()
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_a_connection_aborted_after_its_goaway_is_freed_without_the_garbage_collector(
    certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A client that reads nothing does not answer the server's TLS close: the
    server aborts the connection after its grace period, and that path too
    leaves nothing for the garbage collector.
    """
    import jobworker.server.connection

    monkeypatch.setattr(jobworker.server.connection, "ABORT_GRACE_S", 0.3)
    harness = Harness(certs, ServerLimits(frame_timeout_s=0.3))
    await harness.listen()
    gc.collect()
    gc.disable()
    try:
        client = await harness.connect()
        client.transport.pauseProducing()
        client.transport.write(b"\x00\x01\x00\x00\x10" + b"\x00" * 60_000)
        await sleep(0.1)
        [server] = harness.live()
        tcp = weakref.ref(server.transport.transport)
        buffer = weakref.ref(server.conn._frames)
        del server
        await sleep(1.5)  # frame timeout, GoAway, grace, abort
        assert harness.live() == [] and buffer() is None and tcp() is None
        client.transport.abortConnection()
        await client.lost
    finally:
        gc.enable()
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_unfinished_frames_per_identity_are_capped(certs: Path) -> None:
    """
    The bytes of incomplete frames one identity holds on all its
    connections are bounded: the connection whose bytes go over is closed
    with GoAway(TOO_MANY_CONNECTIONS); another identity is not affected,
    and a closed connection's bytes no longer count.
    """
    harness = Harness(certs, ServerLimits(max_partial_bytes_per_identity=300_000))
    await harness.listen()
    try:
        first, second, bob = await harness.connect("alice"), await harness.connect("alice"), await harness.connect("bob")
        start = b"\x00\x10\x00\x00\x10" + b"\x00" * 200_000  # 200 KB of a 1 MiB frame
        first.transport.write(start)
        await sleep(0.2)
        bob.transport.write(start)
        await sleep(0.2)
        assert harness.factory.partial_held("alice", 0) >= 200_000
        second.transport.write(start)
        await second.lost
        [goaway] = [message for message in second.messages if isinstance(message, m.GoAway)]
        assert goaway.code == ErrorCode.TOO_MANY_CONNECTIONS and "unfinished" in goaway.message
        assert not first.lost.called and not bob.lost.called
        first.transport.loseConnection()
        await first.lost
        await sleep(0.1)
        assert harness.factory.partial_held("alice", 0) == 0
        bob.transport.loseConnection()
        await bob.lost
        await sleep(0.1)
        assert harness.factory.partial_held("bob", 0) == 0
    finally:
        await harness.close()


@pytest_twisted.ensureDeferred
async def test_a_flood_of_requests_does_not_hold_up_another_connection(certs: Path) -> None:
    """
    A connection serves at most INBOX_TURN requests per turn of the
    reactor: another client's request, sent just after a flood of
    thousands in one write, is answered long before the flood is.
    """
    from jobworker.server.connection import INBOX_TURN

    harness = Harness(certs, ServerLimits(audit_burst=10))
    await harness.listen()
    try:
        job = harness.manager.add()
        flood, quiet = await harness.connect("alice"), await harness.connect("bob")
        count = 3000
        flood.send(*(m.StatusRequest(flood.conn.next_request_id(), job.job_id) for _ in range(count)))
        await sleep(0)
        quiet.send(m.StatusRequest(quiet.conn.next_request_id(), job.job_id))
        flood_answers_then = None
        for _ in range(500):
            if quiet.messages and flood_answers_then is None:
                flood_answers_then = len(flood.messages)
            if len(flood.messages) >= count:
                break
            await sleep(0.01)
        assert len(flood.messages) == count
        assert flood_answers_then is not None and flood_answers_then < count // 2, flood_answers_then
        assert INBOX_TURN < count // 10
        for client in (flood, quiet):
            client.transport.loseConnection()
            await client.lost
    finally:
        await harness.close()
