"""
The server's side of a job's supervisor (L{jobworker.host.isolate}'s
C{Supervisor}): its start, its socket, and what it kept while no server ran.

Who holds what
==============

An isolated job's helper is its supervisor (the PID 1 of the job's PID
namespace) for as long as the job runs, and it, not the server, holds the read ends of the job's stdout
and stderr pipes.  It relays each chunk it reads, with the chunk's offset,
over a unix stream socket, and keeps the chunk until the server
acknowledges (L{contract.ACK}) that its spool has written it; so a server
that dies, even by SIGKILL, loses nothing that the supervisor read.  While
no server is connected the supervisor appends what it reads to the job's
backlog file (C{STATE/jobs/<id>.backlog}: the same data frames), so a job
never waits on a server that is not there, and when the job ends it writes
its end record (C{STATE/jobs/<id>.end}, JSON).  A server finds a running
job's supervisor by its listening socket, C{STATE/run/<id>.sock}; the
first server talks to it over a socketpair made at the start.

On connecting, the supervisor says hello (its format, pid, the status lines
so far, its output offset, the backlog's range); the server reads the
backlog into the job's output log (skipping what its spool already holds,
by offset) and from then on takes the chunks as they come.  Its
acknowledgements free the supervisor's memory and, once past the backlog's
end, empty the backlog file.

The server writes the spool exactly as for any job (L{jobworker.output}),
and followers are served from its ring and spool as before.

Twisted glue; the reactor is passed in.
"""

from __future__ import annotations

import array
import json
import os
import socket
import sys
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer, protocol
from twisted.python.failure import Failure

from jobworker.host import contract
from jobworker.jobs.pipes import output_pipe
from jobworker.logs import Logger

__all__ = [
    "ACK_DELAY_S",
    "BacklogReader",
    "SupervisorEvents",
    "SupervisorLink",
    "SupervisorPaths",
    "Zygote",
    "read_end_record",
    "spawn_supervised",
]

log = Logger()

# How soon output is acknowledged when no newer chunk comes to carry it:
# the supervisor holds what is not acknowledged (at most its window).
ACK_DELAY_S = 0.05
# How much of a backlog is read into the output log per turn of the
# reactor: followers and other clients go on meanwhile.
BACKLOG_STEP = 4 << 20
# The largest end record a supervisor writes is a few KiB.
MAX_END_RECORD = 1 << 16


class SupervisorPaths(Protocol):
    """
    Where a job's supervisor files live (L{jobworker.jobs.store.JobStore}).
    """

    def socket_path(self, job_id: uuid.UUID) -> str: ...

    def backlog_path(self, job_id: uuid.UUID) -> str: ...

    def end_path(self, job_id: uuid.UUID) -> str: ...


class SupervisorEvents(Protocol):
    """
    What a link tells its job (a L{jobworker.jobs.job.Job}).
    """

    def supervisor_hello(self, hello: dict[str, Any]) -> None: ...

    def supervisor_line(self, line: str) -> None: ...

    def supervisor_output(self, fd: int, offset: int, data: bytes) -> None: ...

    def supervisor_output_closed(self) -> None: ...

    def supervisor_gone(self, end: tuple[int, int] | None) -> None: ...


class _Process(protocol.ProcessProtocol):
    """
    The supervisor's process, for the server that spawned it: only reaped
    (the link tells the job everything).
    """


class _ZygoteProcess(protocol.ProcessProtocol):
    def __init__(self, zygote: Zygote) -> None:
        self.zygote = zygote
        self.done = False
        self._waiters: list[defer.Deferred[None]] = []

    def when_ended(self) -> defer.Deferred[None]:
        if self.done:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        # Only a broken zygote writes (a traceback): worth the log.
        log.warn("the zygote wrote: {data!r}", data=data[:2000])

    def processEnded(self, reason: Failure) -> None:
        self.done = True
        self.zygote.ended(self)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


