"""
Tests for the sans-IO connection state machine
(L{jobworker.protocol.connection}).

Most tests drive two L{Connection}s, a server and a client, feeding each the
bytes the other produced, so every rule is checked from both ends: what one
end may send, the other must accept, and what one end refuses to send, the
other treats as the peer breaking the protocol.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jobworker.errors import ErrorCode, ProtocolError
from jobworker.protocol import messages as m
from jobworker.protocol.connection import (
    DEFAULT_MAX_FRAME_SIZE,
    MIN_FRAME_SIZE,
    Connection,
    Role,
)
from jobworker.protocol.flow import MAX_WINDOW
from jobworker.protocol.wire import (
    MAX_FRAME_LIMIT,
    decode_body,
    encode_message,
    encode_output,
    frame_header,
)
from tests.unit.test_framing import any_message, split_at

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JOB = uuid.UUID("12345678-1234-5678-1234-567812345678")
V = m.PROTOCOL_VERSION


def server_hello(max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, version: int = V) -> m.ServerHello:
    return m.ServerHello(version, max_frame_size, "worker-1", "alice", "user")


def open_pair(
    server_max: int = DEFAULT_MAX_FRAME_SIZE, client_max: int = DEFAULT_MAX_FRAME_SIZE
) -> tuple[Connection, Connection]:
    """
    A server and a client after a complete hello exchange.
    """
    server = Connection(Role.SERVER, max_frame_size=server_max)
    client = Connection(Role.CLIENT, max_frame_size=client_max)
    assert client.receive_data(server.send(server_hello(server_max))) == [server_hello(server_max)]
    assert server.receive_data(client.send(m.ClientHello(V, client_max))) == [m.ClientHello(V, client_max)]
    assert server.is_open and client.is_open
    return server, client


def request(server: Connection, client: Connection, message: m.Message) -> m.Message:
    """
    The client sends C{message}; the server receives it.
    """
    assert server.receive_data(client.send(message)) == [message]
    return message


def respond(server: Connection, client: Connection, message: m.Message) -> m.Message:
    assert client.receive_data(server.send(message)) == [message]
    return message


def open_stream(server: Connection, client: Connection, stream_id: int = 7, window: int = 100) -> int:
    """
    Open output stream C{stream_id} with C{window}; return the request id.
    """
    request_id = client.next_request_id()
    request(server, client, m.FollowRequest(request_id, JOB, stream_id, window=window))
    assert stream_id not in server.open_streams
    respond(server, client, m.OkResponse(request_id))
    return request_id


def status(state: m.JobState = m.JobState.EXITED, argv: tuple[str, ...] = ("true",)) -> m.JobStatus:
    return m.JobStatus(job_id=JOB, owner="alice", argv=argv, state=state, exit_code=0)


def raises_protocol_error(connection: Connection, data: bytes, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
    """
    C{data} makes C{connection} raise a ProtocolError with C{code}, after
    which it is closed and ignores everything.
    """
    with pytest.raises(ProtocolError) as caught:
        connection.receive_data(data)
    assert caught.value.code is code
    assert connection.is_closed
    assert not connection.is_open
    assert connection.receive_data(data) == []
    assert connection.receive_data(encode_message(m.ListRequest(99))) == []


# -- construction and hello ------------------------------------------------------


@pytest.mark.parametrize("size", [MIN_FRAME_SIZE - 1, MAX_FRAME_LIMIT + 1, 0])
def test_max_frame_size_out_of_range(size: int) -> None:
    with pytest.raises(ValueError):
        Connection(Role.SERVER, max_frame_size=size)


def test_hello_exchange() -> None:
    server = Connection(Role.SERVER, max_frame_size=64 << 10)
    client = Connection(Role.CLIENT, max_frame_size=32 << 10)
    assert not server.is_open and not client.is_open

    hello = server.send(server_hello(64 << 10))
    assert not server.is_open  # it has not heard the client yet
    assert client.receive_data(hello) == [server_hello(64 << 10)]
    assert client.peer_hello == server_hello(64 << 10)
    assert not client.is_open  # it has not answered yet

    reply = client.send(m.ClientHello(V, 32 << 10))
    assert client.is_open
    assert server.receive_data(reply) == [m.ClientHello(V, 32 << 10)]
    assert server.is_open
    assert server.peer_max_frame_size == 32 << 10
    assert client.peer_max_frame_size == 64 << 10
    # Output to the client fits the client's frames, not the server's.
    assert server.max_output_chunk() == (32 << 10) - 1 - 13


def test_hello_split_into_single_bytes() -> None:
    server = Connection(Role.SERVER)
    client = Connection(Role.CLIENT)
    received = []
    for byte in server.send(server_hello()):
        received += client.receive_data(bytes((byte,)))
    assert received == [server_hello()]


def test_client_cannot_speak_before_the_server_hello() -> None:
    client = Connection(Role.CLIENT)
    with pytest.raises(ValueError):
        client.send(m.ClientHello(V, DEFAULT_MAX_FRAME_SIZE))
    with pytest.raises(ValueError):
        client.send(m.ListRequest(1))
    assert client.pending_requests == 0


def test_client_cannot_request_before_its_own_hello() -> None:
    client = Connection(Role.CLIENT)
    client.receive_data(Connection(Role.SERVER).send(server_hello()))
    with pytest.raises(ValueError):
        client.send(m.ListRequest(1))


def test_server_cannot_respond_before_the_exchange_ends() -> None:
    server = Connection(Role.SERVER)
    server.send(server_hello())
    with pytest.raises(ValueError):
        server.send(m.OkResponse(1))


def test_hello_must_announce_the_connection_maximum() -> None:
    server = Connection(Role.SERVER, max_frame_size=64 << 10)
    with pytest.raises(ValueError):
        server.send(server_hello(32 << 10))


def test_hello_only_once() -> None:
    server, client = open_pair()
    with pytest.raises(ValueError):
        server.send(server_hello())
    with pytest.raises(ValueError):
        client.send(m.ClientHello(V, DEFAULT_MAX_FRAME_SIZE))


def test_server_rejects_a_request_before_client_hello() -> None:
    server = Connection(Role.SERVER)
    server.send(server_hello())
    raises_protocol_error(server, encode_message(m.ListRequest(1)))


def test_server_rejects_a_request_before_its_own_hello() -> None:
    server = Connection(Role.SERVER)
    raises_protocol_error(server, encode_message(m.StatusRequest(1, JOB)))


def test_server_not_open_until_it_has_sent_its_own_hello() -> None:
    """
    A client hello alone does not open a server that has not spoken yet: a
    request then is out of order.
    """
    server = Connection(Role.SERVER)
    hello = encode_message(m.ClientHello(V, DEFAULT_MAX_FRAME_SIZE))
    raises_protocol_error(server, hello + encode_message(m.ListRequest(1)))


def test_client_rejects_anything_but_hello_first() -> None:
    client = Connection(Role.CLIENT)
    raises_protocol_error(client, encode_message(m.OkResponse(1)))


@pytest.mark.parametrize("version", [0, 1, 2])
def test_client_refuses_a_server_speaking_only_older_versions(version: int) -> None:
    """
    A version 1 server (or anything older than we speak) is refused at its
    hello, with a message that names both versions.
    """
    client = Connection(Role.CLIENT)
    with pytest.raises(ProtocolError) as caught:
        client.receive_data(encode_message(server_hello(version=version)))
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert f"version {version}" in caught.value.message and str(V) in caught.value.message
    assert client.is_closed


@pytest.mark.parametrize("version", [V, V + 1, 0xFFFF])
def test_client_speaks_the_highest_common_version(version: int) -> None:
    """
    A server's hello names the highest version it speaks: a newer server
    is answered with our own version, which it must accept.
    """
    client = Connection(Role.CLIENT)
    client.receive_data(encode_message(server_hello(version=version)))
    assert client.version == V
    with pytest.raises(ValueError):
        client.send(m.ClientHello(version + 1 if version < 0xFFFF else 1, DEFAULT_MAX_FRAME_SIZE))
    client.send(m.ClientHello(V, DEFAULT_MAX_FRAME_SIZE))
    assert client.is_open


@pytest.mark.parametrize("version", [0, 1, 2, V + 1, 0xFFFF])
def test_server_refuses_unsupported_client_version(version: int) -> None:
    server = Connection(Role.SERVER)
    server.send(server_hello())
    raises_protocol_error(
        server, encode_message(m.ClientHello(version, DEFAULT_MAX_FRAME_SIZE)), ErrorCode.UNSUPPORTED_VERSION
    )


def hellos(server: Connection, client: Connection) -> None:
    client.receive_data(server.send(server_hello(version=server.version)))
    server.receive_data(client.send(m.ClientHello(client.version, DEFAULT_MAX_FRAME_SIZE)))
    assert server.is_open and client.is_open


def test_a_version_3_client_is_served_in_version_3() -> None:
    """
    A version 3 client's list requests, the bytes version 3 defined (sent
    right behind its hello, in the same read), are read as version 3 by
    a version 4 server: oldest first.
    """
    server = Connection(Role.SERVER)
    client = Connection(Role.CLIENT, versions={3})
    client.receive_data(server.send(server_hello(version=V)))
    assert client.version == 3
    hello = client.send(m.ClientHello(3, DEFAULT_MAX_FRAME_SIZE))
    frame = client.send(m.ListRequest(8))
    # protocol-spec/vectors/list_request.json, list_request.basic.
    assert frame.hex() == "000000291300000008" + "00" * 36
    assert server.receive_data(hello + frame) == [m.ClientHello(3, DEFAULT_MAX_FRAME_SIZE), m.ListRequest(8)]
    assert server.version == 3
    with pytest.raises(ValueError, match="version 4"):
        client.send(m.ListRequest(9, newest_first=True))
    # A version 4 request on a version 3 connection: one byte too many.
    raises_protocol_error(server, encode_message(m.ListRequest(10), 4))


def test_a_version_4_client_of_a_version_3_server_speaks_version_3() -> None:
    server = Connection(Role.SERVER, versions={3})
    client = Connection(Role.CLIENT)
    hellos(server, client)
    assert server.version == client.version == 3
    with pytest.raises(ValueError, match="version 4"):
        client.send(m.ListRequest(1, newest_first=True))
    assert request(server, client, m.ListRequest(2, owner="bob")) == m.ListRequest(2, owner="bob")


def test_version_4_ends_speak_version_4() -> None:
    server, client = Connection(Role.SERVER), Connection(Role.CLIENT)
    hellos(server, client)
    assert server.version == client.version == 4
    asked = m.ListRequest(1, 5, JOB, newest_first=True)
    assert request(server, client, asked) == asked


@pytest.mark.parametrize("versions", [set(), {2}, {3, 5}])
def test_only_versions_this_implementation_speaks_may_be_chosen(versions: set[int]) -> None:
    with pytest.raises(ValueError):
        Connection(Role.CLIENT, versions=versions)


@pytest.mark.parametrize("size", [0, MIN_FRAME_SIZE - 1, MAX_FRAME_LIMIT + 1, 2**32 - 1])
def test_peer_max_frame_size_out_of_range(size: int) -> None:
    server = Connection(Role.SERVER)
    server.send(server_hello())
    raises_protocol_error(server, encode_message(m.ClientHello(V, size)))


@pytest.mark.parametrize("size", [MIN_FRAME_SIZE, MAX_FRAME_LIMIT])
def test_peer_max_frame_size_at_the_bounds(size: int) -> None:
    server = Connection(Role.SERVER)
    server.send(server_hello())
    server.receive_data(encode_message(m.ClientHello(V, size)))
    assert server.is_open
    assert server.peer_max_frame_size == size


def test_second_hello_is_a_protocol_error() -> None:
    server, client = open_pair()
    raises_protocol_error(client, encode_message(server_hello()))
    raises_protocol_error(server, encode_message(m.ClientHello(V, DEFAULT_MAX_FRAME_SIZE)))


# -- direction -------------------------------------------------------------------

CLIENT_ONLY = [
    m.ClientHello(V, DEFAULT_MAX_FRAME_SIZE),
    m.StartRequest(1, ("true",)),
    m.StopRequest(1, JOB),
    m.StatusRequest(1, JOB),
    m.ListRequest(1),
    m.WaitRequest(1, JOB),
    m.FollowRequest(1, JOB, 1),
    m.RemoveRequest(1, JOB),
    m.WindowUpdate(1, 1),
    m.CancelStream(1),
]
SERVER_ONLY = [
    server_hello(),
    m.StartResponse(1, JOB),
    m.StatusResponse(1, status()),
    m.ListResponse(1, ()),
    m.OkResponse(1),
    m.ErrorResponse(1, 3, "no"),
    m.Output(1, 1, 0, b"x"),
    m.Gap(1, 0, 1),
    m.EndOfStream(1, m.EndReason.JOB_ENDED, status()),
]


@pytest.mark.parametrize("message", SERVER_ONLY, ids=lambda message: type(message).__name__)
def test_server_refuses_server_messages(message: m.Message) -> None:
    server, _ = open_pair()
    raises_protocol_error(server, encode_message(message))


@pytest.mark.parametrize("message", CLIENT_ONLY, ids=lambda message: type(message).__name__)
def test_client_refuses_client_messages(message: m.Message) -> None:
    _, client = open_pair()
    raises_protocol_error(client, encode_message(message))


@pytest.mark.parametrize("message", SERVER_ONLY, ids=lambda message: type(message).__name__)
def test_client_does_not_send_server_messages(message: m.Message) -> None:
    _, client = open_pair()
    with pytest.raises(ValueError):
        client.send(message)
    assert client.is_open


@pytest.mark.parametrize("message", CLIENT_ONLY, ids=lambda message: type(message).__name__)
def test_server_does_not_send_client_messages(message: m.Message) -> None:
    server, _ = open_pair()
    with pytest.raises(ValueError):
        server.send(message)
    assert server.is_open


# -- requests and responses ------------------------------------------------------


def test_request_response_round() -> None:
    server, client = open_pair()
    request(server, client, m.StartRequest(1, ("sleep", "1"), env=(("A", "b"),)))
    request(server, client, m.StatusRequest(2, JOB))
    assert server.pending_requests == client.pending_requests == 2
    respond(server, client, m.StatusResponse(2, status()))  # out of order is fine
    respond(server, client, m.StartResponse(1, JOB))
    assert server.pending_requests == client.pending_requests == 0


def test_duplicate_pending_request_id_is_a_protocol_error() -> None:
    server, _ = open_pair()
    server.receive_data(encode_message(m.StatusRequest(5, JOB)))
    raises_protocol_error(server, encode_message(m.ListRequest(5)))


def test_request_id_reusable_once_answered() -> None:
    server, client = open_pair()
    request(server, client, m.StatusRequest(5, JOB))
    respond(server, client, m.ErrorResponse(5, ErrorCode.NOT_FOUND, "no such job"))
    request(server, client, m.ListRequest(5))
    assert server.pending_requests == 1


def test_client_refuses_to_reuse_a_pending_request_id() -> None:
    server, client = open_pair()
    request(server, client, m.StatusRequest(5, JOB))
    with pytest.raises(ValueError):
        client.send(m.ListRequest(5))
    assert client.pending_requests == 1


def test_response_to_unknown_request_is_a_protocol_error() -> None:
    _, client = open_pair()
    raises_protocol_error(client, encode_message(m.OkResponse(3)))


def test_second_response_is_a_protocol_error() -> None:
    server, client = open_pair()
    request(server, client, m.RemoveRequest(3, JOB))
    ok = server.send(m.OkResponse(3))
    client.receive_data(ok)
    raises_protocol_error(client, ok)


def test_server_answers_each_request_once() -> None:
    server, client = open_pair()
    with pytest.raises(ValueError):
        server.send(m.OkResponse(3))
    request(server, client, m.RemoveRequest(3, JOB))
    server.send(m.OkResponse(3))
    with pytest.raises(ValueError):
        server.send(m.ErrorResponse(3, 1, "again"))


def test_request_ids_and_stream_ids_are_fresh() -> None:
    client = Connection(Role.CLIENT)
    assert len({client.next_request_id() for _ in range(100)}) == 100
    assert len({client.next_stream_id() for _ in range(100)}) == 100


# -- follow streams --------------------------------------------------------------


def test_ok_response_opens_the_stream_on_both_ends() -> None:
    server, client = open_pair()
    open_stream(server, client, stream_id=7, window=100)
    assert server.open_streams == client.open_streams == frozenset({7})
    assert server.send_window(7) == 100


def test_error_response_does_not_open_the_stream() -> None:
    server, client = open_pair()
    request(server, client, m.FollowRequest(1, JOB, 7, window=100))
    respond(server, client, m.ErrorResponse(1, ErrorCode.NOT_FOUND, "no such job"))
    assert server.open_streams == client.open_streams == frozenset()
    with pytest.raises(ValueError):
        server.send(m.Gap(7, 0, 1))
    raises_protocol_error(client, encode_output(7, 1, 0, b"x"))


def test_stream_id_free_again_after_a_refused_follow() -> None:
    server, client = open_pair()
    request(server, client, m.FollowRequest(1, JOB, 7))
    respond(server, client, m.ErrorResponse(1, ErrorCode.NOT_FOUND, "no such job"))
    open_stream(server, client, stream_id=7)
    assert server.open_streams == frozenset({7})


def test_output_within_the_window() -> None:
    server, client = open_pair()
    open_stream(server, client, window=100)
    first = client.receive_data(server.send_output(7, 1, 0, b"a" * 60))
    second = client.receive_data(server.send(m.Output(7, 2, 60, b"\x00" * 40)))
    assert first == [m.Output(7, 1, 0, b"a" * 60)]
    assert second == [m.Output(7, 2, 60, b"\x00" * 40)]
    assert server.send_window(7) == 0


def test_output_heads_and_data_side_by_side() -> None:
    """
    Heads from send_output_head, each followed by its data, in one buffer
    (as the server sends a turn's frames) are the same frames, and use the
    window as send_output does.
    """
    server, client = open_pair()
    open_stream(server, client, window=100)
    pieces: list[bytes | memoryview] = [
        server.send_output_head(7, 1, 0, 60), b"a" * 60,
        server.send_output_head(7, 2, 60, 30), memoryview(b"\x00" * 30),
    ]
    assert server.send_window(7) == 10
    assert client.receive_data(b"".join(pieces)) == [m.Output(7, 1, 0, b"a" * 60), m.Output(7, 2, 60, b"\x00" * 30)]
    assert server.send_output_head(7, 1, 90, 10) + b"z" * 10 == encode_output(7, 1, 90, b"z" * 10)


@pytest.mark.parametrize("path", ["send", "send_output", "send_output_head"])
def test_server_refuses_output_beyond_the_window(path: str) -> None:
    server, client = open_pair()
    open_stream(server, client, window=100)
    server.send_output(7, 1, 0, b"a" * 90)
    with pytest.raises(ValueError):
        if path == "send":
            server.send(m.Output(7, 1, 90, b"b" * 11))
        elif path == "send_output":
            server.send_output(7, 1, 90, b"b" * 11)
        else:
            server.send_output_head(7, 1, 90, 11)
    assert server.send_window(7) == 10
    assert server.is_open


def test_output_head_for_a_stream_not_open_or_too_large() -> None:
    server, client = open_pair()
    with pytest.raises(ValueError):
        server.send_output_head(7, 1, 0, 1)
    open_stream(server, client, window=1 << 30)
    with pytest.raises(ValueError):
        server.send_output_head(7, 1, 0, server.max_output_chunk() + 1)
    assert server.send_window(7) == 1 << 30


def test_client_refuses_output_beyond_the_window() -> None:
    server, client = open_pair()
    open_stream(server, client, window=100)
    client.receive_data(server.send_output(7, 1, 0, b"a" * 100))
    raises_protocol_error(client, encode_output(7, 1, 100, b"b"), ErrorCode.FLOW_CONTROL_ERROR)


def test_gap_does_not_use_the_window() -> None:
    server, client = open_pair()
    open_stream(server, client, window=10)
    respond(server, client, m.Gap(7, 0, 1 << 40))
    assert server.send_window(7) == 10
    assert client.receive_data(server.send_output(7, 1, 1 << 40, b"x" * 10)) == [m.Output(7, 1, 1 << 40, b"x" * 10)]


def test_window_update_grants_more() -> None:
    server, client = open_pair()
    open_stream(server, client, window=100)
    client.receive_data(server.send_output(7, 1, 0, b"a" * 100))
    assert client.consumed(7, 20) == b""  # batched: less than half the window
    update = client.consumed(7, 40)
    assert server.receive_data(update) == [m.WindowUpdate(7, 60)]
    assert server.send_window(7) == 60
    client.receive_data(server.send_output(7, 1, 100, b"b" * 60))
    raises_protocol_error(client, encode_output(7, 1, 160, b"c"), ErrorCode.FLOW_CONTROL_ERROR)


def test_credit_granted_before_the_stream_opens_is_kept() -> None:
    """
    A WindowUpdate sent right behind its FollowRequest counts once the
    stream opens, on both ends.
    """
    server, client = open_pair()
    request(server, client, m.FollowRequest(1, JOB, 7, window=10))
    request(server, client, m.WindowUpdate(7, 5))
    respond(server, client, m.OkResponse(1))
    assert server.send_window(7) == 15
    client.receive_data(server.send_output(7, 1, 0, b"y" * 15))
    raises_protocol_error(client, encode_output(7, 1, 15, b"z"), ErrorCode.FLOW_CONTROL_ERROR)


def test_credit_before_the_stream_opens_cannot_overflow() -> None:
    server, client = open_pair()
    request(server, client, m.FollowRequest(1, JOB, 7, window=10))
    raises_protocol_error(server, encode_message(m.WindowUpdate(7, MAX_WINDOW)), ErrorCode.FLOW_CONTROL_ERROR)


def test_explicit_window_update_grants_more() -> None:
    server, client = open_pair()
    open_stream(server, client, window=0)
    with pytest.raises(ValueError):
        server.send_output(7, 1, 0, b"a")
    request(server, client, m.WindowUpdate(7, 5))
    assert server.send_window(7) == 5
    # The client counts its own grant: it accepts those 5 bytes, no more.
    client.receive_data(server.send_output(7, 1, 0, b"12345"))
    raises_protocol_error(client, encode_output(7, 1, 5, b"6"), ErrorCode.FLOW_CONTROL_ERROR)


@pytest.mark.parametrize("increment", [0, MAX_WINDOW - 99])
def test_window_update_that_breaks_the_window(increment: int) -> None:
    server, client = open_pair()
    open_stream(server, client, window=100)
    raises_protocol_error(server, encode_message(m.WindowUpdate(7, increment)), ErrorCode.FLOW_CONTROL_ERROR)


def test_window_update_up_to_the_maximum() -> None:
    server, client = open_pair()
    open_stream(server, client, window=100)
    request(server, client, m.WindowUpdate(7, MAX_WINDOW - 100))
    assert server.send_window(7) == MAX_WINDOW


def test_initial_window_above_the_maximum() -> None:
    server, _ = open_pair()
    raises_protocol_error(
        server, encode_message(m.FollowRequest(1, JOB, 7, window=MAX_WINDOW + 1)), ErrorCode.FLOW_CONTROL_ERROR
    )


def test_late_window_update_for_a_closed_stream_is_ignored() -> None:
    server, client = open_pair()
    open_stream(server, client, window=100)
    client.receive_data(server.send_output(7, 1, 0, b"a" * 100))
    respond(server, client, m.EndOfStream(7, m.EndReason.JOB_ENDED, status()))
    # The update crossed the end on the wire: the client had consumed the
    # data before it read the end.
    assert server.receive_data(encode_message(m.WindowUpdate(7, 100))) == [m.WindowUpdate(7, 100)]
    assert server.is_open
    assert client.consumed(7, 100) == b""  # nothing to grant on a closed stream


def test_end_of_stream_closes_the_stream() -> None:
    server, client = open_pair()
    open_stream(server, client)
    open_stream(server, client, stream_id=8)
    respond(server, client, m.EndOfStream(7, m.EndReason.CAUGHT_UP, status()))
    assert server.open_streams == client.open_streams == frozenset({8})
    with pytest.raises(ValueError):
        server.send(m.EndOfStream(7, m.EndReason.JOB_ENDED, status()))
    with pytest.raises(ValueError):
        server.send(m.Gap(7, 0, 1))
    raises_protocol_error(client, encode_output(7, 1, 0, b"late"))


def test_second_end_of_stream_is_a_protocol_error() -> None:
    server, client = open_pair()
    open_stream(server, client)
    end = server.send(m.EndOfStream(7, m.EndReason.JOB_ENDED, status()))
    client.receive_data(end)
    raises_protocol_error(client, end)


def test_stream_id_reusable_after_its_end() -> None:
    server, client = open_pair()
    open_stream(server, client)
    respond(server, client, m.EndOfStream(7, m.EndReason.JOB_ENDED, status()))
    open_stream(server, client, window=5)
    assert server.send_window(7) == 5


def test_cancel_then_end_of_stream() -> None:
    server, client = open_pair()
    open_stream(server, client)
    request(server, client, m.CancelStream(7))
    # The stream stays open until the server ends it, so output already
    # under way is still accounted for.
    respond(server, client, m.Output(7, 1, 0, b"in flight"))
    respond(server, client, m.EndOfStream(7, m.EndReason.CANCELLED, status()))
    assert server.open_streams == client.open_streams == frozenset()


@pytest.mark.parametrize(
    "message",
    [m.Output(9, 1, 0, b"x"), m.Gap(9, 0, 1), m.EndOfStream(9, m.EndReason.JOB_ENDED, status())],
    ids=lambda message: type(message).__name__,
)
def test_stream_message_for_unknown_stream_is_a_protocol_error(message: m.Message) -> None:
    server, client = open_pair()
    open_stream(server, client)
    raises_protocol_error(client, encode_message(message))


def test_stream_id_in_use_is_a_protocol_error() -> None:
    server, client = open_pair()
    open_stream(server, client)
    raises_protocol_error(server, encode_message(m.FollowRequest(50, JOB, 7)))


def test_stream_id_of_a_pending_follow_is_a_protocol_error() -> None:
    server, _ = open_pair()
    server.receive_data(encode_message(m.FollowRequest(1, JOB, 7)))
    raises_protocol_error(server, encode_message(m.FollowRequest(2, JOB, 7)))


def test_output_fits_the_peer_frame_size() -> None:
    server, client = open_pair(client_max=MIN_FRAME_SIZE)
    open_stream(server, client, window=1 << 20)
    chunk = server.max_output_chunk()
    frame = server.send_output(7, 1, 0, b"x" * chunk)
    assert len(frame) - 4 == MIN_FRAME_SIZE  # exactly the client's maximum
    assert client.receive_data(frame) == [m.Output(7, 1, 0, b"x" * chunk)]
    with pytest.raises(ValueError):
        server.send_output(7, 1, chunk, b"x" * (chunk + 1))
    with pytest.raises(ValueError):
        server.send(m.Output(7, 1, chunk, b"x" * (chunk + 1)))


@pytest.mark.parametrize("path", ["send", "send_output"])
def test_refused_oversized_output_leaves_the_window_alone(path: str) -> None:
    """
    Output refused for its size was never sent, so it must not use up
    credit: the client will never grant back bytes it did not receive.
    """
    server, client = open_pair(client_max=MIN_FRAME_SIZE)
    open_stream(server, client, window=100_000)
    data = b"x" * (server.max_output_chunk() + 1)
    with pytest.raises(ValueError):
        if path == "send":
            server.send(m.Output(7, 1, 0, data))
        else:
            server.send_output(7, 1, 0, data)
    assert server.send_window(7) == 100_000


@pytest.mark.parametrize("path", ["send Output", "send_output", "send Gap", "send EndOfStream"])
def test_stream_message_on_a_stream_not_open_is_a_value_error(path: str) -> None:
    """
    The documented error for a message that may not be sent now is
    ValueError, whatever the message.
    """
    server, _ = open_pair()
    with pytest.raises(ValueError):
        if path == "send Output":
            server.send(m.Output(7, 1, 0, b"x"))
        elif path == "send_output":
            server.send_output(7, 1, 0, b"x")
        elif path == "send Gap":
            server.send(m.Gap(7, 0, 1))
        else:
            server.send(m.EndOfStream(7, m.EndReason.JOB_ENDED, status()))


# -- a send never breaks the connection it is made on ----------------------------


def test_unencodable_request_leaves_no_pending_request() -> None:
    """
    A request that could not be encoded was never sent: its id must not be
    held as pending (no response will ever come for it).
    """
    server, client = open_pair()
    with pytest.raises(ValueError):
        client.send(m.StartRequest(1, ("x" * 70_000,)))  # longer than a wire string
    assert client.pending_requests == 0
    request(server, client, m.StartRequest(1, ("true",)))


def test_unencodable_response_leaves_the_request_pending() -> None:
    """
    Every request gets exactly one response: when the server's first answer
    cannot be encoded, it must still be able to send another.
    """
    server, client = open_pair()
    request(server, client, m.StatusRequest(1, JOB))
    with pytest.raises(ValueError):
        server.send(m.ErrorResponse(1, ErrorCode.INTERNAL, "x" * 70_000))
    assert server.pending_requests == 1
    respond(server, client, m.ErrorResponse(1, ErrorCode.INTERNAL, "internal error"))


def _sent_or_refused(sender: Connection, receiver: Connection, message: m.Message) -> None:
    """
    C{sender} either refuses C{message} (ValueError, our own bug) or the
    peer accepts its bytes: a legal call never yields a frame the peer must
    treat as fatal.
    """
    try:
        data = sender.send(message)
    except ValueError:
        return
    assert receiver.receive_data(data) == [message]


def test_response_larger_than_the_client_frame_size() -> None:
    server, client = open_pair(client_max=MIN_FRAME_SIZE)
    request(server, client, m.ListRequest(1))
    jobs = tuple(status(argv=("x" * 1000,)) for _ in range(20))  # ~ 22 KB: the server pages
    _sent_or_refused(server, client, m.ListResponse(1, jobs))
    if server.pending_requests:
        # Refused: the request still gets its one response.
        respond(server, client, m.ErrorResponse(1, ErrorCode.INTERNAL, "too many jobs to list"))
    assert server.pending_requests == client.pending_requests == 0


def test_response_of_exactly_the_client_frame_size() -> None:
    server, client = open_pair(client_max=MIN_FRAME_SIZE)
    request(server, client, m.ListRequest(1))
    # type (1) + request id (4) + code (2) + message length (2) + message
    message = "x" * (MIN_FRAME_SIZE - 1 - 4 - 2 - 2)
    _sent_or_refused(server, client, m.ErrorResponse(1, ErrorCode.INTERNAL, message + "x"))
    assert server.is_open and client.is_open
    respond(server, client, m.ErrorResponse(1, ErrorCode.INTERNAL, message))


def test_request_larger_than_the_server_frame_size() -> None:
    server, client = open_pair(server_max=MIN_FRAME_SIZE)
    _sent_or_refused(client, server, m.StartRequest(1, ("sh", "-c", "x" * 20_000)))


def test_client_refuses_a_window_update_past_the_maximum() -> None:
    server, client = open_pair()
    open_stream(server, client, window=100)
    _sent_or_refused(client, server, m.WindowUpdate(7, MAX_WINDOW))


def test_client_refuses_to_reuse_an_open_stream_id() -> None:
    server, client = open_pair()
    open_stream(server, client, stream_id=7)
    _sent_or_refused(client, server, m.FollowRequest(client.next_request_id(), JOB, 7))


# -- keep-alive ------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["server", "client"])
def test_ping_and_pong_in_both_directions(sender: str) -> None:
    server, client = open_pair()
    one, other = (server, client) if sender == "server" else (client, server)
    assert other.receive_data(one.send(m.Ping(7))) == [m.Ping(7)]
    assert one.receive_data(other.send(m.Pong(7))) == [m.Pong(7)]
    # An unasked Pong is not an error (it may answer a ping given up on).
    assert one.receive_data(other.send(m.Pong(99))) == [m.Pong(99)]
    assert server.is_open and client.is_open


def test_ping_before_the_hello_exchange_is_a_protocol_error() -> None:
    server = Connection(Role.SERVER)
    server.send(server_hello())
    raises_protocol_error(server, encode_message(m.Ping(1)))
    client = Connection(Role.CLIENT)
    with pytest.raises(ValueError):
        client.send(m.Ping(1))


# -- requests are handed out one at a time ---------------------------------------


def test_pending_requests_count_only_what_was_handed_out() -> None:
    """
    The server's cap counts requests it has seen and not answered; the
    requests behind them in the same read are not pending yet.
    """
    server, client = open_pair()
    burst = b"".join(client.send(m.WaitRequest(i, JOB)) for i in range(129))
    server.feed(burst)
    seen = []
    while (message := server.next_message()) is not None:
        seen.append(message)
        assert server.pending_requests == len(seen)
    assert [message.request_id for message in seen] == list(range(129))


def test_a_request_answered_at_once_frees_its_place_within_one_read() -> None:
    server, client = open_pair()
    data = b"".join(client.send(m.StatusRequest(client.next_request_id(), JOB)) for _ in range(300))
    server.feed(data)
    count = 0
    while (message := server.next_message()) is not None:
        assert server.pending_requests == 1
        client.receive_data(server.send(m.ErrorResponse(message.request_id, ErrorCode.NOT_FOUND, "no job")))
        count += 1
    assert count == 300 and server.pending_requests == 0


def test_a_request_id_reused_after_its_answer_within_one_read() -> None:
    """
    Id 5, answered, then id 5 again in the same read: legal (section 7).
    """
    server, client = open_pair()
    first = m.StatusRequest(5, JOB)
    data = client.send(first)
    client.receive_data(b"")  # nothing yet
    server.feed(data + encode_message(m.StatusRequest(5, JOB)))
    assert server.next_message() == first
    server.send(m.StatusResponse(5, status()))
    assert server.next_message() == m.StatusRequest(5, JOB)
    assert server.is_open


def test_malformed_frame_after_good_ones_is_raised_when_reached() -> None:
    server, client = open_pair()
    good = client.send(m.StatusRequest(1, JOB))
    server.feed(good + frame_header(1, 0x7F))
    assert server.next_message() == m.StatusRequest(1, JOB)
    with pytest.raises(ProtocolError):
        server.next_message()
    assert server.is_closed and server.next_message() is None


# -- statuses fit any frame --------------------------------------------------------


def big_status(argv_bytes: int = 20_000) -> m.JobStatus:
    argv = tuple(f"{i:04d}" + "x" * 995 for i in range(argv_bytes // 1000))
    return m.JobStatus(JOB, "alice", argv, m.JobState.EXITED, exit_code=3, workdir="/" + "w" * 30_000)


def test_end_of_stream_is_abridged_to_fit_the_smallest_client_frame() -> None:
    server, client = open_pair(client_max=MIN_FRAME_SIZE)
    open_stream(server, client, stream_id=7)
    frame = server.send(m.EndOfStream(7, m.EndReason.JOB_ENDED, big_status()))
    assert len(frame) - 4 <= MIN_FRAME_SIZE
    [end] = client.receive_data(frame)
    assert isinstance(end, m.EndOfStream) and end.reason is m.EndReason.JOB_ENDED
    assert end.status.abridged and end.status.exit_code == 3 and end.status.state is m.JobState.EXITED
    assert end.status.argv == tuple(item[:256] for item in big_status().argv[: m.ABRIDGED_ARGV_ITEMS])
    assert len(end.status.workdir.encode()) == m.ABRIDGED_TEXT_BYTES
    assert 7 not in server.open_streams and 7 not in client.open_streams


def test_a_status_that_fits_is_never_abridged() -> None:
    server, client = open_pair()
    request(server, client, m.StatusRequest(1, JOB))
    [response] = client.receive_data(server.send(m.StatusResponse(1, big_status())))
    assert response.status == big_status() and not response.status.abridged


def test_abridging_never_splits_a_character() -> None:
    text = "é" * 200  # 400 bytes
    cut = m.abridge(m.JobStatus(JOB, text, (text,), m.JobState.RUNNING)).owner
    assert cut == "é" * 128 and len(cut.encode()) == 256


@given(st.lists(st.text(max_size=3000), max_size=40), st.text(max_size=20_000))
@SETTINGS
def test_any_abridged_status_fits_the_smallest_frame(argv: list[str], text: str) -> None:
    status_ = m.JobStatus(JOB, text, tuple(argv), m.JobState.FAILED, error=text, workdir=text, user=text, stopped_by=text)
    try:
        encode_message(m.StatusResponse(1, status_))
    except ValueError:
        return  # a text longer than the wire allows: not a status a server has
    abridged = m.abridge(status_)
    assert len(encode_message(m.EndOfStream(1, m.EndReason.JOB_ENDED, abridged))) - 4 <= MIN_FRAME_SIZE


# -- going away and closing ------------------------------------------------------


def test_goaway_received_closes() -> None:
    server, client = open_pair()
    assert client.receive_data(encode_message(m.GoAway(105, "idle"))) == [m.GoAway(105, "idle")]
    assert client.is_closed
    assert client.receive_data(encode_message(m.OkResponse(1))) == []
    with pytest.raises(ValueError):
        client.send(m.ListRequest(1))


def test_goaway_instead_of_server_hello() -> None:
    client = Connection(Role.CLIENT)
    goaway = m.GoAway(ErrorCode.UNSUPPORTED_VERSION, "no")
    assert client.receive_data(encode_message(goaway)) == [goaway]
    assert client.is_closed


def test_goaway_sent_closes() -> None:
    server, client = open_pair()
    request(server, client, m.ListRequest(1))
    respond(server, client, m.GoAway(ErrorCode.SHUTTING_DOWN, "bye"))
    assert server.is_closed and client.is_closed
    with pytest.raises(ValueError):
        server.send(m.ListResponse(1, ()))


def test_goaway_reports_a_protocol_error() -> None:
    server, client = open_pair()
    with pytest.raises(ProtocolError) as caught:
        server.receive_data(b"\x00\x00\x00\x01\x99")
    frame = server.goaway(caught.value)
    assert server.is_closed
    [message] = client.receive_data(frame)
    assert message == m.GoAway(ErrorCode.UNKNOWN_MESSAGE, caught.value.message)
    assert client.is_closed


def test_goaway_message_is_bounded() -> None:
    server, client = open_pair()
    [message] = client.receive_data(server.goaway(ProtocolError("é" * 100_000)))
    assert message.code == ErrorCode.PROTOCOL_ERROR
    assert 0 < len(message.message) <= 1000


def test_protocol_error_closes_and_later_data_is_ignored() -> None:
    server, client = open_pair()
    request(server, client, m.ListRequest(1))
    raises_protocol_error(server, b"\x00\x00\x00\x00")
    with pytest.raises(ValueError):
        server.send(m.ListResponse(1, ()))


def test_frame_too_large_for_the_connection() -> None:
    server, _ = open_pair(server_max=MIN_FRAME_SIZE)
    raises_protocol_error(server, (MIN_FRAME_SIZE + 1).to_bytes(4, "big"), ErrorCode.FRAME_TOO_LARGE)


# -- whole conversations ----------------------------------------------------------


class Conversation:
    """
    A server and a client whose bytes travel through two queues, delivered
    in pieces cut at arbitrary points, so frames arrive split and merged.
    """

    def __init__(self, data: st.DataObject, server_max: int, client_max: int) -> None:
        self.data = data
        self.server, self.client = open_pair(server_max, client_max)
        self.to_server = b""
        self.to_client = b""
        self.sent_by_client: list[m.Message] = []
        self.sent_by_server: list[m.Message] = []
        self.got_by_server: list[m.Message] = []
        self.got_by_client: list[m.Message] = []
        self.unanswered: list[m.Message] = []  # requests the server has read
        self.streams: dict[int, int] = {}  # server: open stream -> next offset
        # Stream requested (open or not yet) -> its credit once every byte
        # in flight is delivered.
        self.windows: dict[int, int] = {}
        self.unprocessed: dict[int, int] = {}  # client: bytes received, not consumed

    def client_sends(self, message: m.Message) -> None:
        self.to_server += self.client.send(message)
        self.sent_by_client.append(message)

    def server_sends(self, message: m.Message) -> None:
        if isinstance(message, m.Output):
            frame = self.server.send_output(message.stream_id, message.fd, message.offset, message.data)
        else:
            frame = self.server.send(message)
        self.to_client += frame
        self.sent_by_server.append(message)

    def deliver_to_server(self, everything: bool = False) -> None:
        cut = len(self.to_server) if everything else self.data.draw(st.integers(0, len(self.to_server)))
        piece, self.to_server = self.to_server[:cut], self.to_server[cut:]
        for message in self.server.receive_data(piece):
            self.got_by_server.append(message)
            if isinstance(message, m.REQUEST_TYPES):
                self.unanswered.append(message)

    def deliver_to_client(self, everything: bool = False) -> None:
        cut = len(self.to_client) if everything else self.data.draw(st.integers(0, len(self.to_client)))
        piece, self.to_client = self.to_client[:cut], self.to_client[cut:]
        for message in self.client.receive_data(piece):
            self.got_by_client.append(message)
            if isinstance(message, m.Output):
                self.unprocessed[message.stream_id] = self.unprocessed.get(message.stream_id, 0) + len(message.data)
            elif isinstance(message, m.EndOfStream):
                self.unprocessed.pop(message.stream_id, None)

    def client_view(self, stream_id: int) -> int:
        """
        The window as the client sees it.  It cannot see bytes in flight, so
        its view is at least the server's; it refuses updates that would take
        its own view past the maximum, and the model grants within that.
        """
        window = self.client._receive_windows.get(stream_id)
        views = [self.windows[stream_id]]
        if window is not None:
            views.append(window.outstanding)
        views += [credit for stream, credit in self.client._pending_follows.values() if stream == stream_id]
        return max(views)

    def step(self) -> None:
        draw = self.data.draw
        # Only actions possible now, weighted towards the stream traffic
        # that needs the other end's state to line up.
        actions = ["request", "follow", "deliver", "deliver"]
        if self.unanswered:
            actions += ["answer"] * 3
        if self.streams:
            actions += ["output"] * 4 + ["gap", "end"]
        if any(self.unprocessed.values()):
            actions += ["consume"] * 6
        if any(self.client_view(stream_id) < MAX_WINDOW for stream_id in self.windows):
            actions.append("grant")
        action = draw(st.sampled_from(actions))
        if action == "request":
            request_id = self.client.next_request_id()
            self.client_sends(
                draw(
                    st.sampled_from(
                        [
                            m.StartRequest(request_id, ("echo", "ü\x00"), env=(("K", "v"),)),
                            m.StopRequest(request_id, JOB, force=True),
                            m.StatusRequest(request_id, JOB),
                            m.ListRequest(request_id),
                            m.WaitRequest(request_id, JOB),
                            m.RemoveRequest(request_id, JOB),
                        ]
                    )
                )
            )
        elif action == "follow":
            window = draw(st.sampled_from([100, 0, 1, 3000, 1 << 20, MAX_WINDOW]))
            stream_id = self.client.next_stream_id()
            self.client_sends(m.FollowRequest(self.client.next_request_id(), JOB, stream_id, window=window))
            self.windows[stream_id] = window
        elif action == "answer":
            asked = self.unanswered.pop(draw(st.integers(0, len(self.unanswered) - 1)))
            rid = asked.request_id
            if isinstance(asked, m.FollowRequest):
                if draw(st.booleans()):
                    self.server_sends(m.OkResponse(rid))  # the stream opens
                    self.streams[asked.stream_id] = 0
                else:
                    self.server_sends(m.ErrorResponse(rid, ErrorCode.NOT_FOUND, "no such job"))
                    del self.windows[asked.stream_id]
            else:
                self.server_sends(
                    draw(
                        st.sampled_from(
                            [
                                m.OkResponse(rid),
                                m.ErrorResponse(rid, ErrorCode.NOT_FOUND, "no such job"),
                                m.StartResponse(rid, JOB),
                                m.StatusResponse(rid, status()),
                                m.ListResponse(rid, (status(), status(m.JobState.RUNNING))),
                            ]
                        )
                    )
                )
        elif action in ("output", "gap", "end"):
            stream_id = draw(st.sampled_from(sorted(self.streams)))
            offset = self.streams[stream_id]
            if action == "output":
                room = min(self.server.send_window(stream_id), self.server.max_output_chunk())
                size = draw(st.integers(0, min(room, 3000)))
                data = bytes((offset + i) % 251 for i in range(size))  # NULs, invalid UTF-8
                self.server_sends(m.Output(stream_id, draw(st.sampled_from([1, 2])), offset, data))
                self.streams[stream_id] += len(data)
                self.windows[stream_id] -= len(data)
            elif action == "gap":
                length = draw(st.integers(1, 10**6))
                self.server_sends(m.Gap(stream_id, offset, length))
                self.streams[stream_id] += length
            else:
                self.server_sends(m.EndOfStream(stream_id, m.EndReason.JOB_ENDED, status()))
                del self.streams[stream_id]
                del self.windows[stream_id]
        elif action == "consume":
            stream_id = draw(st.sampled_from(sorted(s for s, n in self.unprocessed.items() if n)))
            size = draw(st.one_of(st.just(self.unprocessed[stream_id]), st.integers(1, self.unprocessed[stream_id])))
            self.unprocessed[stream_id] -= size
            update = self.client.consumed(stream_id, size)
            if update:
                grant = decode_body(update[4], update[5:])
                assert isinstance(grant, m.WindowUpdate) and grant.stream_id == stream_id
                self.to_server += update
                self.sent_by_client.append(grant)
                if stream_id in self.windows:
                    self.windows[stream_id] += grant.increment
        elif action == "grant":
            # An explicit update, possibly before the stream has opened.
            stream_id = draw(st.sampled_from(sorted(s for s in self.windows if self.client_view(s) < MAX_WINDOW)))
            increment = draw(st.integers(1, min(5000, MAX_WINDOW - self.client_view(stream_id))))
            self.client_sends(m.WindowUpdate(stream_id, increment))
            self.windows[stream_id] += increment
        else:
            self.deliver_to_server()
            self.deliver_to_client()


@settings(SETTINGS, max_examples=100)
@given(
    data=st.data(),
    server_max=st.sampled_from([MIN_FRAME_SIZE, DEFAULT_MAX_FRAME_SIZE]),
    client_max=st.sampled_from([MIN_FRAME_SIZE, DEFAULT_MAX_FRAME_SIZE]),
    steps=st.integers(1, 80),
)
def test_conversations_arrive_whole_and_in_order(
    data: st.DataObject, server_max: int, client_max: int, steps: int
) -> None:
    """
    Any conversation of legal calls on both ends, its bytes delivered in
    arbitrary pieces, reaches each end as exactly the messages the other
    sent, in order, with no error; and the two ends agree on the streams
    open and the requests pending at the end.
    """
    talk = Conversation(data, server_max, client_max)
    for _ in range(steps):
        talk.step()
    talk.deliver_to_server(everything=True)
    talk.deliver_to_client(everything=True)
    assert talk.got_by_server == talk.sent_by_client
    assert talk.got_by_client == talk.sent_by_server
    assert talk.server.is_open and talk.client.is_open
    assert talk.server.open_streams == talk.client.open_streams == frozenset(talk.streams)
    assert talk.server.pending_requests == talk.client.pending_requests == len(talk.unanswered)
    for stream_id in talk.streams:
        assert talk.server.send_window(stream_id) == talk.windows[stream_id]


# -- hostile bytes ----------------------------------------------------------------

KNOWN_TYPES = [
    cls.TYPE
    for cls in (*m.REQUEST_TYPES, m.ClientHello, m.GoAway, m.WindowUpdate, m.CancelStream, m.Output)
]

frame_pieces = st.one_of(
    st.binary(max_size=30),
    any_message.map(encode_message),
    st.builds(
        lambda kind, body: frame_header(len(body) + 1, kind) + body,
        st.one_of(st.sampled_from(KNOWN_TYPES), st.integers(0, 255)),
        st.binary(max_size=80),
    ),
    # A valid frame with one byte of its body overwritten.
    st.builds(
        lambda frame, at, value: frame[: 5 + at % max(1, len(frame) - 5)]
        + bytes((value,))
        + frame[5 + at % max(1, len(frame) - 5) + 1 :],
        any_message.map(encode_message),
        st.integers(0, 10**6),
        st.integers(0, 255),
    ),
)
hostile_streams = st.tuples(
    st.lists(frame_pieces, max_size=8).map(b"".join),
    st.lists(st.integers(0, 10**6), max_size=8),
)


def _feed_hostile(connection: Connection, stream: bytes, cuts: list[int]) -> None:
    for piece in split_at(stream, cuts):
        try:
            connection.receive_data(piece)
        except ProtocolError:
            assert connection.is_closed
            assert connection.receive_data(piece) == []
            return


@SETTINGS
@given(hostile=hostile_streams, stage=st.sampled_from(["fresh", "hello sent", "open", "open with stream"]))
def test_server_survives_hostile_bytes(hostile: tuple[bytes, list[int]], stage: str) -> None:
    """
    Whatever a client sends, at any stage, the server raises nothing but
    ProtocolError, after which it is closed.
    """
    if stage == "fresh":
        server = Connection(Role.SERVER)
    elif stage == "hello sent":
        server = Connection(Role.SERVER)
        server.send(server_hello())
    else:
        server, client = open_pair()
        if stage == "open with stream":
            open_stream(server, client, stream_id=1)
    _feed_hostile(server, *hostile)


@SETTINGS
@given(hostile=hostile_streams, stage=st.sampled_from(["fresh", "open", "open with stream"]))
def test_client_survives_hostile_bytes(hostile: tuple[bytes, list[int]], stage: str) -> None:
    if stage == "fresh":
        client = Connection(Role.CLIENT)
    else:
        server, client = open_pair()
        request(server, client, m.ListRequest(100))
        if stage == "open with stream":
            open_stream(server, client, stream_id=1)
    _feed_hostile(client, *hostile)


@SETTINGS
@given(noise=st.binary(min_size=1, max_size=200))
def test_server_survives_pure_noise(noise: bytes) -> None:
    server, _ = open_pair()
    try:
        server.receive_data(noise)
    except ProtocolError:
        assert server.is_closed
