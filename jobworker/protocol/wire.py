"""
The byte layout of every message, as C{construct} definitions.

A frame on the wire is::

    +----------------+----------+---------------------------+
    | length: u32 BE | type: u8 | body: length - 1 bytes    |
    +----------------+----------+---------------------------+

C{length} counts the type byte and the body, so the smallest legal frame has
length 1.  Every integer is big-endian.  Strings are UTF-8 with a u16 byte
count; byte strings carry a u32 count unless they run to the end of the
frame.  C{protocol-spec/README.md} is the normative description; the golden
vectors in C{protocol-spec/vectors/} are checked against this module by the
test suite.

This module is pure: it turns messages into bytes and bytes into messages,
and knows nothing of connections or state.

Why it is one module of over 400 lines: it is one table, the byte layout
of every message of L{jobworker.protocol.messages}, each next to the
shared field types it uses, mirroring the spec's section on frames.
"""

from __future__ import annotations

import io
import struct
import uuid
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from construct import (
    Adapter,
    Bytes,
    ConstructError,
    Container,
    Flag,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32sb,
    Int32ub,
    Int64ub,
    PascalString,
    PrefixedArray,
    Struct,
    Terminated,
)

from jobworker.errors import ErrorCode, ProtocolError
from jobworker.limits import LimitError, Limits
from jobworker.protocol import messages as m
from jobworker.protocol.statuses import decode_status, encode_status

__all__ = [
    "HEADER_SIZE",
    "MAX_FRAME_LIMIT",
    "encode_message",
    "decode_body",
    "frame_header",
    "encode_output",
    "encode_output_head",
    "encode_time_mark",
    "status_size",
    "list_response",
]

HEADER_SIZE = 4

# No peer may announce a larger maximum than this (16 MiB); it bounds the
# memory one connection can make us hold for a single frame.
MAX_FRAME_LIMIT = 16 << 20


class _Uuid(Adapter):
    def _decode(self, obj: bytes, context: Any, path: Any) -> uuid.UUID:
        return uuid.UUID(bytes=obj)

    def _encode(self, obj: uuid.UUID, context: Any, path: Any) -> bytes:
        return obj.bytes


class _Record(Adapter):
    """
    Map a construct C{Struct} to a frozen dataclass field by field.

    Enum fields are rebuilt from their integer; tuple fields from the lists
    that C{PrefixedArray} yields.  A value the dataclass refuses (an unknown
    enum code, a limit out of range) becomes a L{ProtocolError}: the peer
    sent something no correct encoder could produce.
    """

    def __init__(self, subcon: Any, cls: type, omitted: tuple[str, ...] = ()) -> None:
        """
        @param omitted: fields of C{cls} that this layout (one of an earlier
            protocol version) does not carry: decoded, they take their
            defaults.
        """
        super().__init__(subcon)
        self.cls = cls
        self.field_names = [f.name for f in fields(cls) if f.init and f.name not in omitted]
        self.converters = _converters(cls)

    def _decode(self, obj: Any, context: Any, path: Any) -> Any:
        values = {}
        for name in self.field_names:
            value = obj[name]
            convert = self.converters.get(name)
            if convert is not None:
                try:
                    value = convert(value)
                except ValueError as exc:
                    raise ProtocolError(
                        f"{self.cls.__name__}.{name}: invalid value {value!r}",
                        ErrorCode.PROTOCOL_ERROR,
                    ) from exc
            values[name] = value
        try:
            return self.cls(**values)
        except LimitError as exc:
            raise ProtocolError(f"{self.cls.__name__}: {exc}") from exc

    def _encode(self, obj: Any, context: Any, path: Any) -> dict[str, Any]:
        return {name: getattr(obj, name) for name in self.field_names}


def _pairs(value: list[Any]) -> tuple[tuple[str, str], ...]:
    return tuple((item.key, item.value) for item in value)


def _converters(cls: type) -> dict[str, Any]:
    table: dict[type, dict[str, Any]] = {
        m.JobStatus: {"argv": tuple, "state": m.JobState, "network": m.Network, "labels": _pairs},
        m.StartRequest: {"argv": tuple, "env": _pairs, "network": m.Network, "labels": _pairs},
        m.ListRequest: {"labels": tuple},
        m.ListResponse: {"jobs": tuple},
        m.EndOfStream: {"reason": m.EndReason},
    }
    return table.get(cls, {})


class _EnvPairs(Adapter):
    def _decode(self, obj: Any, context: Any, path: Any) -> Any:
        return obj

    def _encode(self, obj: Any, context: Any, path: Any) -> list[dict[str, str]]:
        return [{"key": key, "value": value} for key, value in obj]


