"""
The blocking client's connection: the sans-IO L{Connection} over a socket
and L{TLSChannel}, frames read into one reused buffer, keep-alive, and the
requests and follows on it (L{BlockingConnection}).
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Self

from jobworker.blocking.channel import TLSChannel
from jobworker.blocking.tls import tls_failure_cause
from jobworker.clientside.address import UnixAddress
from jobworker.clientside.jobref import JobRef, as_job_id
from jobworker.clientside.since import since_microseconds
from jobworker.errors import ErrorCode, JobworkerError, ProtocolError, RequestError
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection, Role
from jobworker.protocol.flow import DEFAULT_WINDOW
from jobworker.protocol.keepalive import DEFAULT_KEEPALIVE_INTERVAL, KeepAlive, Verdict
from jobworker.protocol.wire import HEADER_SIZE

__all__ = ["BlockingConnection", "ConnectionFailed"]


class ConnectionFailed(JobworkerError):
    """
    The server could not be reached, or the connection broke.
    """


class BlockingConnection:
    """
    One connection to a server, the frames on it, and the requests: each is
    answered in order of arrival (L{request}), and a follow's output is
    read as it comes (L{follow}).  L{BlockingClient} adds the operations.

    @param timeout: seconds for the connection's set-up (TCP, TLS, hello)
        and for each write; None for no limit.  Never for reads.
    @param keepalive_interval: seconds without a byte from the server before
        it is pinged; the client gives up when nothing comes back within as
        long again.  0 or None: no keep-alive (a vanished server is then
        noticed only by TCP).
    """

    def __init__(
        self,
        address: tuple[str, int] | UnixAddress,
        context: ssl.SSLContext,
        *,
        timeout: float | None = 30.0,
        keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
    ) -> None:
        self.address = address
        self.context = context
        self.timeout = timeout
        self.keepalive_interval = keepalive_interval or None
        self._keepalive: KeepAlive | None = None
        # A second file descriptor to wait on besides the socket, and what
        # to call when it is readable (see wake_on).
        self._wake_fd: int | None = None
        self._timeout_set: float | None | str = "unset"
        self._on_wake: Callable[[], None] | None = None
        self.conn = Connection(Role.CLIENT)
        self.hello: m.ServerHello | None = None
        self._sock: TLSChannel | None = None
        self._inbox: deque[m.Message] = deque()
        # Room for the largest frame we accept, so a frame always fits.
        self._receive_buffer = bytearray(HEADER_SIZE + self.conn.max_frame_size)
        self._receive_view = memoryview(self._receive_buffer)
        self._filled = 0
        self._need = HEADER_SIZE

    def connect(self) -> m.ServerHello:
        raw, host, port = self._open_socket()
        try:
            channel = TLSChannel(raw, self.context, host)
            channel.handshake()
            self._sock = channel
        except ssl.SSLError as exc:
            raw.close()
            raise ConnectionFailed(f"TLS handshake with {host}:{port} failed: {tls_failure_cause(exc, host)}") from None
        except OSError as exc:
            raw.close()
            raise ConnectionFailed(f"TLS handshake with {host}:{port} failed: {exc}") from None
        hello = self._next_message()
        if not isinstance(hello, m.ServerHello):
            raise ConnectionFailed(f"server sent {type(hello).__name__} instead of a hello")
        self.hello = hello
        self._write(self.conn.send(m.ClientHello(self.conn.version, self.conn.max_frame_size)))
        if self.keepalive_interval:
            self._keepalive = KeepAlive(self.keepalive_interval, time.monotonic())
        return hello

    def _open_socket(self) -> tuple[socket.socket, str, int | str]:
        """
        Connect the plain socket: TCP, or a UNIX socket for a L{UnixAddress}.

        @return: the socket, the name to check the server's certificate
            against, and a port (or C{"unix"}) for messages.
        """
        if isinstance(self.address, UnixAddress):
            raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            raw.settimeout(self.timeout)
            try:
                raw.connect(str(self.address))
            except OSError as exc:
                raw.close()
                raise ConnectionFailed(f"cannot connect to unix:{self.address}: {exc.strerror or exc}") from None
            return raw, self.address.tls_name, f"unix:{self.address}"
        host, port = self.address
        try:
            raw = socket.create_connection((host, port), timeout=self.timeout)
        except OSError as exc:
            raise ConnectionFailed(f"cannot connect to {host}:{port}: {exc.strerror or exc}") from None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return raw, host, port

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> Self:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- I/O -------------------------------------------------------------------

    def wake_on(self, fd: int | None, callback: Callable[[], None] | None = None) -> None:
        """
        While the client waits for the server, also wait for C{fd} to be
        readable and then call C{callback} (which must make C{fd}
        unreadable again, by reading it).  C{jobcli} uses it to grant
        credit as soon as its output thread has written what it was given.
        """
        self._wake_fd = fd
        self._on_wake = callback

    def _write(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            if hasattr(self._sock, "settimeout"):
                self._settimeout(self.timeout)
            self._sock.sendall(data)
        except TimeoutError:
            raise ConnectionFailed(f"timed out sending to the server (no progress for {self.timeout:g} s)") from None
        except OSError as exc:
            raise ConnectionFailed(f"connection to the server broke: {exc}") from None

    def _buffered(self) -> bool:
        buffered = getattr(self._sock, "buffered", None)
        return buffered is not None and buffered()

    def _settimeout(self, seconds: float | None) -> None:
        # Each change costs a system call or two (blocking mode on or off):
        # skipped when nothing changes, as in a stream of records.
        if seconds != self._timeout_set:
            self._sock.settimeout(seconds)  # type: ignore[union-attr]
            self._timeout_set = seconds

    def _wait_readable(self) -> None:
        """
        Wait until the socket has bytes (or the wake-up fd fires), pinging a
        quiet server and giving up on a dead one, as the keep-alive says;
        then set the socket's timeout for the read that follows.
        """
        assert self._sock is not None
        keepalive = self._keepalive
        if not hasattr(self._sock, "settimeout") or not self.conn.is_open:
            return  # a scripted socket, or still setting up (under timeout)
        wait: float | None = None
        while True:
            if keepalive is None:
                wait = None
            else:
                now = time.monotonic()
                verdict = keepalive.check(now)
                if verdict is Verdict.DEAD:
                    try:
                        self._sock.sendall(
                            self.conn.goaway(ProtocolError("keep-alive timeout", ErrorCode.TIMEOUT))
                        )
                    except OSError:
                        pass
                    raise ConnectionFailed(
                        f"the server did not answer a keep-alive ping within {keepalive.interval:g} s; "
                        "it is gone or unreachable"
                    )
                if verdict is Verdict.PING:
                    self._write(self.conn.send(m.Ping(keepalive.ping_data())))
                wait = max(0.0, keepalive.deadline() - time.monotonic())
            if self._buffered():
                break
            readers: list[int] = [self._sock.fileno()]
            if self._wake_fd is not None:
                readers.append(self._wake_fd)
            try:
                ready, _, _ = select.select(readers, [], [], wait)
            except InterruptedError:
                continue
            if self._wake_fd is not None and self._wake_fd in ready and self._on_wake is not None:
                self._on_wake()
            if self._sock.fileno() in ready:
                break
        # The read may need more than the bytes that are here (the rest of
        # a TLS record): it waits at most one keep-alive interval (a fixed
        # value, so the socket's mode is set once, not per read), and a
        # timeout brings us back here for the keep-alive's verdict.
        self._settimeout(None if keepalive is None else keepalive.interval)

    def _next_message(self) -> m.Message:
        while not self._inbox:
            self._receive_frames()
        message = self._inbox.popleft()
        if isinstance(message, m.GoAway):
            raise ConnectionFailed(f"the server closed the connection: {message.message}")
        return message

    def _receive_frames(self) -> None:
        """
        Read until the buffer holds at least one whole frame, then decode
        the whole frames and keep the rest for the next read.

        TLS hands over one record (16 KiB at most) per read, so a 64 KiB
        Output frame takes several; decoding only whole frames, straight
        from this buffer, costs one copy of the data and one pass through
        the protocol core per frame instead of per record.
        """
        assert self._sock is not None
        view = self._receive_view
        filled = self._filled
        need = self._need  # no whole frame can be here before this many bytes
        while True:
            if filled >= need:
                boundary, need = self._whole_frames(filled)
                if boundary:
                    break
            if not self._buffered():
                self._wait_readable()
            try:
                size = self._sock.recv_into(view[filled:])
            except ssl.SSLError as exc:
                raise ConnectionFailed(f"the server refused the connection: {tls_failure_cause(exc, self.address[0] if isinstance(self.address, tuple) else 'localhost')}") from None
            except TimeoutError:
                if self.conn.is_open and self._keepalive is not None:
                    continue  # the keep-alive decides, in _wait_readable
                raise ConnectionFailed("timed out waiting for the server") from None
            except OSError as exc:
                raise ConnectionFailed(f"connection to the server broke: {exc}") from None
            if not size:
                raise ConnectionFailed("the server closed the connection")
            if self._keepalive is not None:
                self._keepalive.received(time.monotonic())
            filled += size
        try:
            for message in self.conn.receive_data(view[:boundary]):
                if isinstance(message, m.Ping):
                    self._write(self.conn.send(m.Pong(message.data)))
                elif not isinstance(message, m.Pong):
                    self._inbox.append(message)
        except ProtocolError as exc:
            try:
                self._sock.sendall(self.conn.goaway(exc))
            except OSError:
                pass
            raise ConnectionFailed(f"the server broke the protocol: {exc.message}") from None
        rest = filled - boundary
        if rest:
            self._receive_buffer[:rest] = self._receive_buffer[boundary:filled]
        self._filled = rest
        self._need = need - boundary

    def _whole_frames(self, filled: int) -> tuple[int, int]:
        """
        Where the whole frames among the first C{filled} bytes end (all of
        them when a length is one the protocol core must refuse), and how
        many bytes the buffer must hold before the next frame is whole.
        """
        buffer = self._receive_buffer
        position = 0
        while filled - position >= HEADER_SIZE:
            length = int.from_bytes(buffer[position : position + HEADER_SIZE], "big")
            if not 0 < length <= self.conn.max_frame_size:
                return filled, filled  # let the connection raise its ProtocolError
            end = position + HEADER_SIZE + length
            if end > filled:
                return position, end
            position = end
        return position, position + HEADER_SIZE

    def _await_response(self, request_id: int) -> m.Message:
        while True:
            message = self._next_message()
            if getattr(message, "request_id", None) == request_id:
                if isinstance(message, m.ErrorResponse):
                    try:
                        code = ErrorCode(message.code)
                    except ValueError:
                        code = ErrorCode.INTERNAL
                    raise RequestError(message.message, code)
                return message

    def request(self, message: m.Message) -> m.Message:
        """
        Send one request and return its response.

        @raise RequestError: the server answered with an error.
        @raise ConnectionFailed: the connection broke.
        """
        self._write(self.conn.send(message))
        return self._await_response(message.request_id)  # type: ignore[attr-defined]

    def follow(
        self,
        job_id: JobRef,
        *,
        offset: int = 0,
        follow: bool = True,
        window: int = DEFAULT_WINDOW,
        auto_credit: bool = True,
        timestamps: bool = False,
        since: float | None = None,
    ) -> Iterator[m.Output | m.Gap | m.EndOfStream | m.TimeMark]:
        """
        Stream a job's output from C{offset}: C{Output} and C{Gap} messages,
        then one C{EndOfStream}.  Credit is granted back as the caller
        consumes each message (when it asks for the next one), or, with
        C{auto_credit=False}, when the caller says so with L{grant}.

        @param timestamps: the stream carries C{TimeMark} messages too: the
            output from C{mark.offset} on was read by the server at
            C{mark.time} (microseconds since the epoch); each comes before
            the output it dates.  None come for output whose time the
            server does not know.
        @param since: seconds since the epoch: start at the first byte the
            server read at this time or later (or at C{offset}, if later).
        """
        stream_id = self.conn.next_stream_id()
        self.request(
            m.FollowRequest(
                self.conn.next_request_id(), as_job_id(job_id), stream_id, offset, window, follow,
                timestamps, since_microseconds(since),
            )
        )
        while True:
            message = self._next_message()
            if getattr(message, "stream_id", None) != stream_id:
                continue
            yield message  # type: ignore[misc]
            if isinstance(message, m.EndOfStream):
                return
            if isinstance(message, m.Output) and auto_credit:
                self.grant(stream_id, len(message.data))

    def grant(self, stream_id: int, size: int) -> None:
        """
        C{size} bytes of C{stream_id}'s output have been processed: give the
        server credit for them (in batches of half the window).  Needed
        only with C{follow(auto_credit=False)}.
        """
        update = self.conn.consumed(stream_id, size)
        if update:
            self._write(update)
