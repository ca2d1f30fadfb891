"""
A blocking client: the sans-IO L{Connection} over a plain socket and the
standard library's C{ssl} (through memory BIOs, see L{_TLSChannel}).

This is what C{jobcli} uses: it needs no reactor, so a one-shot command
(C{jobcli status}) starts in a few tens of milliseconds.  Programs built on
Twisted use L{jobworker.client} instead; both speak through the same
protocol core.

Time limits: C{timeout} bounds the connection's set-up (TCP, TLS and the
hello) and each write.  Reads have no time limit: a wait or a follow lasts
as long as its job, hours if need be.  A server that vanished is noticed by
keep-alive instead (L{jobworker.protocol.keepalive}): after
C{keepalive_interval} seconds without a byte from the server the client
pings it, and gives up (L{ConnectionFailed}) when the ping goes unanswered
for as long again.  Pings from the server are answered whenever the client
reads.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
import uuid
from collections import deque
from typing import Callable, Iterable, Iterator

from jobworker.errors import ErrorCode, JobworkerError, ProtocolError, RequestError
from jobworker.jobnames import NameError_, check_name
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection, Role
from jobworker.protocol.keepalive import DEFAULT_KEEPALIVE_INTERVAL, KeepAlive, Verdict
from jobworker.protocol.wire import HEADER_SIZE

__all__ = [
    "BlockingClient",
    "ConnectionFailed",
    "JobRef",
    "UnixAddress",
    "as_job_id",
    "parse_address",
    "since_microseconds",
    "tls_failure_cause",
]

# What a library caller may pass where a job id is wanted.
JobRef = uuid.UUID | str

# A job id prefix shorter than this matches too much to be safe to act on
# (stop, rm): 4 hex digits leave 1 in 65,536 chance per other job.
MIN_PREFIX = 4
# How many candidates an ambiguous prefix's error names.
MAX_CANDIDATES = 10


def since_microseconds(since: float | None) -> int:
    """
    A C{since} time in seconds since the epoch (None: none) as the
    microseconds of C{FollowRequest.since} (0: none).

    @raise ValueError: a time before the epoch, or too far ahead to carry.
    """
    if since is None:
        return 0
    micros = round(since * 1e6)
    if not 0 < micros < 2**64:
        raise ValueError(f"since must be a time after the epoch, not {since!r}")
    return micros


def as_job_id(job_id: JobRef) -> uuid.UUID:
    """
    A job id given as a L{uuid.UUID} or its text (with or without dashes).

    @raise RequestError: (C{BAD_REQUEST}) text that is not a whole id.
    """
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(job_id)
    except (ValueError, TypeError, AttributeError):
        raise RequestError(f"{job_id!r} is not a job id", ErrorCode.BAD_REQUEST) from None


def tls_failure_cause(exc: ssl.SSLError, host: str) -> str:
    """
    What an C{ssl} error of the handshake or of the first read means to a
    user: which side refused which certificate, and why.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = (exc.verify_message or "").lower()
        if "hostname mismatch" in detail or "ip address mismatch" in detail:
            return f"server name mismatch: the server's certificate is not for {host!r} (dial a name the certificate carries)"
        if "expired" in detail:
            return "the server's certificate has expired"
        if "not yet valid" in detail:
            return "the server's certificate is not valid yet (check the clocks)"
        if "issuer" in detail or "self-signed" in detail or "self signed" in detail:
            return "unknown CA: the server's certificate is not signed by the CA given (--ca)"
        return f"the server's certificate was refused: {exc.verify_message or exc.reason}"
    reason = (exc.reason or "").upper()
    if "ALERT" in reason:
        # TLS 1.3: the server checks our certificate after the handshake
        # has ended on our side, so its verdict is an alert on a later read.
        if "UNKNOWN_CA" in reason:
            return "the server refused our client certificate: it is not signed by a CA the server trusts (unknown CA)"
        if "EXPIRED" in reason:
            return "the server refused our client certificate: it has expired"
        if "CERTIFICATE_REQUIRED" in reason:
            return "the server requires a client certificate"
        if "CERTIFICATE" in reason or "BAD_CERT" in reason or "DECRYPT" in reason or "HANDSHAKE" in reason:
            return f"the server refused our client certificate ({exc.reason})"
        if "PROTOCOL_VERSION" in reason:
            return "the server does not speak TLS 1.3"
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        return "the server does not speak TLS there (a plain-text port?)"
    return str(exc.reason or exc)