Text = PascalString(Int16ub, "utf8")
# Labels have the layout of environment entries: (key, value) texts.
Labels = _EnvPairs(PrefixedArray(Int16ub, Struct("key" / Text, "value" / Text)))
JobId = _Uuid(Bytes(16))
RequestId = Int32ub
StreamId = Int32ub

_LIMITS = Struct(
    "cpu_millicores" / Int32ub,
    "memory_bytes" / Int64ub,
    "io_read_bps" / Int64ub,
    "io_write_bps" / Int64ub,
    "pids" / Int32ub,
    "timeout_ms" / Int64ub,
)
LimitsSchema = _Record(_LIMITS, Limits)


class _RequestLimits(Adapter):
    """
    The limits of a start request: the same bytes as L{LimitsSchema}, but a
    value out of range becomes L{m.InvalidLimits}, answered as that one
    request's error, instead of failing the whole frame.
    """

    def _decode(self, obj: Any, context: Any, path: Any) -> Limits | m.InvalidLimits:
        try:
            return Limits(**{name: obj[name] for name in _LIMIT_FIELDS})
        except LimitError as exc:
            return m.InvalidLimits(str(exc))

    def _encode(self, obj: Any, context: Any, path: Any) -> dict[str, int]:
        if isinstance(obj, m.InvalidLimits):
            raise ValueError(f"cannot encode invalid limits: {obj.reason}")
        return {name: getattr(obj, name) for name in _LIMIT_FIELDS}


_LIMIT_FIELDS = [f.name for f in fields(Limits)]

UsageSchema = _Record(
    Struct(
        "cpu_usec" / Int64ub,
        "memory_peak_bytes" / Int64ub,
        "io_read_bytes" / Int64ub,
        "io_write_bytes" / Int64ub,
        "pids_peak" / Int32ub,
    ),
    m.JobUsage,
)

StatusSchema = _Record(
    Struct(
        "job_id" / JobId,
        "owner" / Text,
        "argv" / PrefixedArray(Int16ub, Text),
        "state" / Int8ub,
        "exit_code" / Int32sb,
        "signal" / Int8ub,
        "created_at" / Int64ub,
        "started_at" / Int64ub,
        "ended_at" / Int64ub,
        "error" / Text,
        "stopped_by" / Text,
        "limits" / LimitsSchema,
        "usage" / UsageSchema,
        "output_bytes" / Int64ub,
        "workdir" / Text,
        "user" / Text,
        "network" / Int8ub,
        "uid" / Int32ub,
        "abridged" / Flag,
        "name" / Text,
        "labels" / Labels,
    ),
    m.JobStatus,
)

# A version 3 ListRequest: version 4 appends newest_first.
_LIST_REQUEST_V3 = (
    "request_id" / RequestId,
    "after_created_at" / Int64ub,
    "after_job_id" / JobId,
    "max_jobs" / Int32ub,
    "states" / Int16ub,
    "owner" / Text,
    "name" / Text,
    "labels" / PrefixedArray(Int16ub, Text),
)

