"""
jobcli's output writer (L{jobworker.cli._OutputWriter}): stream output is
written in the main thread while the output takes it without blocking, and
goes to a thread of its own only once a write would block, in order.

These guard the client's throughput without timing anything: a writer
that hands every frame to its thread (or copies it) when stdout has room
starts the thread here, and these tests fail.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from pathlib import Path

import pytest

from jobworker.cli import _OutputWriter

CHUNK = 64 << 10


def _pipe(size: int = 1 << 20) -> tuple[int, int]:
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, size)
    return read_end, write_end


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = os.read(fd, size - len(data))
        assert piece, f"end of pipe after {len(data)} of {size} bytes"
        data += piece
    return data


def _blocking_flag(fd: int) -> bool:
    return not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK


@pytest.mark.parametrize("kind", ["file", "devnull", "pipe", "socket"])
def test_output_that_takes_the_writes_needs_no_thread(kind: str, tmp_path: Path) -> None:
    """
    To a file, /dev/null, a pipe or a socket with room, every frame is
    written at once from the main thread and its credit is due at once: no
    thread is started and nothing is queued.
    """
    reader = other = None
    if kind == "file":
        fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    elif kind == "devnull":
        fd = os.open(os.devnull, os.O_WRONLY)
    elif kind == "pipe":
        reader, fd = _pipe()
    else:
        ours, other = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        fd = ours.detach()
    writer = _OutputWriter(fds=(fd,))
    try:
        frames = [bytes([n]) * CHUNK for n in range(8)]
        for frame in frames:
            assert writer.write(fd, frame, len(frame)) == len(frame)
        assert not writer.threaded
        assert writer.take_written() == 0
        writer.finish()
        expected = b"".join(frames)
        if kind == "file":
            assert (tmp_path / "out").read_bytes() == expected
        elif kind == "pipe":
            assert reader is not None
            assert _read_exactly(reader, len(expected)) == expected
        elif kind == "socket":
            assert other is not None
            other.settimeout(5)
            received = b""
            while len(received) < len(expected):
                received += other.recv(1 << 20)
            assert received == expected
        # Our own descriptor's flags are never changed (they are shared
        # with whoever else writes there).
        assert _blocking_flag(fd)
    finally:
        os.close(fd)
        if reader is not None:
            os.close(reader)
        if other is not None:
            other.close()


def test_a_full_pipe_hands_over_to_the_thread_without_blocking_and_keeps_the_order() -> None:
    """
    A reader that stops reading: the write returns at once with what fitted,
    the rest (and every later write, whatever the descriptor) goes through
    the thread in order, its credit comes back through take_written, and
    once the thread has caught up the main thread writes directly again.
    """
    reader, fd = _pipe(64 << 10)
    other = os.dup(fd)  # "stderr": the same pipe, so the order shows
    writer = _OutputWriter(fds=(fd, other))
    try:
        first = b"a" * (256 << 10)  # four times what the pipe holds
        returned: list[int] = []
        call = threading.Thread(target=lambda: returned.append(writer.write(fd, first, len(first))))
        call.start()
        call.join(5)
        assert not call.is_alive(), "the main thread blocked on a full pipe"
        [done] = returned
        assert 0 <= done < len(first)
        assert writer.threaded
        note = b"jobcli: a note\n"
        assert writer.write(other, note) == 0  # behind the frame, not before it
        second = b"b" * 1000
        assert writer.write(fd, second, len(second)) == 0
        expected = first + note + second
        assert _read_exactly(reader, len(expected)) == expected
        writer_done = [done]
        for _ in range(200):
            writer_done.append(writer.take_written())
            if sum(writer_done) == len(first) + len(second):
                break
            threading.Event().wait(0.01)
        assert sum(writer_done) == len(first) + len(second)
        # Caught up: the next frame is written at once again.
        third = b"c" * 1000
        assert writer.write(fd, third, len(third)) == len(third)
        assert _read_exactly(reader, len(third)) == third
        writer.finish()
        assert _blocking_flag(fd)
    finally:
        for descriptor in (reader, fd, other):
            os.close(descriptor)


def test_a_broken_pipe_is_raised_to_the_main_thread() -> None:
    reader, fd = _pipe()
    os.close(reader)
    writer = _OutputWriter(fds=(fd,))
    try:
        with pytest.raises(BrokenPipeError):
            writer.write(fd, b"x" * CHUNK, CHUNK)
            writer.write(fd, b"x" * CHUNK, CHUNK)  # the thread's error, if the first was handed over
            writer.finish()
    finally:
        os.close(fd)
