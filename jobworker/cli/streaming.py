"""
C{jobcli logs}/C{run} output: streaming a job's output (C{-f}, C{--tail},
C{--since}) and prefixing its lines with the time they were written.
"""

from __future__ import annotations

import time
import uuid

from jobworker.blocking import BlockingClient
from jobworker.cli.output import Console, OutputWriter
from jobworker.protocol import messages as m


def format_timestamp(microseconds: int | None) -> str:
    """
    An output time as C{jobcli logs -t} prints it: RFC 3339 in UTC with
    microseconds (C{2026-12-02T10:00:00.123456Z}); C{-} when unknown.
    """
    if microseconds is None:
        return "-"
    seconds, micros = divmod(microseconds, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


class _Timestamper:
    """
    Puts the time the server read each line's first byte in front of the
    line (C{jobcli logs -t}), from the stream's time marks.  Each stream
    (stdout, stderr) has its own line starts; the time of a byte is that of
    the last mark at or before its offset.
    """

    def __init__(self) -> None:
        self._marks: list[tuple[int, int]] = []  # (offset, time), ascending, not yet passed
        self._time: int | None = None  # the mark in force
        self._line_start = {1: True, 2: True}

    def mark(self, offset: int, when: int) -> None:
        self._marks.append((offset, when))

    def _time_at(self, offset: int) -> int | None:
        marks = self._marks
        while marks and marks[0][0] <= offset:
            self._time = marks.pop(0)[1]
        return self._time

    def stamp(self, fd: int, offset: int, data: bytes | memoryview) -> bytes:
        data = bytes(data)
        if not data:
            return data
        pieces = []
        at = 0
        while at < len(data):
            if self._line_start[fd]:
                pieces.append(format_timestamp(self._time_at(offset + at)).encode() + b" ")
            newline = data.find(b"\n", at)
            end = len(data) if newline < 0 else newline + 1
            pieces.append(data[at:end])
            self._line_start[fd] = newline >= 0
            at = end
        # Marks of bytes passed go, so the list stays as short as a chunk's.
        self._time_at(offset + len(data) - 1)
        return b"".join(pieces)


def stream_output(
    client: BlockingClient,
    job_id: uuid.UUID,
    offset: int,
    follow: bool,
    console: Console,
    fds: frozenset[int] = frozenset((1, 2)),
    timestamps: bool = False,
    since: float | None = None,
) -> m.JobStatus:
    """
    Copy the job's output from C{offset} to our stdout and stderr (only the
    streams in C{fds}); return the status that ended the stream.

    @param timestamps: each line prefixed with the time the server read it.
    @param since: seconds since the epoch: only output read from then on.
    """
    status = None
    stamper = _Timestamper() if timestamps else None
    gaps = dropped = 0
    # Straight to our own stdout, never blocking the main thread, so a slow
    # reader of ours never stalls keep-alive (see OutputWriter); with a
    # prefix, whole lines through the console, credit as they are handled.
    writer = OutputWriter() if console.prefix is None else None
    stream_id: list[int] = []

    def written() -> None:
        assert writer is not None
        size = writer.take_written()
        if size and stream_id:
            client.grant(stream_id[0], size)

    def note(text: str) -> None:
        if writer is not None:
            writer.write(2, f"jobcli: {text}\n".encode())
        else:
            console.err(f"jobcli: {text}")

    if writer is not None:
        client.wake_on(writer.wake_fd, written)
    try:
        messages = client.follow(
            job_id, offset=offset, follow=follow, auto_credit=False, timestamps=timestamps, since=since
        )
        for message in messages:
            if not stream_id:
                stream_id.append(message.stream_id)
            if isinstance(message, m.Output):
                data = message.data
                if stamper is not None and message.fd in fds:
                    data = stamper.stamp(message.fd, message.offset, data)
                if message.fd not in fds:
                    client.grant(message.stream_id, len(message.data))
                elif writer is not None:
                    done = writer.write(message.fd, data, len(message.data))
                    if done:
                        client.grant(message.stream_id, done)
                else:
                    console.write(message.fd, data)
                    client.grant(message.stream_id, len(message.data))
            elif isinstance(message, m.TimeMark):
                if stamper is not None:
                    stamper.mark(message.offset, message.time)
            elif isinstance(message, m.Gap):
                # The first gap is reported when it happens; the rest in one
                # total at the end, so a long lagging follow does not flood.
                if not gaps:
                    note(
                        f"{message.length} bytes of output at offset {message.offset} "
                        "were not kept by the server (its retention limit, a full disk or damage; see jobcli status)"
                    )
                gaps += 1
                dropped += message.length
            else:
                status = message.status
    except KeyboardInterrupt:
        # Leave at once, even with a write held up by our reader.
        client.wake_on(None)
        raise
    except BaseException:
        # What arrived before the error is still written out.
        client.wake_on(None)
        try:
            if writer is not None:
                writer.finish()
            console.flush()
        except Exception:
            pass
        raise
    client.wake_on(None)
    if writer is not None:
        writer.finish()
    console.flush()
    if gaps > 1:
        console.err(f"jobcli: in all, {dropped} bytes of output in {gaps} gaps were not kept by the server")
    assert status is not None
    return status


def tail_offset(client: BlockingClient, job_id: uuid.UUID, lines: int, fds: frozenset[int]) -> int:
    """
    The offset from which the output of C{fds} holds its last C{lines}
    lines, as C{tail -n} counts them (a last line without its newline is a
    line).  Reads back from the end in growing windows (64 KiB, times 4),
    so a short tail of a long log costs little.
    """
    end = client.status(job_id).output_bytes
    if lines == 0:
        return end
    window = 64 << 10
    while True:
        start = max(0, end - window)
        chunks = [
            (message.offset, message.data)
            for message in client.follow(job_id, offset=start, follow=False)
            if isinstance(message, m.Output) and message.fd in fds
        ]
        # Newlines from the end; the one that ends the output is no separator.
        wanted = lines
        if chunks and chunks[-1][1].endswith(b"\n"):
            wanted += 1
        for chunk_offset, data in reversed(chunks):
            position = len(data)
            while wanted:
                position = data.rfind(b"\n", 0, position)
                if position < 0:
                    break
                wanted -= 1
                if not wanted:
                    return chunk_offset + position + 1
        if start == 0:
            return 0
        window *= 4