# The body layout of each message type, keyed by its class, in the
# protocol's current version (m.PROTOCOL_VERSION).
SCHEMAS: dict[type[m.Message], Any] = {
    m.ServerHello: Struct(
        "version" / Int16ub,
        "max_frame_size" / Int32ub,
        "server_name" / Text,
        "identity" / Text,
        "role" / Text,
        "server_version" / Text,
    ),
    m.ClientHello: Struct("version" / Int16ub, "max_frame_size" / Int32ub),
    m.GoAway: Struct("code" / Int16ub, "message" / Text),
    m.Ping: Struct("data" / Int64ub),
    m.Pong: Struct("data" / Int64ub),
    m.StartRequest: Struct(
        "request_id" / RequestId,
        "argv" / PrefixedArray(Int16ub, Text),
        "env" / _EnvPairs(PrefixedArray(Int16ub, Struct("key" / Text, "value" / Text))),
        "workdir" / Text,
        "user" / Text,
        "network" / Int8ub,
        "limits" / _RequestLimits(_LIMITS),
        "name" / Text,
        "labels" / Labels,
    ),
    m.StopRequest: Struct(
        "request_id" / RequestId, "job_id" / JobId, "grace_ms" / Int32ub, "force" / Flag
    ),
    m.StatusRequest: Struct("request_id" / RequestId, "job_id" / JobId),
    m.ListRequest: Struct(*_LIST_REQUEST_V3, "newest_first" / Flag),
    m.WaitRequest: Struct("request_id" / RequestId, "job_id" / JobId),
    m.FollowRequest: Struct(
        "request_id" / RequestId,
        "job_id" / JobId,
        "stream_id" / StreamId,
        "offset" / Int64ub,
        "window" / Int32ub,
        "follow" / Flag,
        "timestamps" / Flag,
        "since" / Int64ub,
    ),
    m.RemoveRequest: Struct("request_id" / RequestId, "job_id" / JobId),
    m.SignalRequest: Struct("request_id" / RequestId, "job_id" / JobId, "signal" / Int8ub),
    m.WindowUpdate: Struct("stream_id" / StreamId, "increment" / Int32ub),
    m.CancelStream: Struct("stream_id" / StreamId),
    m.StartResponse: Struct("request_id" / RequestId, "job_id" / JobId),
    m.StatusResponse: Struct("request_id" / RequestId, "status" / StatusSchema),
    m.ListResponse: Struct(
        "request_id" / RequestId, "jobs" / PrefixedArray(Int32ub, StatusSchema), "more" / Flag
    ),
    m.OkResponse: Struct("request_id" / RequestId),
    m.ErrorResponse: Struct("request_id" / RequestId, "code" / Int16ub, "message" / Text),
    m.Output: Struct(
        "stream_id" / StreamId, "fd" / Int8ub, "offset" / Int64ub, "data" / GreedyBytes
    ),
    m.Gap: Struct("stream_id" / StreamId, "offset" / Int64ub, "length" / Int64ub),
    m.EndOfStream: Struct("stream_id" / StreamId, "reason" / Int8ub, "status" / StatusSchema),
    m.TimeMark: Struct("stream_id" / StreamId, "offset" / Int64ub, "time" / Int64ub),
}

_BODIES = {cls: _Record(schema, cls) for cls, schema in SCHEMAS.items()}
# Every body but Output's must be consumed exactly: trailing bytes mean the
# peer and we disagree on the layout, which is a protocol error, not noise.
_PARSERS = {
    cls.TYPE: (cls, body if cls is m.Output else Struct("value" / body, Terminated))
    for cls, body in _BODIES.items()
}
# Version 3's layouts, where they differ from the current version's: only
# the ListRequest's, which version 4 extends.
_V3_BODIES: dict[type[m.Message], Any] = {
    m.ListRequest: _Record(Struct(*_LIST_REQUEST_V3), m.ListRequest, omitted=("newest_first",)),
}
_V3_PARSERS = {cls.TYPE: (cls, Struct("value" / body, Terminated)) for cls, body in _V3_BODIES.items()}
_STATUS_FRAME_TYPES = {cls.TYPE: cls for cls in (m.StatusResponse, m.ListResponse, m.EndOfStream)}
_FRAME_HEADER = Struct("length" / Int32ub, "type" / Int8ub).compile()
_NO_ROOT = Container()

# Output frames carry nearly every byte the service sends, so they have a
# fast path: the frame header and the fixed 13-byte head packed by one
# struct (a compiled construct schema costs 5 us more per frame, a tenth of
# the server's time per 64 KiB frame), and the data taken as the rest of the
# frame without copying it through construct's streams (which costs ~200 us
# per 64 KiB).  It yields exactly the bytes of SCHEMAS[Output]; the test
# suite checks that both agree.
OUTPUT_HEAD_SIZE = 13
_OUTPUT_PREFIX = struct.Struct(">IBIBQ")  # length, type, stream_id, fd, offset
_OUTPUT_HEAD = struct.Struct(">IBQ")  # stream_id, fd, offset
assert _OUTPUT_HEAD.size == OUTPUT_HEAD_SIZE
# TimeMark frames go out beside the Output frames of a stream that asked for
# times, so they are packed by one struct too (the same bytes as
# SCHEMAS[TimeMark]; the test suite checks that both agree).
TIME_MARK_FRAME_SIZE = 4 + 1 + 20
_TIME_MARK = struct.Struct(">IBIQQ")  # length, type, stream_id, offset, time
assert _TIME_MARK.size == TIME_MARK_FRAME_SIZE


def frame_header(length: int, message_type: int) -> bytes:
    """
    The five bytes that open a frame whose type byte plus body are C{length}.
    """
    header: bytes = _FRAME_HEADER.build({"length": length, "type": message_type})
    return header


