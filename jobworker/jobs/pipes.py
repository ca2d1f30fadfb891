"""
A job's output pipes: read in large chunks into its L{OutputLog}, with
back-pressure from its spool.

Twisted glue (reactor readers); the reactor is passed in.
"""

from __future__ import annotations

import fcntl
import functools
import os
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import error as twisted_error
from twisted.internet.interfaces import IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker.logs import Logger
from jobworker.output.log import OutputLog
from jobworker.output.spool import FileSpool, SpoolFailure

__all__ = ["PIPE_SIZE", "READ_SIZE", "READS_PER_TURN", "SPOOL_RETRY_S", "OutputPump", "PipeReader", "output_pipe"]

log = Logger()

# A job's stdout/stderr pipes are widened to this (the kernel's default
# ceiling for unprivileged pipes), so a job is not held up while the server
# is busy, and read 256 KiB at a time: 32 times fewer calls than Twisted's
# own 8 KiB reads, and each read is one record of the output log, so the
# per-record work in Python is paid once per 256 KiB.  (glibc raises its
# mmap threshold after the first such buffer is freed, so later ones come
# from the heap: about 5,000 page faults per GiB, measured.)
PIPE_SIZE = 1 << 20
READ_SIZE = 256 << 10
READS_PER_TURN = 4

# While the state directory is full: how often a job's spool tries to write
# again.  A try costs one small write (a 9-byte gap record).
SPOOL_RETRY_S = 1.0


@implementer(IReadDescriptor)
class PipeReader:
    """
    Reads one of a job's output pipes in large chunks.

    Twisted's own process readers read 8 KiB per call; at hundreds of MB/s
    that is a hundred thousand reactor turns per GiB.  This reader takes up
    to L{READ_SIZE} per call from a pipe widened to L{PIPE_SIZE}.
    """

    def __init__(self, reactor: Any, fd: int, received: Callable[[bytes], None], ended: Callable[[], None]) -> None:
        self._reactor = reactor
        self._fd = fd
        self._received = received
        self._ended = ended
        self.closed = False

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "job-output"

    def doRead(self) -> Any:
        # Up to READS_PER_TURN reads per turn of the reactor: a busy job is
        # drained quickly without starving the other connections.
        for _ in range(READS_PER_TURN):
            try:
                data = os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                return None
            except OSError as exc:
                return twisted_error.ConnectionLost(str(exc))
            if not data:
                return twisted_error.ConnectionDone()
            self._received(data)
            if self.closed or len(data) < READ_SIZE:
                return None
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._reactor.removeReader(self)
        os.close(self._fd)
        self._ended()


