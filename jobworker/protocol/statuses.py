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


class _Reader:
    """
    A position in a frame's body; every read checks that the bytes are
    there (a short body is the peer's error, a L{ProtocolError}).
    """

    __slots__ = ("data", "at")

    def __init__(self, data: bytes | memoryview, at: int) -> None:
        self.data = data
        self.at = at

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        if self.at + layout.size > len(self.data):
            raise ProtocolError(f"the frame ends inside a status, at byte {self.at}")
        values = layout.unpack_from(self.data, self.at)
        self.at += layout.size
        return values

    def text(self) -> str:
        (size,) = self.unpack(_U16)
        end = self.at + size
        if end > len(self.data):
            raise ProtocolError(f"the frame ends inside a text of {size} bytes, at byte {self.at}")
        raw = self.data[self.at : end]
        self.at = end
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"a text is not UTF-8: {exc}") from None


def _enum(kind: Any, name: str, value: int) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise ProtocolError(f"JobStatus.{name}: invalid value {value!r}") from None


def decode_status(data: bytes | memoryview, at: int) -> tuple[m.JobStatus, int]:
    """
    The C{JobStatus} record at byte C{at} of C{data}, and the byte after
    it: what C{wire.StatusSchema} parses there, with the same checks (an
    unknown state or network, limits out of range).

    @raise ProtocolError: the record is malformed or cut short.
    """
    reader = _Reader(data, at)
    if at + 16 > len(data):
        raise ProtocolError(f"the frame ends inside a status, at byte {at}")
    job_id = uuid.UUID(bytes=bytes(data[at : at + 16]))
    reader.at += 16
    owner = reader.text()
    (count,) = reader.unpack(_U16)
    argv = tuple(reader.text() for _ in range(count))
    state, exit_code, signal, created_at, started_at, ended_at = reader.unpack(_TIMES)
    error = reader.text()
    stopped_by = reader.text()
    numbers = reader.unpack(_NUMBERS)
    workdir = reader.text()
    user = reader.text()
    network, uid, abridged = reader.unpack(_TAIL)
    name = reader.text()
    (count,) = reader.unpack(_U16)
    labels = tuple((reader.text(), reader.text()) for _ in range(count))
    try:
        limits = Limits(*numbers[:6])
    except LimitError as exc:
        raise ProtocolError(f"Limits: {exc}") from exc
    status = m.JobStatus(
        job_id=job_id,
        owner=owner,
        argv=argv,
        state=_enum(m.JobState, "state", state),
        exit_code=exit_code,
        signal=signal,
        created_at=created_at,
        started_at=started_at,
        ended_at=ended_at,
        error=error,
        stopped_by=stopped_by,
        limits=limits,
        usage=m.JobUsage(*numbers[6:11]),
        output_bytes=numbers[11],
        workdir=workdir,
        user=user,
        network=_enum(m.Network, "network", network),
        uid=uid,
        abridged=abridged != 0,
        name=name,
        labels=labels,
    )
    return status, reader.at