def encode_message(message: m.Message, version: int = m.PROTOCOL_VERSION) -> bytes:
    """
    Encode C{message} as one complete frame (header included), in the
    layout of protocol C{version} (the connection's, once negotiated).

    @raise ValueError: the message cannot be encoded, or not in C{version}
        (a C{ListRequest} with C{newest_first} in version 3).
    """
    kind = type(message)
    if kind is m.Output:
        return encode_output(message.stream_id, message.fd, message.offset, message.data)  # type: ignore[attr-defined]
    if kind in _STATUS_FRAMES:
        packed = _encode_status_frame(message)
        return frame_header(len(packed) + 1, message.TYPE) + packed
    if kind is m.ListRequest and version < m.NEWEST_FIRST_VERSION and message.newest_first:  # type: ignore[attr-defined]
        raise ValueError(f"a newest-first list needs protocol version {m.NEWEST_FIRST_VERSION}; this connection speaks {version}")
    try:
        schema = _V3_BODIES.get(kind) if version == 3 else None
        if schema is None:
            schema = _BODIES[kind]
        body: bytes = schema.build(message)
    except (ConstructError, KeyError, UnicodeEncodeError) as exc:
        # Our own caller built an unencodable message: a bug here, not the
        # peer's fault, so it is not a ProtocolError.
        raise ValueError(f"cannot encode {message!r}: {exc}") from exc
    return frame_header(len(body) + 1, message.TYPE) + body


def status_size(status: m.JobStatus) -> int:
    """
    Bytes of C{status} as a L{m.JobStatus} record on the wire.
    """
    return len(encode_status(status))


# The frames that carry statuses have a fast path (L{jobworker.protocol.
# statuses}): the same bytes as their schemas above, which the test suite
# checks.
_STATUS_FRAMES = (m.StatusResponse, m.ListResponse, m.EndOfStream)
_REQUEST_ID = struct.Struct(">I")
_LIST_HEAD = struct.Struct(">II")  # request_id, job count
_END_HEAD = struct.Struct(">IB")  # stream_id, reason


# Where list_response keeps the statuses' bytes on its ListResponse: an
# attribute, not a field, so the message compares, prints and parses as any.
_ENCODED_STATUSES = "_encoded_statuses"


def list_response(request_id: int, jobs: Sequence[m.JobStatus], encoded: Sequence[bytes], more: bool) -> m.ListResponse:
    """
    A C{ListResponse} of C{jobs}, whose bytes (C{encode_status} of each, in
    order) the caller has made already, as a page is cut by size: its frame
    is made of them, not of the statuses encoded a second time.
    """
    if len(encoded) != len(jobs):
        raise ValueError(f"{len(encoded)} encoded statuses for {len(jobs)} jobs")
    response = m.ListResponse(request_id, tuple(jobs), more)
    object.__setattr__(response, _ENCODED_STATUSES, tuple(encoded))
    return response


def _encode_status_frame(message: Any) -> bytes:
    try:
        if type(message) is m.StatusResponse:
            return _REQUEST_ID.pack(message.request_id) + encode_status(message.status)
        if type(message) is m.EndOfStream:
            return _END_HEAD.pack(message.stream_id, int(message.reason)) + encode_status(message.status)
        jobs = message.jobs
        encoded = message.__dict__.get(_ENCODED_STATUSES)
        return b"".join(
            [
                _LIST_HEAD.pack(message.request_id, len(jobs)),
                *(map(encode_status, jobs) if encoded is None else encoded),
                b"\x01" if message.more else b"\x00",
            ]
        )
    except (struct.error, TypeError, AttributeError, OverflowError) as exc:
        raise ValueError(f"cannot encode {message!r}: {exc}") from exc


def _decode_status_frame(cls: type[m.Message], body: bytes | memoryview) -> m.Message:
    """
    A C{StatusResponse}, C{ListResponse} or C{EndOfStream} body, parsed as
    its schema would, trailing bytes refused as there.
    """
    try:
        if cls is m.ListResponse:
            if len(body) < _LIST_HEAD.size:
                raise ProtocolError("the frame ends inside its head")
            request_id, count = _LIST_HEAD.unpack_from(body)
            at = _LIST_HEAD.size
            jobs = []
            for _ in range(count):
                status, at = decode_status(body, at)
                jobs.append(status)
            if at >= len(body):
                raise ProtocolError("the frame ends before its more flag")
            more = body[at] != 0
            at += 1
            message: m.Message = m.ListResponse(request_id, tuple(jobs), more)
        elif cls is m.StatusResponse:
            if len(body) < _REQUEST_ID.size:
                raise ProtocolError("the frame ends inside its head")
            (request_id,) = _REQUEST_ID.unpack_from(body)
            status, at = decode_status(body, _REQUEST_ID.size)
            message = m.StatusResponse(request_id, status)
        else:
            if len(body) < _END_HEAD.size:
                raise ProtocolError("the frame ends inside its head")
            stream_id, reason = _END_HEAD.unpack_from(body)
            try:
                end_reason = m.EndReason(reason)
            except ValueError:
                raise ProtocolError(f"EndOfStream.reason: invalid value {reason!r}") from None
            status, at = decode_status(body, _END_HEAD.size)
            message = m.EndOfStream(stream_id, end_reason, status)
        if at != len(body):
            raise ProtocolError(f"{len(body) - at} bytes after the end of the message")
    except ProtocolError as exc:
        if str(exc).startswith(("JobStatus.", "EndOfStream.", "Limits:")):
            raise
        raise ProtocolError(f"malformed {cls.__name__} frame: {exc}") from exc
    return message


