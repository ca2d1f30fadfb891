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

A write that fails (a full disk: ENOSPC, EDQUOT; or EIO) does not keep the
bytes in memory: a full disk can last for hours, and every job writing
meanwhile would hold its backlog.  The spool cuts the file back to the end
of the last whole record, drops the failed record and everything queued
after it, and reports the L{failure}: the file position it stopped at and
the caller's C{mark} (the data offset) of the first record it lost.  It
accepts and drops appends until its owner calls L{resume}; the owner (the
output log) then knows exactly which bytes the file lacks and records them
as a gap (see L{jobworker.output.log}).

Records are written at the position the spool expects (C{pwritev}), not
appended, so that a file truncated behind the server's back keeps the
records written after it where the readers look for them (the hole reads as
zeros, which the output log detects as damage).
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

__all__ = ["FileSpool", "MemorySpool", "Spool", "SpoolFailure", "HIGH_WATER", "LOW_WATER"]

# O_NONBLOCK: a FIFO put in a spool's place behind the server's back must
# not block the reactor in open() until someone writes to it (pread on it
# then fails with ESPIPE, which the output log reports as damage); for a
# regular file the flag changes nothing.
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC

HIGH_WATER = 32 << 20
LOW_WATER = 8 << 20


class Spool(Protocol):
    """
    What an output log writes its records (or its time marks) to and reads
    them back from: L{FileSpool} on disk, L{MemorySpool} in memory.
    """

    def append(self, *pieces: bytes, mark: int | None = None) -> None: ...

    def pread(self, position: int, size: int) -> bytes: ...

    @property
    def size(self) -> int: ...


class MemorySpool:
    """
    A spool held in memory, for tests and for jobs without a state directory.
    """

    def __init__(self, content: bytes = b"") -> None:
        self._data = bytearray(content)

    def append(self, *pieces: bytes, mark: int | None = None) -> None:
        for piece in pieces:
            self._data += piece

    def pread(self, position: int, size: int) -> bytes:
        return bytes(self._data[position : position + size])

    @property
    def size(self) -> int:
        return len(self._data)


class SpoolFailure(NamedTuple):
    """
    Where a spool stopped writing: C{position} is the file size it was cut
    back to, C{mark} the mark of the first record that was not written, and
    C{error} why.
    """

    position: int
    mark: int | None
    error: OSError


def _after(pieces: Sequence[bytes | memoryview], skip: int) -> Sequence[bytes | memoryview]:
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
        self._queue: queue.SimpleQueue[tuple[FileSpool, int, int]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="jobworker-spool-writer", daemon=True)
        self._thread.start()

    @classmethod
    def get(cls) -> _Writer:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def submit(self, spool: FileSpool, pieces: int, generation: int) -> None:
        """
        Write the spool's next C{pieces} queued pieces; 0 closes it.
        """
        self._queue.put((spool, pieces, generation))

    def _run(self) -> None:
        while True:
            spool, pieces, generation = self._queue.get()
            spool._write_now(pieces, generation)


