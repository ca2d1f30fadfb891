"""
Output streaming on one connection: the followers' cursors (L{Stream}),
what one turn sends on a stream (L{send_turn}), and the push producer that
serves all of a connection's streams fairly (L{StreamPump}).

Every follow request opens a stream: a cursor (an offset into the job's
L{OutputLog}) and a window of bytes the client has granted.  One push
producer per connection, the L{StreamPump}, serves all of that
connection's streams round-robin, one turn (at most L{TURN_BYTES}) per
stream, so a stream with a lot of backlog cannot starve the others.  It
stops when the transport asks it to (C{pauseProducing}: the TCP buffer is
full) and when no stream has both data and window.  Nothing here buffers
output: a follower that reads slowly only lags on its cursor, and the job,
which is read by the job manager at its own pace, is never slowed by it.

The pump knows its connection only through L{StreamOwner}: the streams,
the clock, serving the inbox first when the transport has room again, and
ending a stream.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from jobworker.logs import Logger
from jobworker.output.log import GAP_FD
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection

__all__ = [
    "FRAME_DATA",
    "PUMP_BUDGET",
    "TURN_BYTES",
    "TURN_SCRATCH",
    "Stream",
    "StreamOwner",
    "StreamPump",
    "send_turn",
    "turn_scratch",
]

log = Logger()

# Bytes one stream may send per turn of the pump: a fair share.
TURN_BYTES = 256 << 10
# Data bytes per Output frame.  Small enough (below glibc's 128 KiB mmap
# threshold) that the client's buffer for each frame is reused rather than
# mapped and faulted in afresh; large enough that the Python work per frame
# (its head, and its decoding on the client) is a small share.
FRAME_DATA = 64 << 10
# Bytes the pump sends before yielding the reactor to other work.
PUMP_BUDGET = 8 << 20
# A turn's frames: TURN_BYTES of data and the heads of its frames and gaps
# (a few hundred bytes); one buffer per reactor thread, for every connection.
TURN_SCRATCH = TURN_BYTES + (64 << 10)
_scratch = threading.local()


def turn_scratch() -> bytearray:
    """
    The buffer a turn's frames are joined into (L{TURN_SCRATCH} bytes), one
    per thread, reused turn after turn.
    """
    buffer: bytearray | None = getattr(_scratch, "turn", None)
    if buffer is None:
        buffer = _scratch.turn = bytearray(TURN_SCRATCH)
    return buffer


class Stream:
    """
    One follower: a cursor into a job's output, and the callback the job's
    output log calls when there is more (L{subscription}).

    @ivar offset: the next byte of the job's output to send.
    @ivar follow: whether the stream waits for more output at the end of
        what there is, or ends there (C{CAUGHT_UP}).
    @ivar timestamps: whether TimeMark frames go before the output they date
        (spec section 8.7).
    @ivar mark_time: with timestamps, the time of the last TimeMark sent
        (-1: none yet).
    """

    def __init__(
        self,
        stream_id: int,
        job: Any,
        offset: int,
        follow: bool,
        subscription: Callable[[], None],
        timestamps: bool = False,
    ) -> None:
        self.stream_id = stream_id
        self.job = job
        self.offset = offset
        self.follow = follow
        self.subscription = subscription
        self.timestamps = timestamps
        self.mark_time = -1


def send_turn(
    conn: Connection, stream: Stream, write_turn: Callable[[list[bytes | memoryview]], None]
) -> tuple[int, m.EndReason | None]:
    """
    Send what one turn allows on C{stream}: at most L{TURN_BYTES} and the
    stream's window, in frames of at most L{FRAME_DATA} data bytes, handed
    to C{write_turn} as one list of pieces (one write).

    @return: the progress made (data bytes sent, at least 1 when only a gap
        went out) and why the stream ends now, if it does (its job ended and
        all its output was sent; or, for a stream that does not follow, all
        there is was sent).
    """
    job = stream.job
    output = job.output
    window = conn.send_window(stream.stream_id)
    limit = min(window, TURN_BYTES)
    frame = min(FRAME_DATA, conn.max_output_chunk())
    sent = 0
    if stream.offset < output.end and limit > 0:
        # The turn's frames go out as one write: one copy of the data
        # (the join), one SSL_write, whose TLS records are all full
        # (frame by frame, each 64 KiB frame would end in a record of 22
        # bytes), and one read of the ciphertext.
        pieces: list[bytes | memoryview] = []
        for chunk in output.read(stream.offset, limit):
            if chunk.fd == GAP_FD:
                pieces.append(conn.send(m.Gap(stream.stream_id, chunk.offset, chunk.gap)))
            else:
                data = memoryview(chunk.data)
                if stream.timestamps:
                    time_marks(conn, stream, chunk.offset, len(data), pieces)
                for at in range(0, len(data), frame):
                    piece = data[at : at + frame]
                    pieces.append(conn.send_output_head(stream.stream_id, chunk.fd, chunk.offset + at, len(piece)))
                    pieces.append(piece)
                sent += len(data)
            stream.offset = chunk.offset + chunk.size
        write_turn(pieces)
        return max(sent, 1), None
    if stream.offset >= output.end:
        if output.closed and job.is_final:
            return 0, m.EndReason.JOB_ENDED
        if not stream.follow:
            return 0, m.EndReason.CAUGHT_UP
    return 0, None


def time_marks(conn: Connection, stream: Stream, offset: int, size: int, pieces: list[bytes | memoryview]) -> None:
    """
    The TimeMark frames for the C{size} bytes from C{offset}, before their
    Output frames: one per mark of the log (one per chunk the server read),
    and none for a range the last one sent covers.
    """
    for mark_offset, when in stream.job.output.marks.between(offset, offset + size):
        if mark_offset == offset and when == stream.mark_time:
            continue  # the mark in force goes on from the last read
        pieces.append(conn.send_time_mark(stream.stream_id, mark_offset, when))
        stream.mark_time = when


class StreamOwner(Protocol):
    """
    What L{StreamPump} needs of its connection.
    """

    reactor: Any
    streams: dict[int, Stream]
    peer: str

    def serve_inbox(self) -> None: ...

    def serve_stream(self, stream: Stream) -> int: ...

    def end_stream(self, stream: Stream, reason: m.EndReason) -> None: ...


@implementer(IPushProducer)
class StreamPump:
    """
    Sends the output of a connection's streams as the client's windows and
    the transport allow; see the module docstring.
    """

    def __init__(self, owner: StreamOwner) -> None:
        self.owner: StreamOwner | None = owner
        self.paused = False
        self._scheduled: Any = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.owner is None:
            return
        # Answers first: they were waiting for the same room.
        self.owner.serve_inbox()
        self.wake()

    def stopProducing(self) -> None:
        self.paused = True

    def wake(self) -> None:
        """
        Something changed (output, a window, the transport): send soon.
        Coalesces many wake-ups into one turn of the reactor.
        """
        if self._scheduled is None and not self.paused and self.owner is not None:
            self._scheduled = self.owner.reactor.callLater(0, self._run)

    def cancel(self) -> None:
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None

    def detach(self) -> None:
        """
        The connection is gone: let go of it.  The transport's producer
        reference would otherwise close a cycle (transport -> pump ->
        protocol -> transport) that holds the connection's buffers until the
        garbage collector's next full pass.
        """
        self.cancel()
        self.paused = True
        self.owner = None

    def _paused_meanwhile(self) -> bool:
        # The transport pauses the pump from within a write (serve_stream);
        # a method, so that the type checker does not take paused for fixed.
        return self.paused

    def _run(self) -> None:
        self._scheduled = None
        owner = self.owner
        if owner is None:
            return
        budget = PUMP_BUDGET
        while not self.paused and budget > 0 and owner.streams:
            progressed = False
            for stream in list(owner.streams.values()):
                if self._paused_meanwhile():
                    break
                if owner.streams.get(stream.stream_id) is not stream:
                    continue  # ended meanwhile, by another stream's turn
                try:
                    sent = owner.serve_stream(stream)
                except Exception:
                    # One stream's failure is that stream's end, never the
                    # pump's or the connection's.
                    log.failure("internal error serving stream {stream_id} of {peer}", stream_id=stream.stream_id, peer=owner.peer)
                    owner.end_stream(stream, m.EndReason.SERVER_ERROR)
                    sent = 0
                if sent:
                    progressed = True
                    budget -= sent
            if not progressed:
                return
        if not self.paused and budget <= 0:
            self.wake()