def decode_body(message_type: int, body: bytes | memoryview, version: int = m.PROTOCOL_VERSION) -> m.Message:
    """
    Decode one frame's body given its type byte, in the layout of protocol
    C{version} (the connection's, once negotiated).

    @raise ProtocolError: unknown type (C{UNKNOWN_MESSAGE}) or a body that
        does not parse (C{PROTOCOL_ERROR}).
    """
    if message_type == m.Output.TYPE:
        return _decode_output(body)
    status_frame = _STATUS_FRAME_TYPES.get(message_type)
    if status_frame is not None:
        return _decode_status_frame(status_frame, body)
    entry = (_V3_PARSERS.get(message_type) if version == 3 else None) or _PARSERS.get(message_type)
    if entry is None:
        raise ProtocolError(
            f"unknown message type 0x{message_type:02x}", ErrorCode.UNKNOWN_MESSAGE
        )
    cls, parser = entry
    # construct's top parse context refers to itself (C{_root}) and holds
    # every parsed value and the stream: a cycle that kept each decoded
    # message, and a copy of its body, until the garbage collector's next
    # full pass (256 KiB per large start request).  A C{_root} given in
    # advance (no schema here reads it) makes no cycle; closing the stream
    # frees the copy of the body at once.
    stream = io.BytesIO(body)
    try:
        parsed = parser.parse_stream(stream, _root=_NO_ROOT)
    except ProtocolError:
        raise
    except (ConstructError, UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed {cls.__name__} frame: {_first_line(exc)}") from exc
    finally:
        stream.close()
    decoded: m.Message = parsed if cls is m.Output else parsed.value
    return decoded


def encode_output(stream_id: int, fd: int, offset: int, data: bytes | memoryview) -> bytes:
    """
    Encode an L{m.Output} frame without building the message object first.
    """
    return encode_output_head(stream_id, fd, offset, len(data)) + data


def encode_output_head(stream_id: int, fd: int, offset: int, size: int) -> bytes:
    """
    The bytes of an L{m.Output} frame of C{size} data bytes that come before
    the data: so a sender can put head and data side by side in a larger
    buffer and copy the data only once.
    """
    if not (0 <= stream_id < 1 << 32 and 0 <= fd < 256 and 0 <= offset < 1 << 64):
        raise ValueError(f"cannot encode Output({stream_id}, {fd}, {offset}): a field is out of range")
    return _OUTPUT_PREFIX.pack(size + OUTPUT_HEAD_SIZE + 1, m.Output.TYPE, stream_id, fd, offset)


def encode_time_mark(stream_id: int, offset: int, time: int) -> bytes:
    """
    Encode an L{m.TimeMark} frame without building the message object.
    """
    if not (0 <= stream_id < 1 << 32 and 0 <= offset < 1 << 64 and 0 <= time < 1 << 64):
        raise ValueError(f"cannot encode TimeMark({stream_id}, {offset}, {time}): a field is out of range")
    return _TIME_MARK.pack(TIME_MARK_FRAME_SIZE - 4, m.TimeMark.TYPE, stream_id, offset, time)


def _decode_output(body: bytes | memoryview) -> m.Output:
    if len(body) < OUTPUT_HEAD_SIZE:
        raise ProtocolError("malformed Output frame: shorter than its 13-byte head")
    stream_id, fd, offset = _OUTPUT_HEAD.unpack_from(body)
    if fd not in (1, 2):
        raise ProtocolError(f"malformed Output frame: fd {fd} is neither 1 nor 2")
    return m.Output(stream_id, fd, offset, bytes(body[OUTPUT_HEAD_SIZE:]))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