class FileSpool:
    """
    An append-only file that an L{jobworker.output.log.OutputLog} writes its
    records to.

    @ivar on_drained: called (from the writer thread) when a congested
        spool's backlog falls below L{LOW_WATER}; the owner hops back to its
        own thread.
    @ivar on_failed: called (from the writer thread) with the
        L{SpoolFailure} when a write fails.
    @ivar on_recovered: called (from the writer thread) when the first
        record after L{resume} is written.
    """

    def __init__(self, path: str, *, create: bool = True, lazy: bool = False) -> None:
        """
        @param create: open C{path} for writing (made if missing), else only
            for reading.
        @param lazy: C{path} is a new file, which the writer thread creates
            before it writes to it (or closes it): creating a file has
            measured up to 0.9 ms on these machines' ext4, and a start made
            two on the reactor thread.  A failure to create it is a failed
            write (see L{failure}), retried with the next append after
            L{resume}.
        """
        self.path = path
        self.on_drained: Callable[[], None] | None = None
        self.on_failed: Callable[[SpoolFailure], None] | None = None
        self.on_recovered: Callable[[], None] | None = None
        self._fd: int | None = None
        self._read_fd: int | None = None
        self._lock = threading.Lock()
        self._pending: deque[bytes | memoryview] = deque()
        self._marks: deque[int | None] = deque()  # one per queued append
        self._pending_bytes = 0
        # Bumped by every failure: work queued before it is stale.
        self._generation = 0
        self._failure: SpoolFailure | None = None
        self._recovering = False
        self._sealed = not create
        self._congested_seen = False
        # Set once a spool written to is closed (see flush); None for one
        # opened only to be read, which has nothing to wait for: a server
        # reopens two spools per finished job at start-up, and an Event
        # each (a Condition, a lock) cost 10,000 jobs ~0.1 s.
        self._done: threading.Event | None = None
        self._lazy = lazy and create
        self._removed = False
        if self._lazy:
            self._done = threading.Event()
            self._written = 0
        elif create:
            self._done = threading.Event()
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._written = os.fstat(self._fd).st_size
        else:
            self._written = os.stat(path).st_size
        self._size = self._written

    @property
    def failure(self) -> SpoolFailure | None:
        """
        Set when a write failed, until L{resume}; appends are dropped
        meanwhile.
        """
        return self._failure

    @property
    def error(self) -> OSError | None:
        failure = self._failure
        return failure.error if failure is not None else None

    def resume(self) -> None:
        """
        Accept appends again after a L{failure}; they go at
        C{failure.position}.  The first one written calls C{on_recovered};
        if it fails too, the spool fails again.
        """
        with self._lock:
            if self._failure is None:
                return
            self._failure = None
            self._recovering = True

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
    def first_unwritten(self) -> int | None:
        """
        The mark of the first record appended and not yet written (None:
        every record is written).
        """
        with self._lock:
            return self._marks[0] if self._marks else None

    @property
    def congested(self) -> bool:
        return self._pending_bytes > HIGH_WATER

    def append(self, *pieces: bytes, mark: int | None = None) -> None:
        """
        Queue C{pieces} (a record's header and its data, say), to be written
        in order with one C{writev}, so they are never joined in memory.
        One append is one record: a failed write loses it whole.

        @param mark: the caller's name for this record (the output log
            passes its data offset), reported in L{failure} if it is the
            first record lost.
        """
        if self._sealed:
            raise ValueError(f"spool {self.path} is sealed")
        size = sum(map(len, pieces))
        with self._lock:
            if self._failure is not None:
                return  # dropped: the owner learns of it from the failure
            self._pending.extend(pieces)
            self._marks.append(mark)
            self._pending_bytes += size
            self._size += size
            if self._pending_bytes > HIGH_WATER:
                self._congested_seen = True
            generation = self._generation
        _Writer.get().submit(self, len(pieces), generation)

    def _write_now(self, count: int, generation: int) -> None:
        """
        Writer thread: write the next C{count} queued pieces, or close on 0.
        """
        if not count:
            if self._fd is None and self._lazy:
                try:
                    self._create()
                except OSError:
                    pass  # nothing was written to it: a reader finds no file
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            assert self._done is not None, "only a spool written to is closed by the writer"
            self._done.set()
            return
        with self._lock:
            if generation != self._generation:
                return  # queued before a failure, which dropped it
            pieces = [self._pending[index] for index in range(count)]
            start = self._written
        size = sum(map(len, pieces))
        try:
            fd = self._fd
            if fd is None and self._lazy:
                fd = self._create()
            if fd is None:
                return  # removed before it was ever created
            written = 0
            while written < size:
                written += os.pwritev(fd, _after(pieces, written), start + written)
        except OSError as exc:
            self._fail(exc, start)
            return
        with self._lock:
            for _ in range(count):
                self._pending.popleft()
            self._marks.popleft()
            self._pending_bytes -= size
            self._written += size
            self._size = max(self._size, self._written)
            drained = self._congested_seen and self._pending_bytes < LOW_WATER
            if drained:
                self._congested_seen = False
            recovered, self._recovering = self._recovering, False
        if drained:
            callback = self.on_drained
            if callback is not None:
                callback()
        if recovered:
            callback = self.on_recovered
            if callback is not None:
                callback()

    def _create(self) -> int | None:
        """
        Writer thread: create a lazy spool's file; None if it was removed
        meanwhile (then no file is left behind).
        """
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with self._lock:
            removed = self._removed
            if not removed:
                self._fd = fd
        if removed:
            os.close(fd)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return None
        return fd

    def _fail(self, error: OSError, position: int) -> None:
        """
        Writer thread: a write at C{position} failed.  Cut the file back to
        it (a partly written record would read as damage), drop what is
        queued, and report.
        """
        if self._fd is not None:  # else a lazy file that could not be created
            try:
                os.ftruncate(self._fd, position)
            except OSError:
                pass  # the readers stop at the last whole record anyway
        with self._lock:
            mark = self._marks[0] if self._marks else None
            self._failure = SpoolFailure(position, mark, error)
            self._generation += 1
            self._pending.clear()
            self._marks.clear()
            self._pending_bytes = 0
            self._size = self._written
            drained, self._congested_seen = self._congested_seen, False
            self._recovering = False
            failure = self._failure
        failed = self.on_failed
        if failed is not None:
            failed(failure)
        if drained:
            callback = self.on_drained
            if callback is not None:
                callback()

    def pread(self, position: int, size: int) -> bytes:
        with self._lock:
            written = self._written
            pending = list(self._pending) if position + size > written else []
        pieces: list[bytes | memoryview] = []
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
                self._read_fd = os.open(self.path, _READ_FLAGS)
            return os.pread(self._read_fd, size, position)
        fd = os.open(self.path, _READ_FLAGS)
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
            _Writer.get().submit(self, 0, 0)

    def flush(self, timeout: float | None = None) -> bool:
        """
        Wait until a sealed spool is completely written (for tests and for
        shutdown).  Returns whether it is.
        """
        return self._done is None or self._done.wait(timeout)

    def remove(self) -> None:
        self.seal()
        with self._lock:
            self._removed = True  # a lazy file not made yet never is
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
