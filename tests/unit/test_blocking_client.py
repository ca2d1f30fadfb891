"""
Tests for how L{jobworker.blocking.BlockingClient} reads frames: one reused
receive buffer, filled by C{recv_into} one TLS record at a time, fed to the
protocol core only once it holds whole frames, its partial tail moved to
the front for the next read.

No network: the client's socket is replaced by L{ScriptedSocket}, which
hands out a server's byte stream in scripted pieces and records what the
client sends.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from jobworker.blocking import CIPHER_READ, BlockingClient, ConnectionFailed
from jobworker.blocking.channel import TLSChannel as _TLSChannel
from jobworker.blocking.tls import client_ssl_context
from jobworker.errors import ErrorCode
from jobworker.protocol import messages as m
from jobworker.protocol.connection import DEFAULT_MAX_FRAME_SIZE
from jobworker.protocol.flow import MAX_WINDOW
from jobworker.protocol.framing import FrameBuffer
from jobworker.protocol.wire import HEADER_SIZE, OUTPUT_HEAD_SIZE, decode_body, encode_message
from tests.unit.test_framing import SETTINGS, split_at
from tests.unit.test_tls import PKI, pki  # noqa: F401 - the fixture

# The client never handshakes here; one context serves every test.
CONTEXT = ssl.create_default_context()
JOB = uuid.UUID(int=0x1234)
HELLO = m.ServerHello(m.PROTOCOL_VERSION, 1 << 20, "test-server", "alice", "user")
# The largest record TLS hands over in one read.
RECORD = 16 << 10


class ScriptedSocket:
    """
    Stands in for the client's L{_TLSChannel}: C{recv_into} hands out the
    scripted pieces in order (a piece larger than the room it is offered is
    split, as a socket would), then 0 for end of file.
    """

    def __init__(self, pieces: Sequence[bytes] = ()) -> None:
        self.pieces = [piece for piece in pieces if piece]
        self.sent: list[bytes] = []
        self.reads = 0

    def feed(self, pieces: list[bytes]) -> None:
        self.pieces.extend(piece for piece in pieces if piece)

    def recv_into(self, view: memoryview) -> int:
        self.reads += 1
        if not self.pieces:
            return 0
        piece = self.pieces[0]
        size = min(len(piece), len(view))
        assert size, "recv_into offered no room"
        view[:size] = piece[:size]
        if size < len(piece):
            self.pieces[0] = piece[size:]
        else:
            del self.pieces[0]
        return size

    def sendall(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def close(self) -> None:
        pass

    def sent_messages(self) -> list[m.Message]:
        frames = FrameBuffer(1 << 24)
        return [decode_body(kind, body) for kind, body in frames.receive(b"".join(self.sent))]


def handshake(hello_pieces: list[bytes] | None = None) -> tuple[BlockingClient, ScriptedSocket]:
    """
    A client past the hello exchange, as L{BlockingClient.connect} leaves
    it: the server's hello read (in C{hello_pieces}), the client's sent.
    """
    client = BlockingClient(("127.0.0.1", 1), CONTEXT)
    sock = ScriptedSocket(hello_pieces or [encode_message(HELLO)])
    client._sock = sock  # type: ignore[assignment]  # a scripted socket
    hello = client._next_message()
    assert hello == HELLO
    client.hello = hello
    client._write(client.conn.send(m.ClientHello(m.PROTOCOL_VERSION, client.conn.max_frame_size)))
    assert client.conn.is_open
    assert sock.sent_messages() == [m.ClientHello(m.PROTOCOL_VERSION, client.conn.max_frame_size)]
    return client, sock


def open_stream(client: BlockingClient) -> tuple[int, int, m.OkResponse]:
    """
    Send a follow request with the largest window and a status request, as
    the client must before a server may answer either; return the stream
    id, the status request's id and the response that opens the stream.
    """
    stream_id = client.conn.next_stream_id()
    follow_id = client.conn.next_request_id()
    client._write(client.conn.send(m.FollowRequest(follow_id, JOB, stream_id, 0, MAX_WINDOW, True)))
    status_id = client.conn.next_request_id()
    client._write(client.conn.send(m.StatusRequest(status_id, JOB)))
    return stream_id, status_id, m.OkResponse(follow_id)


def status(state: m.JobState = m.JobState.RUNNING) -> m.JobStatus:
    return m.JobStatus(JOB, "alice", ("cat", "big"), state, created_at=1, output_bytes=12345)


def output_frames(
    stream_id: int, status_id: int, sizes: list[int], seed: int, status_at: int
) -> list[m.Message]:
    """
    What a server sends on an open stream: outputs of the given sizes
    (random bytes, so a byte read from the wrong place shows), a gap, the
    status response slipped in at C{status_at}, and the end of the stream.
    """
    rng = random.Random(seed)
    messages: list[m.Message] = []
    offset = 0
    for index, size in enumerate(sizes):
        messages.append(m.Output(stream_id, 1 + index % 2, offset, rng.randbytes(size)))
        offset += size
    messages.append(m.Gap(stream_id, offset, 100))
    messages.insert(status_at % (len(messages) + 1), m.StatusResponse(status_id, status()))
    messages.append(m.EndOfStream(stream_id, m.EndReason.JOB_ENDED, status(m.JobState.EXITED)))
    return messages


def records(stream: bytes, cuts: list[int], record: int) -> list[bytes]:
    """
    C{stream} cut at C{cuts}, and every piece longer than C{record} cut into
    C{record}-sized reads, as TLS hands them over.
    """
    pieces: list[bytes] = []
    for piece in split_at(stream, cuts):
        pieces.extend(piece[at : at + record] for at in range(0, len(piece), record))
    return pieces


def whole_frames_only(client: BlockingClient) -> list[int]:
    """
    Wrap the client's C{conn.receive_data} to check that every call gets
    whole frames only; return the list of frame counts per call.
    """
    counts: list[int] = []
    receive = client.conn.receive_data

    def checked(data: bytes | memoryview) -> list[m.Message]:
        position = frames = 0
        while position < len(data):
            assert len(data) - position >= HEADER_SIZE, "fed a partial header"
            position += HEADER_SIZE + int.from_bytes(data[position : position + HEADER_SIZE], "big")
            frames += 1
        assert position == len(data), "fed a partial frame"
        counts.append(frames)
        return receive(data)

    client.conn.receive_data = checked  # type: ignore[method-assign]  # watched
    return counts


# The largest Output data one frame within the client's maximum can carry.
MAX_DATA = DEFAULT_MAX_FRAME_SIZE - 1 - OUTPUT_HEAD_SIZE
sizes = st.lists(
    st.one_of(st.integers(0, 64), st.integers(0, 200 << 10), st.sampled_from([MAX_DATA, MAX_DATA - 1, RECORD])),
    max_size=6,
)


@settings(SETTINGS, max_examples=60)
@given(
    hello_cuts=st.lists(st.integers(0, 200), max_size=4),
    sizes=sizes,
    seed=st.integers(0, 2**32),
    status_at=st.integers(0, 10),
    cuts=st.lists(st.integers(0, 10**7), max_size=20),
    near=st.lists(st.integers(-HEADER_SIZE - 1, HEADER_SIZE + 1), min_size=1, max_size=8),
    record=st.sampled_from([RECORD, 40 << 10, 1, 7, 4093, 16389]),
)
def test_messages_survive_any_cut_into_reads(
    hello_cuts: list[int],
    sizes: list[int],
    seed: int,
    status_at: int,
    cuts: list[int],
    near: list[int],
    record: int,
) -> None:
    """
    However the server's stream is cut into reads (TLS records of up to
    16 KiB, odd sizes, cuts inside headers and right at frame boundaries,
    frames of exactly the client's maximum), the messages come out whole,
    equal and in order, and the protocol core is only ever fed whole frames.
    Catches a tail not moved to the front (or moved from the wrong place),
    a boundary off by a header, decoded data left as a view of the reused
    buffer, and a client that feeds the core every record again.
    """
    hello = encode_message(HELLO)
    client, sock = handshake(split_at(hello, hello_cuts))
    stream_id, status_id, opened = open_stream(client)
    expected = [opened, *output_frames(stream_id, status_id, sizes, seed, status_at)]
    encoded = [encode_message(message) for message in expected]
    stream = b"".join(encoded)
    # Cut near every frame boundary (header splits), and anywhere at random.
    boundaries = []
    position = 0
    for index, frame in enumerate(encoded):
        position += len(frame)
        boundaries.append(max(0, position + near[index % len(near)]))
    # Pieces of 1 byte .. 40 KiB; records under 4 KiB only for a small
    # stream, so an example stays a few thousand reads at most.
    if record < 4096 and len(stream) > 100_000:
        record = RECORD + record
    sock.feed(records(stream, cuts + boundaries, record))
    counts = whole_frames_only(client)
    received = [client._next_message() for _ in expected]
    assert received == expected
    assert all(type(message.data) is bytes for message in received if isinstance(message, m.Output))
    assert sum(counts) == len(expected)
    assert not sock.pieces
    assert client._filled == 0
    assert client.conn.open_streams == frozenset()


def test_a_frame_of_the_maximum_after_a_tail_fills_the_buffer_exactly() -> None:
    """
    A frame of exactly the client's maximum, arriving behind the tail of a
    small frame and in 40 KiB reads, fits the receive buffer to the byte
    (the last read is offered only the room left and split there).  Catches
    a buffer sized without the header, or a tail not moved to the front.
    """
    client, sock = handshake()
    stream_id, status_id, opened = open_stream(client)
    big = m.Output(stream_id, 1, 0, random.Random(1).randbytes(MAX_DATA))
    assert len(encode_message(big)) == len(client._receive_buffer)
    small = m.StatusResponse(status_id, status())
    # The OkResponse and the first bytes of the status response in one read.
    first = encode_message(opened)
    stream = first + encode_message(small) + encode_message(big) + encode_message(m.Gap(stream_id, MAX_DATA, 1))
    sock.feed(records(stream, [len(first) + 3], 40 << 10))
    counts = whole_frames_only(client)
    assert [client._next_message() for _ in range(4)][1:] == [small, big, m.Gap(stream_id, MAX_DATA, 1)]
    assert counts == [1, 1, 1, 1]


def test_follow_and_status_through_the_public_api() -> None:
    """
    The public calls read their answers through the same buffer: a status
    request answered in 3-byte reads, then a follow whose output arrives in
    TLS-sized records, acknowledged with a window update once half the
    window is consumed.
    """
    client, sock = handshake()
    sock.feed(records(encode_message(m.StatusResponse(1, status())), [], 3))
    assert client.status(JOB) == status()
    data = random.Random(2).randbytes(300_000)
    chunks = [data[at : at + 65536] for at in range(0, len(data), 65536)]
    stream = encode_message(m.OkResponse(2))
    offset = 0
    for chunk in chunks:
        stream += encode_message(m.Output(1, 1, offset, chunk))
        offset += len(chunk)
    end = m.EndOfStream(1, m.EndReason.JOB_ENDED, status(m.JobState.EXITED))
    stream += encode_message(end)
    sock.feed(records(stream, [], RECORD))
    got = list(client.follow(JOB, window=200_000))
    assert b"".join(message.data for message in got[:-1]) == data
    assert got[-1] == end
    sent = sock.sent_messages()
    assert sent[1:3] == [m.StatusRequest(1, JOB), m.FollowRequest(2, JOB, 1, 0, 200_000, True)]
    assert [message for message in sent if isinstance(message, m.WindowUpdate)]


def _assert_goaway_sent(sock: ScriptedSocket, code: ErrorCode) -> None:
    goaway = sock.sent_messages()[-1]
    assert isinstance(goaway, m.GoAway)
    assert goaway.code == code


@pytest.mark.parametrize("after_a_frame", [False, True])
@pytest.mark.parametrize("piece", [1, 3, RECORD])
def test_oversized_length_fails_on_the_header_alone(after_a_frame: bool, piece: int) -> None:
    """
    A frame announcing more than the client's maximum is refused as soon
    as its header is read, with no body to follow (the server then closes):
    ConnectionFailed naming the protocol, and a GoAway attempted.  Catches
    a client that waits for the body of a frame it can never hold (it
    would see the end of file instead, or fill its buffer and stall).
    """
    client, sock = handshake()
    before = [open_stream(client)[2]] if after_a_frame else []
    header = (client.conn.max_frame_size + 1).to_bytes(4, "big")
    stream = b"".join(map(encode_message, before)) + header + bytes([m.Output.TYPE]) + bytes(100)
    sock.feed(records(stream, [], piece))
    received = []
    with pytest.raises(ConnectionFailed) as caught:
        for _ in range(len(before) + 1):
            received.append(client._next_message())
    # A good frame read together with the bad header goes down with it.
    assert received in (before, [])
    assert "protocol" in str(caught.value)
    _assert_goaway_sent(sock, ErrorCode.FRAME_TOO_LARGE)


@pytest.mark.parametrize("length", [2**32 - 1, 2**31, (1 << 20) + 1])
def test_huge_length_refused_before_reading_on(length: int) -> None:
    """
    The header of a huge frame is refused at once: the client does not
    read on after it (the fake socket would hand out more junk).
    """
    client, sock = handshake()
    sock.feed([length.to_bytes(4, "big"), b"\x30" + bytes(1000), bytes(RECORD)])
    reads = sock.reads
    with pytest.raises(ConnectionFailed) as caught:
        client._next_message()
    assert "protocol" in str(caught.value)
    assert sock.reads == reads + 1
    _assert_goaway_sent(sock, ErrorCode.FRAME_TOO_LARGE)


def test_zero_length_frame_is_a_protocol_failure() -> None:
    """
    A length of 0 (no room for the type byte) is fed to the core at once,
    which refuses it, rather than skipped or waited on.
    """
    client, sock = handshake()
    sock.feed([b"\x00\x00\x00\x00"])
    with pytest.raises(ConnectionFailed) as caught:
        client._next_message()
    assert "protocol" in str(caught.value)
    _assert_goaway_sent(sock, ErrorCode.PROTOCOL_ERROR)


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, 50_000])
def test_server_closing_mid_frame_fails(cut: int) -> None:
    """
    The server closing with a frame half sent is ConnectionFailed, after
    the whole frames before it were delivered; never a hang, nor a
    truncated message handed out as if whole.
    """
    client, sock = handshake()
    stream_id, status_id, opened = open_stream(client)
    output = encode_message(m.Output(stream_id, 1, 0, bytes(60_000)))
    sock.feed(records(encode_message(opened) + output[:cut], [], RECORD))
    assert isinstance(client._next_message(), m.OkResponse)
    with pytest.raises(ConnectionFailed) as caught:
        client._next_message()
    assert "closed" in str(caught.value)


def test_server_closing_before_the_hello_fails() -> None:
    client = BlockingClient(("127.0.0.1", 1), CONTEXT)
    client._sock = ScriptedSocket([encode_message(HELLO)[:5]])  # type: ignore[assignment]  # a scripted socket
    with pytest.raises(ConnectionFailed):
        client._next_message()


# -- the TLS channel over a real socket ---------------------------------------------
#
# _TLSChannel against a standard-library TLS server on loopback: the bytes and
# the ends of the stream must be SSLSocket's, in far fewer system calls.


class CountingSocket(socket.socket):
    """
    A socket that counts the C{recv_into} calls made on it.
    """

    reads = 0

    def recv_into(self, buffer, nbytes=0, flags=0):
        self.reads += 1
        return super().recv_into(buffer, nbytes, flags)


@contextmanager
def tls_server(pki: PKI, serve: Callable[[ssl.SSLSocket], None], *, client_ca: Path | None = None) -> Iterator[tuple[_TLSChannel, threading.Event]]:
    """
    A one-connection TLS 1.3 server thread running C{serve}, and a channel
    connected to it and past its handshake.  C{client_ca}: the server asks
    for a client certificate from that CA.  The event is set once C{serve}
    returns.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(*pki.pair("server"))
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    listener = socket.create_server(("127.0.0.1", 0))
    served = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            connection, _ = listener.accept()
            with connection:
                try:
                    tls = context.wrap_socket(connection, server_side=True)
                except ssl.SSLError:
                    return  # the handshake failed: the test sees that side
                serve(tls)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)
        finally:
            served.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    raw = CountingSocket(socket.AF_INET, socket.SOCK_STREAM)
    # Room in the kernel for all a test sends before the channel reads.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    raw.settimeout(10)
    try:
        raw.connect(listener.getsockname())
        channel = _TLSChannel(raw, client_ssl_context(pki.ca(), *pki.pair("alice")), "localhost")
        channel.handshake()
        yield channel, served
    finally:
        raw.close()
        thread.join(10)
        listener.close()
    assert not failures, failures