def output_pipe() -> tuple[int, int]:
    """
    A pipe for one of a job's outputs: (read end, non-blocking and
    close-on-exec; write end, for the helper), widened to L{PIPE_SIZE}.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(read_end, False)
    try:
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # a smaller pipe only costs speed
    return read_end, write_end


class OutputPump:
    """
    Carries a job's stdout and stderr from their pipes into its output log.

    While the spool is behind on the disk (congested) the pipes are not
    read, so the job waits on them rather than grow the server's memory;
    while it cannot write at all (a full disk) the output log keeps the
    newest output in its ring and the write is retried every
    L{SPOOL_RETRY_S} seconds.

    @ivar open_count: pipes not yet at EOF (or closed).
    """

    def __init__(
        self, reactor: Any, job_id: uuid.UUID, output: OutputLog, spool: FileSpool | None, on_closed: Callable[[], None]
    ) -> None:
        self._reactor = reactor
        self._job_id = job_id
        self._output = output
        self._spool = spool
        self._on_closed = on_closed
        self._readers: list[PipeReader] = []
        # A supervised job's output comes from its supervisor instead (see
        # attach_relay): how to stop and resume it.
        self._relay: tuple[Callable[[], None], Callable[[], None]] | None = None
        self._reading = False
        self._losing_output = False  # the spool failed and has not recovered
        self._retry: Any = None
        self.open_count = 0
        output.on_damage = self._output_damaged

    def attach(self, read_ends: dict[int, int]) -> None:
        """
        Start reading C{read_ends} (output fd 1 or 2 -> our read end), which
        this pump then owns and closes.
        """
        for fd, read_end in read_ends.items():
            self._readers.append(PipeReader(self._reactor, read_end, functools.partial(self.received, fd), self._pipe_closed))
        self.open_count = len(self._readers)
        self._reading = True
        self._watch_spool()
        for reader in self._readers:
            self._reactor.addReader(reader)

    def attach_relay(self, pause: Callable[[], None], resume: Callable[[], None]) -> None:
        """
        The output comes from the job's supervisor (L{received} for each
        chunk, L{relay_closed} at its end), not from pipes of ours: while
        the spool is congested, C{pause} stops it and C{resume} starts it
        again.
        """
        self._relay = (pause, resume)
        self.open_count = 1
        self._reading = True
        self._watch_spool()

    def _watch_spool(self) -> None:
        if self._spool is not None:
            reactor = self._reactor
            self._spool.on_drained = lambda: reactor.callFromThread(self.resume)
            self._spool.on_failed = lambda failure: reactor.callFromThread(self.spool_failed, failure)
            self._spool.on_recovered = lambda: reactor.callFromThread(self.spool_recovered)

    def relay_closed(self) -> None:
        """
        The supervisor said the job's output ended (or is gone).
        """
        if self._relay is not None and self.open_count:
            self.open_count = 0
            self._on_closed()

    def received(self, fd: int, data: bytes) -> None:
        self._output.append(fd, data)
        if self._spool is not None and self._spool.congested and self._reading:
            # The disk is behind by HIGH_WATER bytes: let the job wait on its
            # pipe rather than let the backlog grow our memory.
            self._reading = False
            if self._relay is not None:
                self._relay[0]()
            for reader in self._readers:
                if not reader.closed:
                    self._reactor.removeReader(reader)

    def resume(self) -> None:
        if self._reading:
            return
        self._reading = True
        if self._relay is not None:
            self._relay[1]()
        for reader in self._readers:
            if not reader.closed:
                self._reactor.addReader(reader)

    def close_all(self) -> None:
        """
        Close every pipe now, at EOF or not (a process that escaped the job
        could hold them open).
        """
        for reader in list(self._readers):
            reader.close()
        self.relay_closed()

    def cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _pipe_closed(self) -> None:
        self.open_count -= 1
        self._on_closed()

    def spool_failed(self, failure: SpoolFailure) -> None:
        """
        The spool could not write (a full disk): the output log keeps the
        newest output in its ring, and what falls out of it before the disk
        has room again becomes a gap.  Logged once per episode; retried every
        L{SPOOL_RETRY_S} seconds while the job runs.
        """
        if not self._losing_output:
            self._losing_output = True
            log.error(
                "job {job_id}: cannot write its output to {path}: {error}; output from byte {offset} on "
                "is kept in memory only (the last {ring} bytes) until there is room again, and what is "
                "dropped meanwhile is recorded as a gap",
                job_id=self._job_id,
                path=getattr(self._spool, "path", "?"),
                error=failure.error.strerror or failure.error,
                offset=failure.mark if failure.mark is not None else self._output.end,
                ring=self._output.ring_size,
            )
        if not self._output.closed and self._retry is None:
            self._retry = self._reactor.callLater(SPOOL_RETRY_S, self._retry_spool)

    def _retry_spool(self) -> None:
        self._retry = None
        if not self._output.closed:
            self._output.retry_spool()

    def spool_recovered(self) -> None:
        if self._losing_output:
            self._losing_output = False
            log.info(
                "job {job_id}: writing its output to {path} again; {lost} bytes could not be stored "
                "and are recorded as a gap",
                job_id=self._job_id,
                path=getattr(self._spool, "path", "?"),
                lost=self._output.lost_bytes,
            )

    def _output_damaged(self, what: str) -> None:
        log.error("job {job_id}: {damage}; readers get a gap there", job_id=self._job_id, damage=what)