class Zygote:
    """
    The server's zygote (L{jobworker.host.isolate.run_zygote}): one
    pre-started helper that forks the supervisor of each job, so that a job
    pays neither an interpreter's start-up (~13 ms) nor its memory.  It is
    started at the first job and again whenever it has died.
    """

    def __init__(self, reactor: Any, helper_path: str) -> None:
        self._reactor = reactor
        self._helper_path = helper_path
        self._socket: socket.socket | None = None
        self._process: _ZygoteProcess | None = None
        self.transport: Any = None

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = _ZygoteProcess(self)
        try:
            self.transport = self._reactor.spawnProcess(
                process,
                sys.executable,
                [sys.executable, "-I", "-S", self._helper_path, "--zygote"],
                env={},
                path="/",
                childFDs={0: "w", 1: "r", 2: "r", contract.STATUS_FD: theirs.fileno()},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._process = process
        self._socket = ours
        log.info("started the zygote that forks the jobs' supervisors (pid {pid})", pid=self.transport.pid)
        return ours

    def ended(self, process: _ZygoteProcess) -> None:
        if process is self._process:
            log.warn("the zygote ended; the next job starts a new one")
            self.close()

    def spawn(self, config: dict[str, object], fds: list[int]) -> None:
        """
        Fork a supervisor with C{config} and C{fds} (see
        L{contract.ZYGOTE_FDS}), which the caller still
        closes.

        @raise OSError: the zygote cannot be started or told.
        """
        body = json.dumps(config).encode()
        header = len(body).to_bytes(8, "big")
        for attempt in (1, 2):
            sock = self._socket or self._start()
            try:
                sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                sock.sendall(body)
                return
            except OSError:
                # A zygote that died since: a new one, once.
                self.close()
                if attempt == 2:
                    raise

    def close(self) -> defer.Deferred[None]:
        """
        Let the zygote go (it ends at the EOF of its socket).

        @return: fires once it has ended (and was reaped), at once if none
            runs.  The server's shutdown waits for it: a zygote that exits
            after the reactor has stopped signals a server whose SIGCHLD
            handler is gone, and Python writes a traceback to its log.
        """
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        process, self._process = self._process, None
        return process.when_ended() if process is not None else defer.succeed(None)


def spawn_supervised(
    reactor: Any,
    helper_path: str,
    config: dict[str, object],
    job_id: uuid.UUID,
    paths: SupervisorPaths,
    zygote: Zygote | None = None,
) -> tuple[Any, socket.socket]:
    """
    Start the supervised helper of one job: its process transport, and the
    server's end of its socketpair (to adopt as a L{SupervisorLink}).

    The server makes everything the supervisor needs (the pipes, the
    listening socket, the empty backlog and end files: the supervisor runs
    in the job's mount namespace, where the state directory is hidden) and
    keeps none of it.

    @raise OSError: something could not be made (nothing is left open or
        bound then).
    """
    opened: list[int] = []
    made: list[str] = []
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stdout_r, stdout_w = output_pipe()
        opened += [stdout_r, stdout_w]
        stderr_r, stderr_w = output_pipe()
        opened += [stderr_r, stderr_w]
        path = paths.socket_path(job_id)
        _unlink(path)
        listener.bind(path)
        made.append(path)
        listener.listen(4)
        files = []
        for name in (paths.backlog_path(job_id), paths.end_path(job_id)):
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            opened.append(fd)
            made.append(name)
            files.append(fd)
        child_fds = {
            1: stdout_w,
            2: stderr_w,
            contract.STATUS_FD: theirs.fileno(),
            contract.STDOUT_READ_FD: stdout_r,
            contract.STDERR_READ_FD: stderr_r,
            contract.LISTEN_FD: listener.fileno(),
            contract.BACKLOG_FD: files[0],
            contract.END_FD: files[1],
        }
        if zygote is not None:
            zygote.spawn(config, [child_fds[fd] for fd in contract.ZYGOTE_FDS])
            transport = None
        else:
            transport = reactor.spawnProcess(
                _Process(),
                sys.executable,
                [sys.executable, "-I", "-S", helper_path, "-"],
                env={},
                path="/",
                childFDs={0: "w", **child_fds},
            )
            transport.write(json.dumps(config).encode())
            transport.closeStdin()
    except BaseException:
        ours.close()
        for name in made:
            _unlink(name)
        raise
    finally:
        theirs.close()
        listener.close()
        for fd in opened:
            os.close(fd)
    return transport, ours


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class SupervisorLink(protocol.Protocol):
    """
    The server's end of one supervisor's socket.

    @ivar end: the job's end as the supervisor said it (the command's exit code
        and signal), once it has.
    @ivar hello: the supervisor's hello, once received.
    """

    def __init__(self, reactor: Any, events: SupervisorEvents, job_id: uuid.UUID, stored: Callable[[], int]) -> None:
        """
        @param stored: the output offset below which the server has stored
            everything it received (the spool has written it).
        """
        self._reactor = reactor
        self.events = events
        self.job_id = job_id
        self._stored = stored
        self._buffer = bytearray()
        self.hello: dict[str, Any] | None = None
        self.end: tuple[int, int] | None = None
        self.acked = 0
        self.received = 0  # the offset after the last chunk received
        self._ack_call: Any = None
        self.connected_to = False
        self._paused_by: set[str] = set()  # paused while not empty
        self._held: list[tuple[int, Any]] = []  # frames received while paused
        self._lost = False  # the connection is gone

    def _transport(self) -> Any:
        # A unix socket's transport (Twisted's unix.Client or Server); the
        # interfaces it provides are not all in ITransport's annotation.
        return self.transport

    def connectionMade(self) -> None:
        self.connected_to = True
        # Read the supervisor's 256 KiB chunks in few calls (Twisted's
        # default is 64 KiB).
        self._transport().bufferSize = 1 << 20

    def dataReceived(self, data: bytes) -> None:
        # The hot path of a job's output: each chunk is sliced once out of
        # what the socket gave (a frame split between two reads is joined
        # once), not copied through a buffer, and acknowledged once per read.
        header = contract.FRAME_HEADER
        pending = self._buffer
        if pending:
            if len(pending) < header:
                more = header - len(pending)
                pending += data[:more]
                data = data[more:]
                if len(pending) < header:
                    return
            length = int.from_bytes(pending[1:header], "big")
            if length > contract.MAX_FRAME:
                self._bad_frame(length)
                return
            more = header + length - len(pending)
            pending += data[:more]
            data = data[more:]
            if len(pending) < header + length:
                return
            self._buffer = bytearray()
            self._take(bytes(pending))
        if data:
            self._take(data)
        self.ack()

    def _bad_frame(self, length: int) -> None:
        log.error("job {job_id}: bad frame from its supervisor: {length} bytes", job_id=self.job_id, length=length)
        self._buffer = bytearray()
        self._transport().loseConnection()

    def _take(self, data: bytes) -> None:
        """
        Dispatch the whole frames in C{data}; keep a partial last one.
        """
        position = 0
        size = len(data)
        header = contract.FRAME_HEADER
        while size - position >= header:
            length = int.from_bytes(data[position + 1 : position + header], "big")
            if length > contract.MAX_FRAME:
                self._bad_frame(length)
                return
            end = position + header + length
            if end > size:
                break
            kind = data[position]
            item: Any
            if kind == contract.DATA:
                if length < 9 or data[position + header] not in (1, 2):
                    log.warn("job {job_id}: bad data frame from its supervisor", job_id=self.job_id)
                    position = end
                    continue
                start = position + header
                item = (data[start], int.from_bytes(data[start + 1 : start + 9], "big"), data[start + 9 : end])
            else:
                item = data[position + header : end]
            if self._paused_by or self._held:
                self._held.append((kind, item))
            else:
                self._frame(kind, item)
            position = end
        if position < size:
            self._buffer = bytearray(data[position:])

    def _frame(self, kind: int, payload: Any) -> None:
        if kind == contract.DATA:
            fd, offset, chunk = payload
            self.received = max(self.received, offset + len(chunk))
            self.events.supervisor_output(fd, offset, chunk)
        elif kind == contract.LINE:
            self.events.supervisor_line(payload.decode("ascii", "replace"))
        elif kind == contract.HELLO:
            try:
                hello = json.loads(payload)
            except ValueError:
                hello = None
            if not isinstance(hello, dict):
                log.error("job {job_id}: bad hello from its supervisor", job_id=self.job_id)
                self._transport().loseConnection()
                return
            self.hello = hello
            self.received = max(self.received, _int(hello.get("offset")))
            self.events.supervisor_hello(hello)
        elif kind == contract.CLOSED:
            self.events.supervisor_output_closed()
        elif kind == contract.END:
            words = payload.split()
            if len(words) == 2 and all(word.lstrip(b"-").isdigit() for word in words):
                self.end = (int(words[0]), int(words[1]))
            self.ack()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.connected_to = False
        self._lost = True
        if self._ack_call is not None and self._ack_call.active():
            self._ack_call.cancel()
        self._ack_call = None
        if not (self._paused_by or self._held):
            self.events.supervisor_gone(self.end)
        # else: told once the frames held meanwhile are taken (resume).

    # -- to the supervisor -------------------------------------------------------

    def ack(self) -> None:
        """
        Acknowledge what the server has stored; try again shortly while
        some of what it received is not stored yet.
        """
        if not self.connected_to:
            return
        stored = min(self._stored(), self.received)
        if stored > self.acked:
            self.acked = stored
            self._transport().write(contract.frame(contract.ACK, stored.to_bytes(8, "big")))
        if self.acked < self.received and (self._ack_call is None or not self._ack_call.active()):
            self._ack_call = self._reactor.callLater(ACK_DELAY_S, self.ack)

    def send_signal(self, signum: int) -> None:
        """
        Ask the supervisor to forward C{signum} to the job (SIGKILL: kill all of it).
        """
        if self.connected_to and 0 < signum < 256:
            self._transport().write(contract.frame(contract.SEND_SIGNAL, bytes((signum,))))

    def pause(self, reason: str = "spool") -> None:
        """
        Stop taking frames, for C{reason}: the spool is congested
        (C{"spool"}), or a backlog is being read first (C{"backlog"}).  The
        supervisor's window fills and it stops reading the job's pipes.
        Frames go on only once every reason is gone (L{resume}).
        """
        if not self._paused_by:
            if self.transport is not None and self.connected_to:
                self._transport().pauseProducing()
        self._paused_by.add(reason)

    def resume(self, reason: str = "spool") -> None:
        if reason not in self._paused_by:
            return
        self._paused_by.discard(reason)
        if self._paused_by:
            return
        held, self._held = self._held, []
        for index, (kind, payload) in enumerate(held):
            if self._paused_by:
                self._held = held[index:] + self._held
                return
            self._frame(kind, payload)
        self.ack()
        if self._lost:
            self.events.supervisor_gone(self.end)
        elif self.transport is not None:
            self._transport().resumeProducing()

    def leave(self) -> None:
        """
        Disconnect, leaving the job to its supervisor (and the next server).
        """
        if self.transport is not None and self.connected_to:
            self._transport().loseConnection()


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


class BacklogReader:
    """
    Reads a backlog file's data frames in steps of L{BACKLOG_STEP} bytes.
    A torn or damaged frame ends it (what follows is a gap, by offset).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.position = 0
        self.damage: str | None = None
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            self._fd = None
        except OSError as exc:
            self._fd = None
            self.damage = f"backlog {path} cannot be read: {exc.strerror or exc}"

    def step(self) -> list[tuple[int, int, bytes]] | None:
        """
        The next chunks, as (fd, offset, data); None at the end.
        """
        if self._fd is None:
            return None
        try:
            block = os.pread(self._fd, BACKLOG_STEP + contract.FRAME_HEADER + contract.MAX_FRAME, self.position)
        except OSError as exc:
            self.damage = f"backlog {self.path} cannot be read: {exc.strerror or exc}"
            block = b""
        try:
            frames, used = contract.split_frames(block)
        except ValueError as exc:
            frames, used = [], 0
            self.damage = f"backlog {self.path}: {exc} at byte {self.position}"
        chunks = []
        for kind, payload in frames:
            try:
                if kind != contract.DATA:
                    raise ValueError("not a data frame")
                chunks.append(contract.parse_data(payload))
            except ValueError as exc:
                self.damage = f"backlog {self.path}: {exc} at byte {self.position}"
                break
        self.position += used
        if not chunks:
            self.close()
            return None
        return chunks

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_end_record(path: str) -> dict[str, Any] | None:
    """
    A supervisor's end record, or None when there is none (or it is not
    one: a supervisor killed before it wrote it).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        content = os.read(fd, MAX_END_RECORD)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        record = json.loads(content)
    except ValueError:
        return None
    if not isinstance(record, dict) or not record.get("ended"):
        return None
    return record