# Received bytes land in one reused buffer (see _receive_frames): a fresh
# 1 MiB bytes object per recv() costs an mmap and hundreds of page faults
# each time (glibc serves large allocations with mmap), which was most of
# the client's CPU time.
DEFAULT_WINDOW = 8 << 20

# The most ciphertext taken from the kernel by one recv (see _TLSChannel).
CIPHER_READ = 256 << 10


class _TLSChannel:
    """
    TLS 1.3 over a connected socket, through a pair of memory BIOs.

    An C{ssl.SSLSocket} has OpenSSL read the socket itself, one TLS record
    at a time: a read of the record's 5-byte header, then one of its body,
    so 130 000 system calls per GiB received.  Here one C{recv} takes all the
    kernel holds, up to L{CIPHER_READ}, and OpenSSL then decrypts record
    after record from memory.  The interface is the part of C{SSLSocket}'s
    that L{BlockingClient} uses, with the same errors: C{ssl.SSLError} for
    TLS failures and alerts, C{OSError} (C{socket.timeout} among them) from
    the socket.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, host: str) -> None:
        self.socket = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=host)
        self._cipher = bytearray(CIPHER_READ)
        self._cipher_view = memoryview(self._cipher)

    def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        # Whatever OpenSSL wrote (handshake, data, a KeyUpdate reply) goes out.
        if self._outgoing.pending:
            self.socket.sendall(self._outgoing.read())

    def _fill(self) -> None:
        size = self.socket.recv_into(self._cipher)
        if size:
            self._incoming.write(self._cipher_view[:size])
        else:
            self._incoming.write_eof()

    def recv_into(self, view: memoryview) -> int:
        """
        Decrypt the next bytes into C{view} (one record at most); 0 at the
        end of the stream, with or without the server's close_notify.
        """
        while True:
            try:
                return self._tls.read(len(view), view)
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            except ssl.SSLEOFError:
                return 0  # as SSLSocket's suppress_ragged_eofs has it

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._tls.write(view) :]
        self._flush()

    def settimeout(self, seconds: float | None) -> None:
        self.socket.settimeout(seconds)

    def buffered(self) -> bool:
        """
        Whether bytes are here already (ciphertext or plaintext), so a read
        may not need the socket.
        """
        return bool(self._incoming.pending or self._tls.pending())

    def fileno(self) -> int:
        return self.socket.fileno()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher()

    def version(self) -> str | None:
        return self._tls.version()

    def close(self) -> None:
        self.socket.close()


class ConnectionFailed(JobworkerError):
    """
    The server could not be reached, or the connection broke.
    """


class UnixAddress(str):
    """
    The path of a server's UNIX socket (C{jobcli --server unix:PATH}).  TLS
    runs over it as over TCP; the server's certificate must name
    L{UnixAddress.tls_name}, C{localhost}, as a development PKI's does.
    """

    tls_name = "localhost"


def parse_address(address: str, default_port: int = 8443) -> tuple[str, int] | UnixAddress:
    """
    Split C{HOST:PORT} (C{[::1]:8443} for IPv6); the port is optional.
    C{unix:PATH} names a UNIX socket.
    """
    if address.startswith("unix:"):
        if not address[5:]:
            raise ValueError(f"bad address {address!r}: no socket path")
        return UnixAddress(address[5:])
    host, port = address, default_port
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise ValueError(f"bad address {address!r}")
        host = address[1:end]
        rest = address[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad address {address!r}")
            port = int(rest[1:])
    elif address.count(":") == 1:
        host, _, port_text = address.partition(":")
        port = int(port_text)
    if not host or not 0 < port < 65536:
        raise ValueError(f"bad address {address!r}")
    return host, port


class BlockingClient:
    """
    One connection to a server; requests are answered in order of arrival.

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
        self._sock: _TLSChannel | None = None
        self._inbox: deque[m.Message] = deque()
        # Room for the largest frame we accept, so a frame always fits.
        self._receive_buffer = bytearray(HEADER_SIZE + self.conn.max_frame_size)
        self._receive_view = memoryview(self._receive_buffer)
        self._filled = 0
        self._need = HEADER_SIZE

    def connect(self) -> m.ServerHello:
        raw, host, port = self._open_socket()
        try:
            channel = _TLSChannel(raw, self.context, host)
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

    def __enter__(self) -> BlockingClient:
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
        except socket.timeout:
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
            except socket.timeout:
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

    # -- operations ------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        server: str | None = None,
        *,
        config_path: str | None = None,
        timeout: float | None = 30.0,
        keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
    ) -> BlockingClient:
        """
        A client (not yet connected; use it in a C{with} block) for the
        server C{server} names, with the credentials that C{jobcli} would
        use: see L{jobworker.clientconfig} for the order of flags, the
        environment and the configuration file (C{config_path}, default
        C{$XDG_CONFIG_HOME/jobworker/config.toml}).

        @raise jobworker.clientconfig.ClientConfigError: a bad file, or
            C{server} names several servers.
        @raise jobworker.clienttls.ClientTLSError: unusable credentials.
        """
        from jobworker.clientconfig import ClientConfigError, load_client_config, resolve_targets
        from jobworker.clienttls import client_ssl_context

        targets = resolve_targets(load_client_config(config_path), server=server)
        if len(targets) != 1:
            raise ClientConfigError(f"{server!r} names {len(targets)} servers; a client talks to one")
        target = targets[0]
        try:
            address = parse_address(target.address.value)
        except ValueError as exc:
            raise ClientConfigError(f"{target.address.value!r} ({target.address.source}): {exc}") from None
        context = client_ssl_context(target.ca.value, target.cert.value, target.key.value)
        return cls(address, context, timeout=timeout, keepalive_interval=keepalive_interval)

    def resolve_job_ids(self, refs: Iterable[JobRef]) -> list[uuid.UUID]:
        """
        Whole job ids for ids or unique prefixes of ids (at least
        L{MIN_PREFIX} hex digits, dashes ignored), in the order given.

        Whole ids are taken as they are, without asking the server; the
        prefixes cost one (paged) list of the jobs this client may see.

        @raise RequestError: C{BAD_REQUEST} for text that is no prefix or
            one that is too short or matches several jobs (the message
            names them), C{NOT_FOUND} for a prefix that matches none.
        """
        resolved: list[uuid.UUID | None] = []
        prefixes: dict[int, str] = {}
        for index, ref in enumerate(refs):
            if isinstance(ref, uuid.UUID):
                resolved.append(ref)
                continue
            text = str(ref).strip().lower()
            digits = text.replace("-", "")
            hexadecimal = bool(digits) and all(c in "0123456789abcdef" for c in digits)
            if len(digits) == 32 and hexadecimal:
                resolved.append(as_job_id(text))
                continue
            # A name next, as docker does (a whole id, then a name, then an
            # id prefix): the server finds it (one list request, filtered).
            by_name = self._job_named(str(ref))
            if by_name is not None:
                resolved.append(by_name)
                continue
            if not hexadecimal or len(digits) > 32:
                raise RequestError(f"no job has the id or name {str(ref)[:80]!r}", ErrorCode.NOT_FOUND)
            if len(digits) < MIN_PREFIX:
                raise RequestError(
                    f"job id prefix {ref!r} is too short: give at least {MIN_PREFIX} characters", ErrorCode.BAD_REQUEST
                )
            prefixes[index] = digits
            resolved.append(None)
        if prefixes:
            known = [job.job_id for job in self.iter_jobs()]
            for index, digits in prefixes.items():
                matches = [job_id for job_id in known if job_id.hex.startswith(digits)]
                if not matches:
                    raise RequestError(f"no job matches the id prefix {digits!r}", ErrorCode.NOT_FOUND)
                if len(matches) > 1:
                    named = ", ".join(str(job_id) for job_id in matches[:MAX_CANDIDATES])
                    more = f" and {len(matches) - MAX_CANDIDATES} more" if len(matches) > MAX_CANDIDATES else ""
                    raise RequestError(
                        f"job id prefix {digits!r} is ambiguous: it matches {named}{more}", ErrorCode.BAD_REQUEST
                    )
                resolved[index] = matches[0]
        return resolved  # type: ignore[return-value]

    def _job_named(self, name: str) -> uuid.UUID | None:
        """
        The job called C{name} among those this client may see; None for
        no such job (or text that cannot be a name).

        @raise RequestError: C{BAD_REQUEST} when jobs of several owners (an
            admin sees them all) have the name; the message names them.
        """
        try:
            check_name(name)
        except NameError_:
            return None
        if not name:
            return None
        jobs = self.list(name=name)
        if len(jobs) > 1:
            named = ", ".join(f"{job.job_id} (owner {job.owner})" for job in jobs[:MAX_CANDIDATES])
            raise RequestError(f"the name {name!r} is ambiguous: jobs of several owners have it: {named}", ErrorCode.BAD_REQUEST)
        return jobs[0].job_id if jobs else None

    def resolve_job_id(self, ref: JobRef) -> uuid.UUID:
        """
        L{resolve_job_ids} for one id or prefix.
        """
        return self.resolve_job_ids([ref])[0]

    def start(self, argv: list[str], **options: object) -> uuid.UUID:
        response = self.request(m.StartRequest(self.conn.next_request_id(), tuple(argv), **options))  # type: ignore[arg-type]
        assert isinstance(response, m.StartResponse)
        return response.job_id

    def status(self, job_id: JobRef) -> m.JobStatus:
        response = self.request(m.StatusRequest(self.conn.next_request_id(), as_job_id(job_id)))
        assert isinstance(response, m.StatusResponse)
        return response.status

    def wait(self, job_id: JobRef) -> m.JobStatus:
        response = self.request(m.WaitRequest(self.conn.next_request_id(), as_job_id(job_id)))
        assert isinstance(response, m.StatusResponse)
        return response.status

    def list(
        self, *, states: Iterable[m.JobState] = (), owner: str = "", name: str = "", labels: Iterable[str] = ()
    ) -> tuple[m.JobStatus, ...]:
        """
        Every job this client may see, oldest first, optionally only those
        in one of C{states}, owned by C{owner}, named C{name} and matching
        every label filter (C{"KEY"} or C{"KEY=VALUE"}); see L{iter_jobs}.
        """
        return tuple(self.iter_jobs(states=states, owner=owner, name=name, labels=labels))

    def iter_jobs(
        self,
        *,
        states: Iterable[m.JobState] = (),
        owner: str = "",
        page_size: int = 0,
        name: str = "",
        labels: Iterable[str] = (),
    ) -> Iterator[m.JobStatus]:
        """
        The jobs of L{list}, page after page (spec section 6.4): each page
        holds what fits one frame (or C{page_size} jobs), so a list of any
        size and any jobs can be read.  The server filters.
        """
        mask = m.state_mask(states)
        label_filters = tuple(labels)
        after_created_at, after_job_id = 0, uuid.UUID(int=0)
        while True:
            request = m.ListRequest(
                self.conn.next_request_id(), after_created_at, after_job_id, page_size, mask, owner, name, label_filters
            )
            response = self.request(request)
            assert isinstance(response, m.ListResponse)
            yield from response.jobs
            if not response.more or not response.jobs:
                return
            last = response.jobs[-1]
            after_created_at, after_job_id = last.created_at, last.job_id

    def stop(
        self, job_id: JobRef, *, grace: float | None = None, grace_ms: int | None = None, force: bool = False
    ) -> None:
        """
        SIGTERM, then SIGKILL after C{grace} seconds (as in
        L{jobworker.client}; default 10; C{grace_ms} in milliseconds is the
        older spelling), or SIGKILL at once with C{force}.
        """
        if grace is not None and grace_ms is not None:
            raise TypeError("give grace (seconds) or grace_ms, not both")
        if grace_ms is None:
            grace_ms = 10_000 if grace is None else max(0, round(grace * 1000))
        self.request(m.StopRequest(self.conn.next_request_id(), as_job_id(job_id), grace_ms, force))

    def signal(self, job_id: JobRef, signum: int) -> None:
        """
        Send one signal (one of C{messages.SIGNALS_SENT}: HUP, INT, QUIT,
        USR1, USR2, TERM) to the running job's command, without stopping it.
        """
        self.request(m.SignalRequest(self.conn.next_request_id(), as_job_id(job_id), signum))

    def remove(self, job_id: JobRef) -> None:
        self.request(m.RemoveRequest(self.conn.next_request_id(), as_job_id(job_id)))

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
