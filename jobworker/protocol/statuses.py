"""
The byte layout of a job status (spec section 6.2, C{JobStatus}) packed
and parsed with C{struct}: the fast path of the frames that carry
statuses (C{StatusResponse}, C{ListResponse}, C{EndOfStream}).

Why a second codec beside the C{construct} schema of
L{jobworker.protocol.wire}: a list page is almost nothing but statuses,
and C{construct} takes ~230 us to build one and more to parse it, so a
page of 100 cost the server 45 ms and a list of 10,000 jobs streamed at
~5,000 jobs/s.  Packed here, a status takes a few microseconds each way.
The schema in C{wire} stays the reference: the test suite checks that
both produce and accept exactly the same bytes (with Hypothesis, and
against the golden vectors), as it does for the C{Output} fast path.

Pure: bytes in, messages out.
"""

from __future__ import annotations

import dataclasses
import struct
import uuid
from typing import Any

from jobworker.errors import ProtocolError
from jobworker.limits import LimitError, Limits
from jobworker.protocol import messages as m

__all__ = ["encode_status", "decode_status"]

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# state, exit_code, signal, created_at, started_at, ended_at
_TIMES = struct.Struct(">BiBQQQ")
# the limits (cpu_millicores, memory, io read, io write, pids, timeout_ms),
# the usage (cpu_usec, memory peak, io read, io write, pids peak), and
# output_bytes
_NUMBERS = struct.Struct(">IQQQIQQQQQIQ")
# network, uid, abridged
_TAIL = struct.Struct(">BIB")


def _text(value: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError(f"a text of {len(data)} bytes does not fit its u16 length")
    return _U16.pack(len(data)) + data


def encode_status(status: m.JobStatus) -> bytes:
    """
    The bytes of C{status} as a C{JobStatus} record: the same as
    C{wire.StatusSchema.build(status)}.

    @raise ValueError: a field does not fit its wire type (a text over
        65,535 bytes, a number out of range, a wrong type).
    """
    try:
        limits, usage = status.limits, status.usage
        argv = status.argv
        if len(argv) > 0xFFFF:
            raise ValueError(f"{len(argv)} argv items do not fit a u16 count")
        labels = status.labels
        if len(labels) > 0xFFFF:
            raise ValueError(f"{len(labels)} labels do not fit a u16 count")
        parts = [
            status.job_id.bytes,
            _text(status.owner),
            _U16.pack(len(argv)),
            *(_text(item) for item in argv),
            _TIMES.pack(int(status.state), status.exit_code, status.signal, status.created_at, status.started_at, status.ended_at),
            _text(status.error),
            _text(status.stopped_by),
            _NUMBERS.pack(
                limits.cpu_millicores,
                limits.memory_bytes,
                limits.io_read_bps,
                limits.io_write_bps,
                limits.pids,
                limits.timeout_ms,
                usage.cpu_usec,
                usage.memory_peak_bytes,
                usage.io_read_bytes,
                usage.io_write_bytes,
                usage.pids_peak,
                status.output_bytes,
            ),
            _text(status.workdir),
            _text(status.user),
            _TAIL.pack(int(status.network), status.uid, 1 if status.abridged else 0),
            _text(status.name),
            _U16.pack(len(labels)),
        ]
        for key, value in labels:
            parts.append(_text(key))
            parts.append(_text(value))
    except (struct.error, AttributeError, TypeError, OverflowError) as exc:
        raise ValueError(f"cannot encode {status!r}: {exc}") from exc
    return b"".join(parts)


def _short(at: int) -> ProtocolError:
    return ProtocolError(f"the frame ends inside a status, at byte {at}")


def _read_texts(data: bytes | memoryview, at: int, count: int) -> tuple[list[str], int]:
    """
    C{count} texts (each a u16 length and UTF-8) from byte C{at}, and the
    byte after them: in one call, as a status's texts mostly come in runs
    (argv, the label pairs).
    """
    size = len(data)
    texts = []
    for _ in range(count):
        if at + 2 > size:
            raise _short(at)
        end = at + 2 + (data[at] << 8 | data[at + 1])
        if end > size:
            raise _short(at)
        texts.append(str(data[at + 2 : end], "utf-8"))
        at = end
    return texts, at


def _unpack(layout: struct.Struct, data: bytes | memoryview, at: int) -> tuple[Any, ...]:
    if at + layout.size > len(data):
        raise _short(at)
    return layout.unpack_from(data, at)


# Statuses of one list mostly share their limits (the defaults, a team's
# usual ones): each distinct one is checked and made once.  Bounded, as the
# peer chooses them.
_LIMITS_MEMO: dict[tuple[int, ...], Limits] = {}
_LIMITS_MEMO_SIZE = 256


def _limits(numbers: tuple[int, ...]) -> Limits:
    limits = _LIMITS_MEMO.get(numbers)
    if limits is None:
        try:
            limits = Limits(*numbers)
        except LimitError as exc:
            raise ProtocolError(f"Limits: {exc}") from exc
        if len(_LIMITS_MEMO) >= _LIMITS_MEMO_SIZE:
            _LIMITS_MEMO.clear()
        _LIMITS_MEMO[numbers] = limits
    return limits


_STATES = {int(state): state for state in m.JobState}
_new = object.__new__
_set = object.__setattr__
_USAGE_FIELDS = tuple(field.name for field in dataclasses.fields(m.JobUsage))


def _uuid(raw: bytes) -> uuid.UUID:
    """
    C{uuid.UUID(bytes=raw)} for 16 bytes, without the argument checks that
    make up most of its 2.5 us.
    """
    value = _new(uuid.UUID)
    _set(value, "int", int.from_bytes(raw, "big"))
    _set(value, "is_safe", uuid.SafeUUID.unknown)
    return value


_NETWORKS = {int(network): network for network in m.Network}


def _enum(members: dict[int, Any], name: str, value: int) -> Any:
    member = members.get(value)
    if member is None:
        raise ProtocolError(f"JobStatus.{name}: invalid value {value!r}")
    return member


def decode_status(data: bytes | memoryview, at: int) -> tuple[m.JobStatus, int]:
    """
    The C{JobStatus} record at byte C{at} of C{data}, and the byte after
    it: what C{wire.StatusSchema} parses there, with the same checks (an
    unknown state or network, limits out of range).

    @raise ProtocolError: the record is malformed or cut short.
    """
    try:
        return _decode_status(data, at)
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"a text is not UTF-8: {exc}") from None