def receive_all(channel: _TLSChannel) -> bytes:
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    received = bytearray()
    while size := channel.recv_into(view):
        assert size <= 16 << 10  # one record at most
        received += view[:size]
    return bytes(received)


@pytest.mark.parametrize("close_notify", [True, False], ids=["close_notify", "abrupt"])
def test_channel_reads_many_records_per_system_call(pki: PKI, close_notify: bool) -> None:
    """
    1 MiB sent in 64 records reaches the channel whole, in a handful of
    C{recv} calls (an SSLSocket makes two per record), and the end of the
    stream reads as 0 whether the server sent close_notify or just closed.
    """
    payload = random.Random(7).randbytes(1 << 20)

    def serve(tls: ssl.SSLSocket) -> None:
        tls.sendall(payload)
        if close_notify:
            # Send close_notify; do not wait for the client's.
            tls.setblocking(False)
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.unwrap()

    with tls_server(pki, serve) as (channel, served):
        assert served.wait(10)
        before = channel.socket.reads
        assert receive_all(channel) == payload
        reads = channel.socket.reads - before
    assert reads <= len(payload) // CIPHER_READ + 3, reads


def test_channel_sends_large_writes_whole(pki: PKI) -> None:
    payload = random.Random(8).randbytes(300_000)
    echoed = []

    def serve(tls: ssl.SSLSocket) -> None:
        received = b""
        while len(received) < len(payload):
            received += tls.recv(1 << 16)
        echoed.append(received)

    with tls_server(pki, serve) as (channel, served):
        channel.sendall(payload)
        assert served.wait(10)
    assert echoed == [payload]


def test_channel_reports_the_server_refusing_the_client(pki: PKI) -> None:
    """
    A server refusing the client's certificate says so with an alert after
    the client's side of the TLS 1.3 handshake is done: the first read
    raises C{ssl.SSLError}, it does not read as a clean end of stream.
    """
    with tls_server(pki, lambda tls: None, client_ca=pki.other_ca) as (channel, served):
        assert served.wait(10)
        with pytest.raises(ssl.SSLError):
            receive_all(channel)


def test_channel_reports_a_server_of_another_name(pki: PKI) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*pki.pair("server"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=lambda: _accept_and_handshake(listener, context), daemon=True)
        thread.start()
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        with raw:
            channel = _TLSChannel(raw, client_ssl_context(pki.ca(), *pki.pair("alice")), "not-the-server.example")
            with pytest.raises(ssl.SSLCertVerificationError):
                channel.handshake()
        thread.join(10)


def _accept_and_handshake(listener: socket.socket, context: ssl.SSLContext) -> None:
    connection, _ = listener.accept()
    with connection:
        try:
            context.wrap_socket(connection, server_side=True)
        except (ssl.SSLError, OSError):
            pass
