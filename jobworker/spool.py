"""
The on-disk spool of a job's output: one append-only file per job, written
by a background thread.

Why a thread: writing to the page cache costs from 0.2 ms to several ms per
MiB (more when the kernel throttles dirty pages), and on the reactor thread
that time would be taken from every follower of every job.  C{append} only
queues the bytes; one writer thread, shared by all spools, writes them in
order.  Bytes queued and not yet written are still readable (C{pread} serves
them from the queue), so a reader never sees a hole.

Memory is bounded by the backlog: past L{HIGH_WATER} queued bytes the spool
reports itself L{congested}, and its owner stops reading the job's pipe (the
job then waits on a full pipe, as it would on a slow disk) until the writer
calls C{on_drained} below L{LOW_WATER}.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from typing import Callable

__all__ = ["FileSpool", "HIGH_WATER", "LOW_WATER"]

HIGH_WATER = 32 << 20
LOW_WATER = 8 << 20


def _after(pieces: list[bytes | memoryview], skip: int) -> list[bytes | memoryview]:
    """
    C{pieces} without their first C{skip} bytes (after a short write).
    """
    if not skip:
        return pieces
    for index, piece in enumerate(pieces):
        if skip < len(piece):
            return [memoryview(piece)[skip:], *pieces[index + 1 :]]
        skip -= len(piece)
    return []


class _Writer:
    """
    The one thread that writes every spool's queued bytes, in order.
    """

    _instance: _Writer | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[FileSpool, int]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="jobworker-spool-writer", daemon=True)
        self._thread.start()

    @classmethod
    def get(cls) -> _Writer:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def submit(self, spool: FileSpool, pieces: int) -> None:
        """
        Write the spool's next C{pieces} queued pieces; 0 closes it.
        """
        self._queue.put((spool, pieces))

    def _run(self) -> None:
        while True:
            spool, pieces = self._queue.get()
            spool._write_now(pieces)


class FileSpool:
    """
    An append-only file that an L{jobworker.outputlog.OutputLog} writes its
    records to.

    @ivar on_drained: called (from the writer thread) when a congested
        spool's backlog falls below L{LOW_WATER}; the owner hops back to its
        own thread.
    """

    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = path
        self.on_drained: Callable[[], None] | None = None
        self._fd: int | None = None
        self._read_fd: int | None = None
        self._lock = threading.Lock()
        self._pending: deque[bytes | memoryview] = deque()
        self._pending_bytes = 0
        self._sealed = not create
        self._congested_seen = False
        self._done = threading.Event()
        if create:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            self._written = os.fstat(self._fd).st_size
        else:
            self._written = os.stat(path).st_size
            self._done.set()
        self._size = self._written
        self.error: OSError | None = None

    @property
    def size(self) -> int:
        """
        Bytes appended so far, written or still queued.
        """
        return self._size

    @property
    def backlog(self) -> int:
        return self._pending_bytes

    @property
    def congested(self) -> bool:
        return self._pending_bytes > HIGH_WATER

    def append(self, *pieces: bytes) -> None:
        """
        Queue C{pieces} (a record's header and its data, say), to be written
        in order with one C{writev}, so they are never joined in memory.
        """
        if self._sealed:
            raise ValueError(f"spool {self.path} is sealed")
        size = sum(map(len, pieces))
        with self._lock:
            self._pending.extend(pieces)
            self._pending_bytes += size
            self._size += size
            if self._pending_bytes > HIGH_WATER:
                self._congested_seen = True
        _Writer.get().submit(self, len(pieces))

    def _write_now(self, count: int) -> None:
        """
        Writer thread: write the next C{count} queued pieces, or close on 0.
        """
        if not count:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._done.set()
            return
        if self.error is not None:
            return  # an earlier write failed: everything from it stays queued
        with self._lock:
            pieces = [self._pending[index] for index in range(count)]
        size = sum(map(len, pieces))
        try:
            written = 0
            while written < size:
                written += os.writev(self._fd, _after(pieces, written))
        except OSError as exc:
            # A full disk must not lose the bytes for readers: this piece
            # and every later one stay queued in memory (pread serves them),
            # the backlog makes the owner stop reading the job, and the
            # owner sees the error.
            self.error = exc
            return
        with self._lock:
            for _ in range(count):
                self._pending.popleft()
            self._pending_bytes -= size
            self._written += size
            drained = self._congested_seen and self._pending_bytes < LOW_WATER
            if drained:
                self._congested_seen = False
        if drained:
            callback = self.on_drained
            if callback is not None:
                callback()

    def pread(self, position: int, size: int) -> bytes:
        with self._lock:
            written = self._written
            pending = list(self._pending) if position + size > written else []
        pieces = []
        if position < written:
            pieces.append(self._pread_file(position, min(size, written - position)))
        got = sum(map(len, pieces))
        cursor = written
        for data in pending:
            if got >= size:
                break
            end = cursor + len(data)
            want_from = position + got
            if end > want_from:
                start = want_from - cursor
                piece = data[start : start + size - got]
                pieces.append(piece)
                got += len(piece)
            cursor = end
        return b"".join(pieces)

    def _pread_file(self, position: int, size: int) -> bytes:
        # While the job runs its followers read often: keep one descriptor.
        # A sealed spool opens per read, so finished jobs hold none.
        if not self._sealed:
            if self._read_fd is None:
                self._read_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            return os.pread(self._read_fd, size, position)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, size, position)
        finally:
            os.close(fd)

    def seal(self) -> None:
        """
        No more appends; the file is closed once the queue is written.
        """
        if not self._sealed:
            self._sealed = True
            if self._read_fd is not None:
                os.close(self._read_fd)
                self._read_fd = None
            _Writer.get().submit(self, 0)

    def flush(self, timeout: float | None = None) -> bool:
        """
        Wait until a sealed spool is completely written (for tests and for
        shutdown).  Returns whether it is.
        """
        return self._done.wait(timeout)

    def remove(self) -> None:
        self.seal()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