def _decode_status(data: bytes | memoryview, at: int) -> tuple[m.JobStatus, int]:
    if at + 16 > len(data):
        raise _short(at)
    job_id = _uuid(bytes(data[at : at + 16]))
    (owner,), at = _read_texts(data, at + 16, 1)
    (count,) = _unpack(_U16, data, at)
    argv, at = _read_texts(data, at + 2, count)
    state, exit_code, signal, created_at, started_at, ended_at = _unpack(_TIMES, data, at)
    (error, stopped_by), at = _read_texts(data, at + _TIMES.size, 2)
    numbers = _unpack(_NUMBERS, data, at)
    (workdir, user), at = _read_texts(data, at + _NUMBERS.size, 2)
    network, uid, abridged = _unpack(_TAIL, data, at)
    (name,), at = _read_texts(data, at + _TAIL.size, 1)
    (count,) = _unpack(_U16, data, at)
    texts, at = _read_texts(data, at + 2, 2 * count)
    labels = tuple(zip(texts[::2], texts[1::2]))
    # The dataclasses' own __init__ (21 keyword arguments, each set through
    # object.__setattr__ as they are frozen) cost more than the parse; the
    # same fields put in the instance's __dict__ make an equal status.
    usage = _new(m.JobUsage)
    usage.__dict__.update(zip(_USAGE_FIELDS, numbers[6:11]))
    status = _new(m.JobStatus)
    status.__dict__.update(
        job_id=job_id,
        owner=owner,
        argv=tuple(argv),
        state=_enum(_STATES, "state", state),
        exit_code=exit_code,
        signal=signal,
        created_at=created_at,
        started_at=started_at,
        ended_at=ended_at,
        error=error,
        stopped_by=stopped_by,
        limits=_limits(numbers[:6]),
        usage=usage,
        output_bytes=numbers[11],
        workdir=workdir,
        user=user,
        network=_enum(_NETWORKS, "network", network),
        uid=uid,
        abridged=abridged != 0,
        name=name,
        labels=labels,
    )
    return status, at
