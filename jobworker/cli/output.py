"""
Where C{jobcli}'s output goes: the L{Console} (one server's lines,
prefixed with several) and the L{OutputWriter} that writes a job's stream
output without blocking the reader of the server.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import stat
import sys
import threading
from collections.abc import Iterable, Sequence
from typing import Any


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Console:
    """
    Where a command's output goes: straight to our stdout and stderr, or,
    with several servers, line by line with the server's name in front
    (C{lab: ...}, as C{pdsh} does), whole lines only, under one lock so the
    lines of two servers never mix.
    """

    def __init__(self, prefix: str | None = None, lock: threading.Lock | None = None) -> None:
        self.prefix = prefix.encode("utf-8", "replace") + b": " if prefix is not None else None
        self._lock = lock or threading.Lock()
        self._pending = {1: b"", 2: b""}

    def write(self, fd: int, data: bytes) -> None:
        if self.prefix is None:
            (sys.stdout if fd == 1 else sys.stderr).flush()
            _write_all(fd, data)
            return
        text = self._pending[fd] + data
        lines = text.split(b"\n")
        self._pending[fd] = lines.pop()
        if lines:
            self._emit(fd, lines)

    def _emit(self, fd: int, lines: list[bytes]) -> None:
        assert self.prefix is not None
        block = b"".join(self.prefix + line + b"\n" for line in lines)
        with self._lock:
            (sys.stdout if fd == 1 else sys.stderr).flush()
            _write_all(fd, block)

    def out(self, text: str) -> None:
        """
        A line (or lines) of our own on stdout.
        """
        self.write(1, (text + "\n").encode("utf-8", "surrogateescape"))

    def err(self, text: str) -> None:
        self.write(2, (text + "\n").encode("utf-8", "surrogateescape"))

    def flush(self) -> None:
        """
        The last line of each stream, even without its newline.
        """
        for fd in (1, 2):
            if self.prefix is not None and self._pending[fd]:
                rest, self._pending[fd] = self._pending[fd], b""
                self._emit(fd, [rest])


class JsonArray:
    """
    A JSON array written to a console element by element, as they come:
    in all the bytes of C{print(json.dumps(items, indent=2))} for the same
    items, the bytes C{jobcli --json} prints for a list it has whole.
    """

    def __init__(self, console: Console) -> None:
        self._console = console
        self._started = False
        self._count = 0

    def extend(self, items: Iterable[Any]) -> None:
        """
        Write C{items}, the next elements (none: the array is started, so
        L{close} writes an empty one).
        """
        self._started = True
        parts = []
        for item in items:
            # An element of an array indented by 2 is the element alone,
            # indented by 2 more: JSON texts hold no raw newline.
            parts.append(("[\n  " if not self._count else ",\n  ") + json.dumps(item, indent=2).replace("\n", "\n  "))
            self._count += 1
        if parts:
            self._console.write(1, "".join(parts).encode("utf-8"))

    def close(self) -> None:
        """
        End the array, if L{extend} began it (nothing is written otherwise:
        a list refused before its first page prints no JSON).
        """
        if self._started:
            self._console.write(1, b"\n]\n" if self._count else b"[]\n")


class OutputWriter:
    """
    Writes a stream's output to our stdout and stderr, in order, without
    ever letting a reader that stops reading hold up the main thread.

    A reader of our output that stops reading (C{jobcli logs -f ID | less},
    paused) would block a write for as long as it likes, while the main
    thread must go on reading the connection and answering the server's
    keep-alive pings, so the server does not take a slow reader for a dead
    one.  So the main thread writes only what the output takes at once
    (see L{_Sink}) and hands the rest, and everything after it, to a thread
    of its own, started the first time a write would block.  Once that
    thread has written everything it was given, the main thread writes
    directly again.

    Writing in the main thread matters for speed: handing every 64 KiB
    frame to a thread cost jobcli about as much CPU again as receiving it
    (GIL hand-overs, a wake-up per frame, and each frame kept alive in
    freshly allocated memory until written: 0.6 s per GiB, half the
    client's CPU).

    Credit: L{write} returns the bytes written at once, to be granted right
    away; what the thread writes is granted through L{take_written} when it
    wakes the main thread.  What waits in the queue is therefore at most
    the stream's window.
    """

    WAKE_BYTES = 1 << 20

    def __init__(self, fds: Sequence[int] = (1, 2)) -> None:
        """
        @param fds: the descriptors that L{write} is given (stdout and
            stderr; others in tests).
        """
        self._sinks = {fd: _Sink(fd) for fd in fds}
        self._queue: queue.SimpleQueue[tuple[int, bytes | memoryview, int] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._written = 0
        # Items handed to the thread and not yet written: while any are,
        # everything goes through the thread, so the order is kept.
        self._outstanding = 0
        self.error: BaseException | None = None
        # One byte per write done: wakes the main thread to grant credit.
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None

    @property
    def threaded(self) -> bool:
        """
        Whether a write has had to go to the thread (it is started then).
        """
        return self._thread is not None

    def write(self, fd: int, data: bytes, credit: int = 0) -> int:
        """
        Write C{data} to C{fd}, at once as far as it goes without blocking,
        the rest from the thread.

        @param credit: the stream bytes that C{data} stands for (0 for a
            note of ours).
        @return: how much of C{credit} was written now; the rest is
            reported by L{take_written} once the thread has written it.
        @raise OSError: a write failed (a broken pipe), now or in the
            thread before.
        """
        if self.error is not None:
            raise self.error
        with self._lock:
            direct = not self._outstanding
        done = 0
        if direct:
            done = self._sinks[fd].write_now(data)
            if done == len(data):
                return credit
        rest = memoryview(data)[done:] if done else data
        # Never more credit than the data stands for (logs -t writes more
        # bytes than the stream's: the time in front of each line).
        later = min(len(rest), credit)
        self._hand_over(fd, rest, later)
        return credit - later

    def _hand_over(self, fd: int, data: bytes | memoryview, credit: int) -> None:
        with self._lock:
            self._outstanding += 1
        self._queue.put((fd, data, credit))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jobcli-output", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fd, data, credit = item
            try:
                _write_all(fd, data)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc
                self._wake()
                return
            with self._lock:
                self._outstanding -= 1
                self._written += credit
                unsignalled = self._written
                idle = not self._outstanding
            # Credit goes back in batches of half the window anyway:
            # wake the main thread per MiB written, or when idle.
            if credit and (unsignalled >= self.WAKE_BYTES or idle):
                self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the main thread has wake-ups enough to read

    def take_written(self) -> int:
        """
        Bytes the thread wrote since the last call (main thread).

        @raise BaseException: what a write raised (a broken pipe).
        """
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass
        if self.error is not None:
            raise self.error
        with self._lock:
            written, self._written = self._written, 0
        return written

    def finish(self) -> None:
        """
        Wait until everything handed over is written; raise what a write
        raised.
        """
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        for sink in self._sinks.values():
            sink.close()
        os.close(self.wake_fd)
        os.close(self._wake_w)
        if self.error is not None:
            raise self.error


class _Sink:
    """
    One of our output descriptors, written without blocking where the kind
    of file allows it, without changing the descriptor's own flags.

    C{O_NONBLOCK} on our stdout itself would be wrong: the flag belongs to
    the open file description, which we share with the shell and the other
    processes writing there, and would stay set if we died.  Instead:

      - a pipe, FIFO or terminal is opened again (C{/proc/self/fd/N}), a
        description of our own to set C{O_NONBLOCK} on;
      - a stream socket is written with C{MSG_DONTWAIT};
      - a regular file, a block device or C{/dev/null} is written directly:
        no reader can hold those up;
      - anything else (or a reopening that fails: no C{/proc}, no
        permission, a FIFO without a reader) takes nothing at once, so all
        of it goes through the output thread, as before.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._reopened: int | None = None
        self._socket: socket.socket | None = None
        self._direct = False
        try:
            mode = os.fstat(fd)
        except OSError:
            return  # closed: the thread's write reports it
        kind = mode.st_mode
        if stat.S_ISREG(kind) or stat.S_ISBLK(kind) or (stat.S_ISCHR(kind) and _is_dev_null(mode)):
            self._direct = True
        elif stat.S_ISFIFO(kind) or (stat.S_ISCHR(kind) and os.isatty(fd)):
            try:
                self._reopened = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError:
                pass
        elif stat.S_ISSOCK(kind):
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                return
            if sock.type == socket.SOCK_STREAM:
                self._socket = sock
            else:
                sock.close()

    def write_now(self, data: bytes | memoryview) -> int:
        """
        Write what goes without waiting; how many bytes that was (0 when
        the output is full, or cannot be written without blocking).

        @raise OSError: the write failed (a broken pipe).
        """
        try:
            if self._direct:
                _write_all(self.fd, data)
                return len(data)
            if self._reopened is not None:
                return os.write(self._reopened, data)
            if self._socket is not None:
                return self._socket.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        return 0

    def close(self) -> None:
        if self._reopened is not None:
            os.close(self._reopened)
            self._reopened = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _is_dev_null(mode: os.stat_result) -> bool:
    """
    Whether C{mode} (a character device's) is that of C{/dev/null}.
    """
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(null.st_mode) and mode.st_rdev == null.st_rdev
