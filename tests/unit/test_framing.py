"""
Tests for the wire format (L{jobworker.protocol.wire}) and the frame
splitter (L{jobworker.protocol.framing}).

The strategies at the top build every message type with values from the
whole range of their wire fields; the other protocol test modules import
them.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
from dataclasses import fields, replace

import construct
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jobworker.errors import ErrorCode, ProtocolError
from jobworker.limits import MAX_BYTES, MAX_CPU_MILLICORES, MAX_DURATION_MS, MAX_PIDS, Limits
from jobworker.protocol import messages as m
from jobworker.protocol.framing import FrameBuffer
from jobworker.protocol.statuses import decode_status, encode_status
from jobworker.protocol.wire import (
    HEADER_SIZE,
    SCHEMAS,
    StatusSchema,
    decode_body,
    encode_message,
    encode_output,
    frame_header,
    status_size,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ------------------------------------------------------------------

u8 = st.integers(0, 2**8 - 1)
u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)

# Any text, NULs and astral characters included; short enough that its UTF-8
# always fits the u16 byte count of a wire string.
text = st.text(max_size=40)
blobs = st.binary(max_size=300)

limits = st.builds(
    Limits,
    cpu_millicores=st.integers(0, MAX_CPU_MILLICORES),
    memory_bytes=st.integers(0, MAX_BYTES),
    io_read_bps=st.integers(0, MAX_BYTES),
    io_write_bps=st.integers(0, MAX_BYTES),
    pids=st.integers(0, MAX_PIDS),
    timeout_ms=st.integers(0, MAX_DURATION_MS),
)

usages = st.builds(
    m.JobUsage,
    cpu_usec=u64,
    memory_peak_bytes=u64,
    io_read_bytes=u64,
    io_write_bytes=u64,
    pids_peak=u32,
)

argvs = st.lists(text, min_size=0, max_size=5).map(tuple)
pairs = st.lists(st.tuples(text, text), max_size=4).map(tuple)

statuses = st.builds(
    m.JobStatus,
    job_id=st.uuids(),
    owner=text,
    argv=argvs,
    state=st.sampled_from(m.JobState),
    exit_code=i32,
    signal=u8,
    created_at=u64,
    started_at=u64,
    ended_at=u64,
    error=text,
    stopped_by=text,
    limits=limits,
    usage=usages,
    output_bytes=u64,
    workdir=text,
    user=text,
    network=st.sampled_from(m.Network),
    abridged=st.booleans(),
    name=text,
    labels=pairs,
)

MESSAGE_STRATEGIES: dict[type[m.Message], st.SearchStrategy[m.Message]] = {
    m.ServerHello: st.builds(
        m.ServerHello, version=u16, max_frame_size=u32, server_name=text, identity=text, role=text, server_version=text
    ),
    m.ClientHello: st.builds(m.ClientHello, version=u16, max_frame_size=u32),
    m.GoAway: st.builds(m.GoAway, code=u16, message=text),
    m.Ping: st.builds(m.Ping, data=u64),
    m.Pong: st.builds(m.Pong, data=u64),
    m.StartRequest: st.builds(
        m.StartRequest,
        request_id=u32,
        argv=argvs,
        env=st.lists(st.tuples(text, text), max_size=4).map(tuple),
        workdir=text,
        user=text,
        network=st.sampled_from(m.Network),
        limits=limits,
        name=text,
        labels=pairs,
    ),
    m.StopRequest: st.builds(
        m.StopRequest, request_id=u32, job_id=st.uuids(), grace_ms=u32, force=st.booleans()
    ),
    m.StatusRequest: st.builds(m.StatusRequest, request_id=u32, job_id=st.uuids()),
    m.SignalRequest: st.builds(m.SignalRequest, request_id=u32, job_id=st.uuids(), signal=st.integers(0, 255)),
    m.ListRequest: st.builds(
        m.ListRequest,
        request_id=u32,
        after_created_at=u64,
        after_job_id=st.uuids(),
        max_jobs=u32,
        states=u16,
        owner=text,
        name=text,
        labels=st.lists(text, max_size=4).map(tuple),
        newest_first=st.booleans(),
    ),
    m.WaitRequest: st.builds(m.WaitRequest, request_id=u32, job_id=st.uuids()),
    m.FollowRequest: st.builds(
        m.FollowRequest,
        request_id=u32,
        job_id=st.uuids(),
        stream_id=u32,
        offset=u64,
        window=u32,
        follow=st.booleans(),
        timestamps=st.booleans(),
        since=u64,
    ),
    m.RemoveRequest: st.builds(m.RemoveRequest, request_id=u32, job_id=st.uuids()),
    m.WindowUpdate: st.builds(m.WindowUpdate, stream_id=u32, increment=u32),
    m.CancelStream: st.builds(m.CancelStream, stream_id=u32),
    m.StartResponse: st.builds(m.StartResponse, request_id=u32, job_id=st.uuids()),
    m.StatusResponse: st.builds(m.StatusResponse, request_id=u32, status=statuses),
    m.ListResponse: st.builds(
        m.ListResponse, request_id=u32, jobs=st.lists(statuses, max_size=3).map(tuple), more=st.booleans()
    ),
    m.OkResponse: st.builds(m.OkResponse, request_id=u32),
    m.ErrorResponse: st.builds(m.ErrorResponse, request_id=u32, code=u16, message=text),
    m.Output: st.builds(m.Output, stream_id=u32, fd=st.sampled_from([1, 2]), offset=u64, data=blobs),
    m.Gap: st.builds(m.Gap, stream_id=u32, offset=u64, length=u64),
    m.EndOfStream: st.builds(
        m.EndOfStream, stream_id=u32, reason=st.sampled_from(m.EndReason), status=statuses
    ),
    m.TimeMark: st.builds(m.TimeMark, stream_id=u32, offset=u64, time=u64),
}

ALL_TYPES = sorted(MESSAGE_STRATEGIES, key=lambda cls: cls.TYPE)
any_message = st.one_of(*MESSAGE_STRATEGIES.values())


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """
    C{data} cut at the given positions (taken modulo its length, any order).
    """
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def split_frame(frame: bytes) -> tuple[int, bytes]:
    """
    The (type, body) of one complete encoded frame, checking its length.
    """
    (length,) = struct.unpack(">I", frame[:HEADER_SIZE])
    assert length == len(frame) - HEADER_SIZE
    return frame[HEADER_SIZE], frame[HEADER_SIZE + 1 :]


def test_every_message_type_has_a_strategy() -> None:
    """
    A message type added later without a strategy here would go untested.
    """
    assert set(MESSAGE_STRATEGIES) == set(SCHEMAS)
    assert len({cls.TYPE for cls in ALL_TYPES}) == len(ALL_TYPES)


# -- encode / decode -------------------------------------------------------------


# pytest-twisted cannot run a test that is both parametrized and @given (it
# wraps the shared Hypothesis inner test once per parameter), so the message
# type is drawn instead; enough examples reach every type many times over.
WIDE = settings(SETTINGS, max_examples=600)
non_output_message = st.one_of(
    *(strategy for cls, strategy in MESSAGE_STRATEGIES.items() if cls is not m.Output)
)


@WIDE
@given(message=any_message)
def test_round_trip(message: m.Message) -> None:
    """
    Every message decodes from its own encoding to an equal message, and its
    frame header counts exactly the type byte and the body.
    """
    kind, body = split_frame(encode_message(message))
    assert kind == type(message).TYPE
    decoded = decode_body(kind, body)
    assert type(decoded) is type(message)
    assert decoded == message


@WIDE
@given(message=any_message)
def test_round_trip_in_version_3(message: m.Message) -> None:
    """
    Version 3 has the layouts of the current version but the ListRequest's,
    which ends before the newest_first flag: a message a version 3 peer
    can send round-trips in version 3, in the same bytes but for that one.
    """
    if isinstance(message, m.ListRequest):
        message = replace(message, newest_first=False)
    frame = encode_message(message, 3)
    kind, body = split_frame(frame)
    assert decode_body(kind, body, 3) == message
    current = encode_message(message)
    if isinstance(message, m.ListRequest):
        assert split_frame(current)[1] == body + b"\x00"
    else:
        assert current == frame


@SETTINGS
@given(stream_id=u32, fd=u8, offset=u64, data=blobs)
def test_output_fast_path_matches_schema(stream_id: int, fd: int, offset: int, data: bytes) -> None:
    """
    The hand-written Output encoder yields exactly the bytes of the general
    schema, so the two can never drift apart.
    """
    body = SCHEMAS[m.Output].build(
        {"stream_id": stream_id, "fd": fd, "offset": offset, "data": data}
    )
    expected = frame_header(len(body) + 1, m.Output.TYPE) + body
    assert encode_output(stream_id, fd, offset, data) == expected
    assert encode_message(m.Output(stream_id, fd, offset, data)) == expected


def schema_decode(cls: type[m.Message], body: bytes) -> m.Message:
    """
    A status frame's body parsed by its construct schema alone.
    """
    parsed = construct.Struct("value" / SCHEMAS[cls], construct.Terminated).parse(body).value
    if cls is m.ListResponse:
        return m.ListResponse(parsed.request_id, tuple(parsed.jobs), parsed.more)
    if cls is m.StatusResponse:
        return m.StatusResponse(parsed.request_id, parsed.status)
    return m.EndOfStream(parsed.stream_id, m.EndReason(parsed.reason), parsed.status)


STATUS_FRAMES = st.one_of(*(MESSAGE_STRATEGIES[cls] for cls in (m.StatusResponse, m.ListResponse, m.EndOfStream)))


@WIDE
@given(message=STATUS_FRAMES)
def test_status_fast_path_matches_schema(message: m.Message) -> None:
    """
    The struct-packed statuses (jobworker.protocol.statuses) give exactly
    the bytes of the construct schema, and parse them back to what the
    schema parses: the two can never drift apart.
    """
    body = SCHEMAS[type(message)].build({f.name: getattr(message, f.name) for f in fields(message)})  # type: ignore[arg-type]  # every message is a dataclass
    assert encode_message(message) == frame_header(len(body) + 1, type(message).TYPE) + body
    status = message.jobs[0] if isinstance(message, m.ListResponse) and message.jobs else getattr(message, "status", None)
    if status is not None:
        assert encode_status(status) == StatusSchema.build(status)
        assert status_size(status) == len(StatusSchema.build(status))
        decoded, end = decode_status(b"xy" + StatusSchema.build(status), 2)
        assert (decoded, end) == (status, 2 + len(StatusSchema.build(status)))
        # Built without the dataclasses' __init__ (see statuses.py): the
        # same in every way a caller can see.
        assert repr(decoded) == repr(status) and hash(decoded) == hash(status)
        assert decoded.job_id.is_safe == status.job_id.is_safe and str(decoded.job_id) == str(status.job_id)
        assert dataclasses.asdict(decoded) == dataclasses.asdict(status)
        assert dataclasses.replace(decoded, name="x") == dataclasses.replace(status, name="x")
    assert decode_body(type(message).TYPE, body) == schema_decode(type(message), body)


@WIDE
@given(message=STATUS_FRAMES, data=st.data())
def test_status_fast_path_refuses_what_the_schema_refuses(message: m.Message, data: st.DataObject) -> None:
    """
    A status frame with one byte changed, cut short, or with a byte more:
    the fast path decodes it exactly when the schema does, to the same
    message, and refuses it with a ProtocolError when the schema fails.
    """
    body = bytearray(encode_message(message)[5:])
    how = data.draw(st.sampled_from(["change", "cut", "extend"]))
    if how == "change" and body:
        at = data.draw(st.integers(0, len(body) - 1))
        body[at] = data.draw(st.integers(0, 255))
    elif how == "cut":
        del body[data.draw(st.integers(0, len(body))):]
    else:
        body += b"\x00"
    try:
        expected: object = schema_decode(type(message), bytes(body))
    except Exception:
        expected = ProtocolError
    try:
        got: object = decode_body(type(message).TYPE, bytes(body))
    except ProtocolError:
        got = ProtocolError
    assert got == expected


def test_status_fast_path_refuses_what_cannot_be_encoded() -> None:
    status = m.JobStatus(job_id=uuid.UUID(int=1), owner="x" * 70_000, argv=(), state=m.JobState.RUNNING)
    with pytest.raises(ValueError):
        encode_message(m.StatusResponse(1, status))
    with pytest.raises(ValueError):
        encode_message(m.ListResponse(1, (replace(status, owner="a", exit_code=1 << 40),)))
    with pytest.raises(ValueError):
        encode_status(replace(status, owner="\udc80"))


def test_output_data_with_nuls_and_invalid_utf8_is_kept_verbatim() -> None:
    data = b"\x00\xff\xfe\x80abc\x00"
    kind, body = split_frame(encode_output(3, 2, 10, data))
    assert decode_body(kind, body) == m.Output(3, 2, 10, data)


def test_known_encoding_of_a_window_update() -> None:
    """
    One frame spelled out byte by byte: big-endian u32 length counting the
    type byte, the type, then the fields in order.
    """
    assert encode_message(m.WindowUpdate(stream_id=0x01020304, increment=0x0A0B0C0D)) == (
        b"\x00\x00\x00\x09" + b"\x16" + b"\x01\x02\x03\x04" + b"\x0a\x0b\x0c\x0d"
    )


@WIDE
@given(message=non_output_message, data=st.data())
def test_truncated_body_is_a_protocol_error(message: m.Message, data: st.DataObject) -> None:
    kind, body = split_frame(encode_message(message))
    cut = data.draw(st.integers(0, len(body) - 1), label="cut")
    with pytest.raises(ProtocolError) as caught:
        decode_body(kind, body[:cut])
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR


@WIDE
@given(message=non_output_message, extra=st.binary(min_size=1, max_size=20))
def test_trailing_bytes_are_a_protocol_error(message: m.Message, extra: bytes) -> None:
    kind, body = split_frame(encode_message(message))
    with pytest.raises(ProtocolError):
        decode_body(kind, body + extra)


@pytest.mark.parametrize("size", range(13))
def test_output_shorter_than_its_head_is_a_protocol_error(size: int) -> None:
    with pytest.raises(ProtocolError):
        decode_body(m.Output.TYPE, bytes(size))


def test_output_with_head_only_is_empty_data() -> None:
    head = bytes(4) + b"\x02" + bytes(8)
    assert decode_body(m.Output.TYPE, head) == m.Output(0, 2, 0, b"")


@pytest.mark.parametrize("fd", [0, 3, 255])
def test_output_from_another_fd_is_a_protocol_error(fd: int) -> None:
    """
    Output is stdout (1) or stderr (2); anything else is a broken peer.
    """
    kind, body = split_frame(encode_output(1, fd, 0, b"data"))
    with pytest.raises(ProtocolError):
        decode_body(kind, body)


@pytest.mark.parametrize(
    "kind", sorted(set(range(256)) - {cls.TYPE for cls in ALL_TYPES})
)
def test_unknown_type_is_unknown_message(kind: int) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_body(kind, b"")
    assert caught.value.code is ErrorCode.UNKNOWN_MESSAGE


def _with_byte(body: bytes, position: int, value: int) -> bytes:
    return body[:position] + bytes((value,)) + body[position + 1 :]


def test_unknown_enum_codes_are_protocol_errors() -> None:
    status = m.JobStatus(job_id=uuid.UUID(int=7), owner="a", argv=(), state=m.JobState.RUNNING)
    kind, body = split_frame(encode_message(m.EndOfStream(1, m.EndReason.JOB_ENDED, status)))
    # stream id (4), then the reason byte
    with pytest.raises(ProtocolError):
        decode_body(kind, _with_byte(body, 4, 99))
    # stream id, reason, job id (16), owner "a" (2 + 1), argv count (2): state
    with pytest.raises(ProtocolError):
        decode_body(kind, _with_byte(body, 4 + 1 + 16 + 3 + 2, 0))


def test_limit_out_of_range_is_the_requests_error() -> None:
    """
    A limit out of range in a well-formed start request is that request's
    error: it decodes to InvalidLimits with the reason (answered
    INVALID_LIMITS), never a LimitError escaping the decoder, and the
    connection goes on.
    """
    kind, body = split_frame(encode_message(m.StartRequest(1, ("true",))))
    # request id (4), argv [u16 count, "true"] (2 + 2 + 4), env count (2),
    # workdir (2), user (2), network (1): then cpu_millicores, a u32.
    at = 4 + 8 + 2 + 2 + 2 + 1
    assert body[at : at + 4] == b"\x00\x00\x00\x00"
    decoded = decode_body(kind, body[:at] + b"\xff\xff\xff\xff" + body[at + 4 :])
    assert isinstance(decoded, m.StartRequest)
    assert isinstance(decoded.limits, m.InvalidLimits)
    assert "cpu_millicores" in decoded.limits.reason
    # Limits in a status the server sends stay strict: no correct server
    # produces them, so they are the peer's fault.
    # Non-zero times and texts, so the first run of 40 zero bytes is the limits.
    status = m.JobStatus(
        uuid.UUID(int=1), "a", ("x",), m.JobState.RUNNING,
        created_at=1, started_at=1, ended_at=1, error="e", stopped_by="s",
    )
    kind, body = split_frame(encode_message(m.StatusResponse(1, status)))
    limits_at = body.index(b"\x00" * 40)
    with pytest.raises(ProtocolError):
        decode_body(kind, body[:limits_at] + b"\xff\xff\xff\xff" + body[limits_at + 4 :])


def test_invalid_utf8_in_a_string_is_a_protocol_error() -> None:
    kind, body = split_frame(encode_message(m.GoAway(1, "ab")))
    with pytest.raises(ProtocolError):
        decode_body(kind, body[:-2] + b"\xff\xfe")


def test_unencodable_message_is_a_value_error() -> None:
    """
    Our own caller's mistake is not the peer's: ValueError, not ProtocolError.
    """
    with pytest.raises(ValueError) as caught:
        encode_message(m.GoAway(1, "x" * 70_000))  # longer than a u16 byte count
    assert not isinstance(caught.value, ProtocolError)
    with pytest.raises(ValueError):
        encode_message(m.OkResponse(2**32))


@SETTINGS
@given(kind=u8, body=st.binary(max_size=200))
def test_arbitrary_bodies_raise_only_protocol_errors(kind: int, body: bytes) -> None:
    try:
        message = decode_body(kind, body)
    except ProtocolError:
        return
    assert message.TYPE == kind


@SETTINGS
@given(data=st.data())
def test_mutated_bodies_raise_only_protocol_errors(data: st.DataObject) -> None:
    """
    A valid body with a few bytes overwritten either decodes or is a
    ProtocolError: nothing else escapes for the connection to trip on.
    """
    message = data.draw(any_message)
    kind, body = split_frame(encode_message(message))
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        if mutated:
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(u8)
    try:
        decode_body(kind, bytes(mutated))
    except ProtocolError:
        pass


# -- FrameBuffer -----------------------------------------------------------------


def test_frame_of_exactly_the_maximum_is_accepted() -> None:
    buffer = FrameBuffer(100)
    frame = (100).to_bytes(4, "big") + b"\x30" + bytes(range(99))
    assert buffer.receive(frame) == [(0x30, bytes(range(99)))]
    assert len(buffer) == 0


def test_oversized_frame_refused_on_its_header_alone() -> None:
    """
    The length is checked as soon as its four bytes are here: no body byte
    is needed, and nothing is kept growing while a peer streams one.
    """
    buffer = FrameBuffer(100)
    header = (101).to_bytes(4, "big")
    assert buffer.receive(header[:3]) == []
    with pytest.raises(ProtocolError) as caught:
        buffer.receive(header[3:])
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE
    assert len(buffer) <= HEADER_SIZE


def test_oversized_frame_after_a_good_one_refused_on_its_header() -> None:
    buffer = FrameBuffer(100)
    good = (2).to_bytes(4, "big") + b"\x23\x00"
    assert buffer.receive(good + (2**32 - 1).to_bytes(4, "big")[:2]) == [(0x23, b"\x00")]
    with pytest.raises(ProtocolError) as caught:
        buffer.receive(b"\xff\xff")
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE
    assert len(buffer) <= HEADER_SIZE


@SETTINGS
@given(maximum=st.integers(1, 1 << 20), excess=st.integers(1, 2**32 - 1))
def test_any_announced_length_above_maximum_is_refused(maximum: int, excess: int) -> None:
    length = min(maximum + excess, 2**32 - 1)
    buffer = FrameBuffer(maximum)
    with pytest.raises(ProtocolError) as caught:
        buffer.receive(length.to_bytes(4, "big") + b"\x30")
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE
    assert len(buffer) <= HEADER_SIZE + 1


def test_zero_length_frame_is_a_protocol_error() -> None:
    buffer = FrameBuffer(100)
    with pytest.raises(ProtocolError) as caught:
        buffer.receive(b"\x00\x00\x00\x00")
    assert caught.value.code is ErrorCode.PROTOCOL_ERROR


def test_incomplete_frame_is_kept_until_complete() -> None:
    buffer = FrameBuffer(100)
    frame = (5).to_bytes(4, "big") + b"\x31abcd"
    for byte in frame[:-1]:
        assert buffer.receive(bytes((byte,))) == []
    assert len(buffer) == len(frame) - 1
    assert buffer.receive(frame[-1:]) == [(0x31, b"abcd")]
    assert len(buffer) == 0


@SETTINGS
@given(messages=st.lists(any_message, min_size=1, max_size=8), cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_messages_survive_arbitrary_chunking(messages: list[m.Message], cuts: list[int]) -> None:
    """
    However the byte stream is cut into reads, the frames come out whole and
    in order, and decode to the messages sent.
    """
    stream = b"".join(encode_message(message) for message in messages)
    buffer = FrameBuffer(1 << 20)
    received = []
    for piece in split_at(stream, cuts):
        received.extend(buffer.receive(piece))
    assert [decode_body(kind, body) for kind, body in received] == messages
    assert len(buffer) == 0


# -- FrameBuffer: frames handed out as views of a reused receive buffer ----------


def _receive_through_one_buffer(pieces: list[bytes], maximum: int = 1 << 20) -> tuple[list[m.Message], FrameBuffer]:
    """
    Feed C{pieces} the way a client reading with C{recv_into} does: each one
    lands in the same bytearray, which is first scribbled over with junk,
    and C{FrameBuffer} sees a view of just the bytes read.  Every frame is
    decoded before the next piece overwrites the buffer.
    """
    frames = FrameBuffer(maximum)
    buffer = bytearray(max((len(piece) for piece in pieces), default=0))
    decoded: list[m.Message] = []
    for piece in pieces:
        buffer[:] = b"\xee" * len(buffer)
        buffer[: len(piece)] = piece
        decoded.extend(
            decode_body(kind, body) for kind, body in frames.receive(memoryview(buffer)[: len(piece)])
        )
    return decoded, frames


@SETTINGS
@given(
    messages=st.lists(any_message, min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 10**6), max_size=30),
)
def test_messages_survive_a_reused_receive_buffer(messages: list[m.Message], cuts: list[int]) -> None:
    """
    Frames handed out as views of the caller's buffer, and the incomplete
    tail kept from it, stay right when the caller reuses that buffer for its
    next read.  Catches a tail kept as a view of the caller's bytes instead
    of copied (it changes under us on the next read), a tail dropped, or a
    body view taken from the wrong place.
    """
    stream = b"".join(encode_message(message) for message in messages)
    decoded, frames = _receive_through_one_buffer(split_at(stream, cuts))
    assert decoded == messages
    assert len(frames) == 0


@SETTINGS
@given(
    messages=st.lists(any_message, min_size=2, max_size=6),
    data=st.data(),
)
def test_reused_buffer_with_every_frame_split_near_its_header(messages: list[m.Message], data: st.DataObject) -> None:
    """
    Every read ends a few bytes either side of a frame boundary, so reads
    alternate between the fast path (nothing pending: views of the caller's
    bytes, tail copied) and the slow path (a partial frame pending: append
    and copy), with the header itself cut at every position.
    """
    encoded = [encode_message(message) for message in messages]
    stream = b"".join(encoded)
    cuts = []
    boundary = 0
    for frame in encoded:
        boundary += len(frame)
        cuts.append(boundary + data.draw(st.integers(-HEADER_SIZE - 1, HEADER_SIZE + 1), label="shift"))
    decoded, frames = _receive_through_one_buffer(split_at(stream, [cut for cut in cuts if cut >= 0]))
    assert decoded == messages
    assert len(frames) == 0


def test_whole_frames_are_views_of_the_callers_bytes() -> None:
    """
    With nothing pending, a read holding whole frames is not copied at all:
    the bodies are views into the caller's buffer and nothing is kept.  A
    regression to copying every frame would double the bytes touched on the
    client's hot path.
    """
    first = encode_output(1, 1, 0, b"abc")
    second = encode_message(m.OkResponse(9))
    buffer = bytearray(first + second)
    frames = FrameBuffer(100)
    received = frames.receive(memoryview(buffer))
    assert [kind for kind, _ in received] == [m.Output.TYPE, m.OkResponse.TYPE]
    for _, body in received:
        assert isinstance(body, memoryview)
        assert body.obj is buffer
    assert [decode_body(kind, body) for kind, body in received] == [m.Output(1, 1, 0, b"abc"), m.OkResponse(9)]
    assert len(frames) == 0


def test_frames_completed_from_a_pending_tail_are_copies() -> None:
    """
    After a read that ends mid-frame, the tail is copied (the caller may
    overwrite its buffer at once), and the frames completed from it are
    copies of our own buffer, which must not change when later reads move
    that buffer on.
    """
    frame = encode_output(4, 2, 7, bytes(range(50)))
    after = encode_message(m.OkResponse(3))
    buffer = bytearray(frame + after[:6])
    frames = FrameBuffer(100)
    # One whole frame, then the start of the next: the tail is copied.
    (whole,) = frames.receive(memoryview(buffer)[: len(frame) + 2])
    assert decode_body(*whole) == m.Output(4, 2, 7, bytes(range(50)))
    assert len(frames) == 2
    buffer[:] = b"\xee" * len(buffer)
    buffer[:4] = after[2:6]
    assert frames.receive(memoryview(buffer)[:4]) == []
    buffer[:] = b"\xee" * len(buffer)
    buffer[: len(after) - 6] = after[6:]
    (completed,) = frames.receive(memoryview(buffer)[: len(after) - 6])
    kind, body = completed
    assert isinstance(body, bytes)
    # A later read that leaves a partial frame in our buffer again.
    assert frames.receive(frame[:10]) == []
    assert decode_body(kind, body) == m.OkResponse(3)
    assert len(frames) == 10


def test_oversized_frame_refused_on_its_header_in_the_fast_path() -> None:
    """
    With nothing pending, a read holding a good frame and then a header
    announcing more than the maximum is refused as soon as the header is
    read, with no body byte present, and nothing is kept.
    """
    good = encode_message(m.OkResponse(1))
    buffer = bytearray(good + (1 << 31).to_bytes(4, "big"))
    frames = FrameBuffer(100)
    with pytest.raises(ProtocolError) as caught:
        frames.receive(memoryview(buffer))
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE
    assert len(frames) == 0


@SETTINGS
@given(maximum=st.integers(1, 1 << 20), excess=st.integers(1, 2**32 - 1), lead=st.integers(0, 3))
def test_oversized_header_split_from_a_view_is_refused(maximum: int, excess: int, lead: int) -> None:
    """
    A header whose first bytes ended a read (copied out of the caller's
    buffer as the tail) and whose rest starts the next is still refused on
    the header alone, whatever the caller wrote over its buffer in between.
    """
    header = min(maximum + excess, 2**32 - 1).to_bytes(4, "big")
    buffer = bytearray(8)
    frames = FrameBuffer(maximum)
    buffer[:lead] = header[:lead]
    assert frames.receive(memoryview(buffer)[:lead]) == []
    buffer[:] = b"\xee" * len(buffer)
    buffer[: HEADER_SIZE - lead] = header[lead:]
    with pytest.raises(ProtocolError) as caught:
        frames.receive(memoryview(buffer)[: HEADER_SIZE - lead])
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE
    assert len(frames) <= HEADER_SIZE


# -- large frames (received into a map of their own) -------------------------------


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([10, (256 << 10) - 5, (256 << 10) + 1, 300_000, 1 << 20]), min_size=1, max_size=4),
    cuts=st.lists(st.integers(1, 1 << 20), max_size=12),
)
def test_large_frames_survive_arbitrary_chunking(sizes: list[int], cuts: list[int]) -> None:
    """
    Frames above LARGE_FRAME, alone or between small ones, arrive whole
    whatever the pieces; the buffer never holds more than what has arrived
    of the incomplete frame.
    """
    from jobworker.protocol.framing import LARGE_FRAME

    frames = [frame_header(size, 0x30) + bytes([index % 256]) * (size - 1) for index, size in enumerate(sizes)]
    stream = b"".join(frames)
    buffer = FrameBuffer(1 << 20)
    received: list[tuple[int, bytes]] = []
    position, since_boundary = 0, 0
    points = sorted({cut % len(stream) for cut in cuts} | {len(stream)})
    for point in points:
        chunk = stream[position:point]
        position = point
        got = buffer.receive(chunk)
        received.extend((kind, bytes(body)) for kind, body in got)
        since_boundary = 0 if not len(buffer) else since_boundary + len(chunk)
        assert len(buffer) <= max(since_boundary, len(chunk))
    assert len(buffer) == 0 and buffer._large is None
    assert [(kind, len(body) + 1) for kind, body in received] == [(0x30, size) for size in sizes]
    assert all(body == bytes([index % 256]) * (size - 1) for index, ((_, body), size) in enumerate(zip(received, sizes)))
    assert LARGE_FRAME < 300_000


def test_a_large_incomplete_frame_holds_only_what_has_arrived() -> None:
    """
    One byte short of a 1 MiB frame, the buffer counts what arrived; the
    map behind it is the announced size but only the arrived pages are
    touched, and it is unmapped when the frame completes.
    """
    buffer = FrameBuffer(1 << 20)
    frame = frame_header(1 << 20, 0x30) + b"\x01" * ((1 << 20) - 1)
    assert buffer.receive(frame[:1000]) == []
    assert len(buffer) == 1000 and buffer._large is not None
    assert buffer.receive(frame[1000:-1]) == []
    assert len(buffer) == len(frame) - 1
    large = buffer._large
    [(kind, body)] = buffer.receive(frame[-1:])
    assert kind == 0x30 and bytes(body) == frame[5:]
    assert large.closed and buffer._large is None and len(buffer) == 0


def test_decoding_leaves_no_copy_of_the_body_for_the_garbage_collector() -> None:
    """
    construct's parse context and its stream refer to each other; without
    care every decoded body leaves a copy of itself in a cycle until the
    garbage collector's next full pass (256 KiB per large start request).
    """
    import gc
    import tracemalloc

    frame = encode_message(m.StartRequest(1, tuple(["x" * 1000] * 200)))
    kind, body = frame[HEADER_SIZE], frame[HEADER_SIZE + 1 :]
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            message = decode_body(kind, body)
        del message
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        gc.enable()
    assert grown < 1 << 20, f"{grown} bytes left behind by 20 decodes of {len(body)} bytes"
