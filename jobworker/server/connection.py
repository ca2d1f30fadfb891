"""
The server side of the protocol: a thin Twisted layer over the sans-IO
L{Connection} and the L{JobManager}.

One L{ServerProtocol} per TLS connection:

    TLS handshake (identity from the verified client certificate)
      -> ServerHello -> ClientHello -> requests ...

Output streaming
================

Every follow request opens a stream: a cursor (an offset into the job's
L{OutputLog}) and a window of bytes the client has granted.  One push
producer per connection, the L{_StreamPump}, serves all of that
connection's streams round-robin, one chunk per stream per turn, so a
stream with a lot of backlog cannot starve the others.  It stops when the
transport asks it to (C{pauseProducing}: the TCP buffer is full) and when no
stream has both data and window.  Nothing here buffers output: a follower
that reads slowly only lags on its cursor, and the job, which is read by the
job manager at its own pace, is never slowed by it.

Responses are flow controlled the same way
==========================================

A client that sends requests and does not read the answers must not make
the server hold them all (1,000 pipelined status requests for a job with a
256 KiB command are 260 MB of answers).  Frames that arrive wait in the
core (undecoded, L{Connection.next_message}) and are served in order, at
most L{INBOX_TURN} per turn of the reactor, while the transport has room;
once it asks the pump to pause (more than L{WRITE_BUFFER} bytes unsent),
serving stops and the connection stops reading from the socket, so the
client's further requests wait in the kernel's buffers, and TCP's own flow
control slows the client down.  When the transport has drained, serving
and reading resume.  What one connection holds in answers is so bounded
by L{WRITE_BUFFER} plus one response (at most the client's frame size),
plus the answers of its waits that end meanwhile (at most
C{max_pending_requests}), and the core holds at most what one read from
the socket decoded.
"""

from __future__ import annotations

import signal
import threading
import uuid
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from jobworker.logs import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker import __version__
from jobworker.audit import RateLimit, Suppressed, log_value
from jobworker.errors import ErrorCode, ProtocolError, RequestError
from jobworker.jobs.manager import Job, JobManager
from jobworker.host.memory import release_free_memory
from jobworker.output.log import GAP_FD
from jobworker.policy import Identity, Operation, Role
from jobworker.protocol import messages as m
from jobworker.protocol.keepalive import DEFAULT_KEEPALIVE_INTERVAL, KeepAlive, Verdict as KeepAliveVerdict
from jobworker.protocol.listing import check_list_filters, list_page
from jobworker.tls import BulkTLSMemoryBIOProtocol, drop_traceback, peer_names
from jobworker.protocol.connection import DEFAULT_MAX_FRAME_SIZE, Connection, Role as WireRole

__all__ = ["ServerProtocol", "ServerFactory", "ServerLimits"]

log = Logger()

# Time to drain a GOAWAY before the connection is aborted.
ABORT_GRACE_S = 5.0
# Bytes one stream may send per turn of the pump: a fair share.
TURN_BYTES = 256 << 10
# Data bytes per Output frame.  Small enough (below glibc's 128 KiB mmap
# threshold) that the client's buffer for each frame is reused rather than
# mapped and faulted in afresh; large enough that the Python work per frame
# (its head, and its decoding on the client) is a small share.
FRAME_DATA = 64 << 10
# Bytes the pump sends before yielding the reactor to other work.
PUMP_BUDGET = 8 << 20
# Bytes of encrypted output one connection may hold in user space before
# the pump is paused.
WRITE_BUFFER = 512 << 10
# Requests one connection has served per turn of the reactor; the rest wait
# for the next turn, after the other connections' (one read of 64 KiB can
# hold 2,600 status requests: a fifth of a second of the server's time).
INBOX_TURN = 64
# Bytes read from the socket at once.  Twisted reads bufferSize bytes, which
# tune_transport raises to WRITE_BUFFER for the writes; but each read goes
# whole into OpenSSL's memory BIO, which keeps the largest buffer it ever
# held, so a client sending fast would leave 512 KiB behind per connection.
# What clients send is small (requests): 64 KiB, Twisted's own default.
READ_SIZE = 64 << 10
# After a connection closes, freed memory goes back to the kernel at most
# this often (see jobworker.memory), seconds.
RELEASE_MEMORY_EVERY_S = 1.0
# Error messages are cut to this many characters: they may quote client
# input (an environment variable name), and must always fit a frame.
MAX_ERROR_MESSAGE = 1000


class ServerLimits:
    """
    Per-connection limits, each with its reason.

    @ivar handshake_timeout_s: TLS and hello must finish within this; a
        client that connects and says nothing holds no slot for long.
    @ivar idle_timeout_s: a connection idle (no pending request, no open
        stream: spec section 5.7) for this long without interruption is
        closed; it holds a slot and memory for nobody.
    @ivar keepalive_interval_s: seconds of silence from the client before it
        is pinged; no answer within another interval closes the connection,
        so a client that vanished without closing (host down, process
        stopped) holds its connection, its waits and its streams for at most
        twice this.  0 turns keep-alive off.
    @ivar max_pending_requests: requests awaiting their answer (mostly waits).
    @ivar max_streams: output streams open at once on one connection.
    @ivar max_frame_size: the largest frame we accept from the client.
    @ivar frame_timeout_s: a frame must arrive whole within this many
        seconds of its first byte.  Without it a client trickling one byte
        at a time holds up to a maximum frame of receive buffer and keeps
        the idle timer from ever firing.  30 s passes a 1 MiB frame at
        35 KB/s.
    @ivar max_connections: connections open at once, in total, TLS
        handshake finished or not.  Beyond it a new connection is closed at
        once, before its handshake (nothing can be said to a peer before
        TLS, and a handshake is the costly part).  Each connection may hold
        about 2 MiB (a partial frame, unsent answers, TLS buffers), so 512
        bound that to 1 GiB however many identities there are.
    @ivar max_connections_per_identity: connections one identity (the
        certificate's CN) may hold at once.  Beyond it the new connection
        gets C{GoAway(TOO_MANY_CONNECTIONS)} instead of the hello: 128 are
        plenty for scripts and followers run in parallel (C{jobcli logs -f}
        is one connection each).
    @ivar max_partial_bytes_per_identity: bytes of incomplete frames one
        identity may have buffered on all its connections together (each may
        hold up to a maximum frame); the connection that goes over gets
        C{GoAway(TOO_MANY_CONNECTIONS)}.  This, not the connection count,
        bounds what trickled frames can pin: 32 MiB per identity.
    @ivar max_streams_per_identity: output streams (followers) one identity
        may have open on all its connections together; the next follow gets
        C{TOO_MANY_STREAMS}.  Each stream is served on the reactor thread, so
        thousands of them slow every other client down.
    @ivar audit_burst: audit lines one identity may write per
        C{audit_interval_s}; beyond it they are counted and summarized once
        the interval ends (L{jobworker.audit.RateLimit}).  1,000 per 10 s
        is 20 KB/s of log per identity at most, 50 times what a person at a
        terminal makes.  0 turns the limit off.
    """

    def __init__(
        self,
        *,
        handshake_timeout_s: float = 10.0,
        idle_timeout_s: float = 300.0,
        keepalive_interval_s: float = DEFAULT_KEEPALIVE_INTERVAL,
        max_pending_requests: int = 128,
        max_streams: int = 256,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        frame_timeout_s: float = 30.0,
        max_connections: int = 512,
        max_connections_per_identity: int = 128,
        max_streams_per_identity: int = 256,
        max_partial_bytes_per_identity: int = 32 << 20,
        audit_burst: int = 1000,
        audit_interval_s: float = 10.0,
    ) -> None:
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.keepalive_interval_s = keepalive_interval_s
        self.max_pending_requests = max_pending_requests
        self.max_streams = max_streams
        self.max_frame_size = max_frame_size
        self.frame_timeout_s = frame_timeout_s
        self.max_connections = max_connections
        self.max_connections_per_identity = max_connections_per_identity
        self.max_streams_per_identity = max_streams_per_identity
        self.max_partial_bytes_per_identity = max_partial_bytes_per_identity
        self.audit_burst = audit_burst
        self.audit_interval_s = audit_interval_s


class _Stream:
    """
    One follower: a cursor into a job's output.
    """

    def __init__(self, stream_id: int, job: Job, offset: int, follow: bool, timestamps: bool = False) -> None:
        self.stream_id = stream_id
        self.job = job
        self.offset = offset
        self.follow = follow
        # With timestamps: the time of the last TimeMark sent (-1: none yet).
        self.timestamps = timestamps
        self.mark_time = -1


@implementer(IPushProducer)
class _StreamPump:
    """
    Sends the output of a connection's streams as the client's windows and
    the transport allow; see the module docstring.
    """

    def __init__(self, protocol: ServerProtocol) -> None:
        self.protocol = protocol
        self.paused = False
        self._scheduled: Any = None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self.protocol is None:
            return
        # Answers first: they were waiting for the same room.
        self.protocol.serve_inbox()
        self.wake()

    def stopProducing(self) -> None:
        self.paused = True

    def wake(self) -> None:
        """
        Something changed (output, a window, the transport): send soon.
        Coalesces many wake-ups into one turn of the reactor.
        """
        if self._scheduled is None and not self.paused and self.protocol is not None:
            self._scheduled = self.protocol.reactor.callLater(0, self._run)

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
        self.protocol = None  # type: ignore[assignment]

    def _run(self) -> None:
        self._scheduled = None
        protocol = self.protocol
        if protocol is None:
            return
        budget = PUMP_BUDGET
        while not self.paused and budget > 0 and protocol.streams:
            progressed = False
            for stream in list(protocol.streams.values()):
                if self.paused:
                    break
                try:
                    sent = protocol.serve_stream(stream)
                except Exception:
                    # One stream's failure is that stream's end, never the
                    # pump's or the connection's.
                    log.failure("internal error serving stream {stream_id} of {peer}", stream_id=stream.stream_id, peer=protocol._peer)
                    protocol._end_stream(stream, m.EndReason.SERVER_ERROR)
                    sent = 0
                if sent:
                    progressed = True
                    budget -= sent
            if not progressed:
                return
        if not self.paused and budget <= 0:
            self.wake()


def tune_transport(transport: Any) -> None:
    """
    Set up a client connection's transport (TLS over TCP) for streaming.

      - TCP_NODELAY: responses are small and each one ends a round trip;
        with Nagle's algorithm they would wait for the client's delayed
        ACK, 40 ms per request.
      - The TCP transport holds up to L{WRITE_BUFFER} bytes before it
        pauses the pump (Twisted's default is 64 KiB), so the pump sends
        several frames per turn of the reactor instead of one, and a live
        follower keeps up with the job in memory instead of reading it back
        from the spool.  Bounded per connection.
      - ... and hands all of that to one C{send()} (Twisted's default is at
        most 128 KiB per call, then a turn of the reactor for the next):
        a quarter of the reactor turns per GiB, and no join of the buffered
        pieces between them.
    """
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass  # not a TCP socket (a UNIX endpoint)
    tcp = getattr(transport, "transport", transport)  # the TCP connection under TLS
    if hasattr(tcp, "bufferSize") and hasattr(tcp, "SEND_LIMIT"):
        tcp.bufferSize = WRITE_BUFFER
        tcp.SEND_LIMIT = WRITE_BUFFER
        if hasattr(tcp, "_dataReceived") and hasattr(tcp, "socket"):
            tcp.doRead = _small_reads(tcp)


def _small_reads(tcp: Any) -> Callable[[], Any]:
    """
    Twisted's C{tcp.Connection.doRead}, reading L{READ_SIZE} bytes at a time
    rather than C{bufferSize} (see L{READ_SIZE}).  Bound to the transport as
    an instance attribute; it refers to the transport weakly, so the two
    make no cycle.
    """
    import weakref
    from errno import EWOULDBLOCK

    from twisted.internet import main

    connection = weakref.ref(tcp)

    def doRead() -> Any:
        tcp = connection()
        if tcp is None:
            return main.CONNECTION_LOST
        try:
            data = tcp.socket.recv(READ_SIZE)
        except OSError as error:
            if error.args[0] == EWOULDBLOCK:
                return None
            return main.CONNECTION_LOST
        return tcp._dataReceived(data)

    return doRead


@implementer(IHandshakeListener)
class ServerProtocol(Protocol, TimeoutMixin):
    """
    One client connection.
    """

    identity: Identity | None = None
    # Whether this connection is counted in the factory's totals (see
    # ServerLimits.max_connections and max_connections_per_identity).
    _counted = False
    _identity_counted = False
    _timed_out = False  # the handshake timeout closed it (logged there)
    _partial_held = 0  # bytes of an incomplete frame counted to the identity

    def __init__(self, factory: ServerFactory) -> None:
        self.factory = factory
        self.manager: JobManager = factory.manager
        self.reactor = factory.reactor
        self.limits = factory.limits
        self.conn = Connection(WireRole.SERVER, max_frame_size=self.limits.max_frame_size)
        self.streams: dict[int, _Stream] = {}
        self.pump = _StreamPump(self)
        self._waits: set[defer.Deferred[Any]] = set()
        self._abort_call: Any = None
        self._goaway_sent = False
        self._peer = "?"
        self._subscriptions: dict[int, Callable[[], None]] = {}
        # Whether reading from the socket is paused because received frames
        # wait to be served (see "Responses are flow controlled" in the
        # module docstring; the core keeps them until next_message).
        self._reading_paused = False
        self._inbox_turn: Any = None  # the next turn of serve_inbox, if due
        # Fires when the frame being received is late (frame_timeout_s).
        self._frame_timer: Any = None
        # The idle timer runs only while the connection is idle (spec 5.7).
        self._idle_call: Any = None
        self._keepalive: KeepAlive | None = None
        self._keepalive_call: Any = None

    # Twisted's TimeoutMixin reads the clock from here.
    def callLater(self, delay: float, call: Callable[..., Any], *args: Any) -> Any:
        return self.reactor.callLater(delay, call, *args)

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self._peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        if not self.factory.connection_opened():
            log.warn(
                "refusing connection from {peer}: {count} connections open, the most allowed (--max-connections)",
                peer=self._peer,
                count=self.factory.open_connections,
                limit="max-connections",
            )
            self.transport.abortConnection()
            return
        self._counted = True
        self.setTimeout(self.limits.handshake_timeout_s)
        tune_transport(self.transport)
        self.transport.registerProducer(self.pump, True)

    def handshakeCompleted(self) -> None:
        certificate = self.transport.getPeerCertificate()
        name, unit = peer_names(certificate) if certificate is not None else (None, None)
        self.identity = Identity(name or "", Role.from_ou(unit))
        log.info("connection from {peer} as {identity}", peer=self._peer, identity=log_value(str(self.identity)))
        if not self.factory.identity_connected(self.identity.name):
            limit = self.limits.max_connections_per_identity
            log.warn(
                "refusing connection from {peer}: too many connections for {identity} (--max-connections-per-identity {limit})",
                peer=self._peer,
                identity=log_value(self.identity.name),
                limit=limit,
            )
            self._fail(
                ProtocolError(
                    f"identity {self.identity.name!r} already has {limit} connections open, the most allowed",
                    ErrorCode.TOO_MANY_CONNECTIONS,
                )
            )
            return
        self._identity_counted = True
        hello = m.ServerHello(
            m.PROTOCOL_VERSION,
            self.conn.max_frame_size,
            self.factory.server_name,
            self.identity.name,
            unit or "",
            self.factory.server_version,
        )
        self.transport.write(self.conn.send(hello))

    def timeoutConnection(self) -> None:
        # TimeoutMixin times the handshake only; the idle timeout is ours.
        self._timed_out = True
        log.info("closing handshake timed-out connection from {peer}", peer=self._peer)
        self._fail(ProtocolError("handshake timeout", ErrorCode.TIMEOUT))

    def dataReceived(self, data: bytes) -> None:
        if self.identity is None:
            # TLS delivers application data only after the handshake; this
            # guards a transport that would not.
            self._fail(ProtocolError("data before the TLS handshake completed"))
            return
        if self._keepalive is not None:
            self._keepalive.received(self.reactor.seconds())
        try:
            self.conn.feed(data)
        except ProtocolError as error:
            log.info("protocol error from {peer}: {error}", peer=self._peer, error=error.message)
            self._fail(error)
            return
        self._watch_frame(new_frame=self.conn.frames_waiting)
        if not self._account_partial():
            return
        self.serve_inbox()

    def _account_partial(self) -> bool:
        """
        Count this connection's incomplete frame in its identity's total;
        False (and the connection failed) when that total is over
        C{max_partial_bytes_per_identity}.
        """
        name = self.identity.name if self.identity else ""
        held = self.conn.receive_buffered
        total = self.factory.partial_held(name, held - self._partial_held)
        self._partial_held = held
        limit = self.limits.max_partial_bytes_per_identity
        if total <= limit:
            return True
        log.warn(
            "closing connection from {peer}: {identity} has {total} bytes of unfinished frames on its connections (limit {limit})",
            peer=self._peer,
            identity=log_value(name),
            total=total,
            limit=limit,
        )
        self._fail(
            ProtocolError(
                f"identity {name!r} has more than {limit} bytes of unfinished frames on its connections",
                ErrorCode.TOO_MANY_CONNECTIONS,
            )
        )
        return False

    def _watch_frame(self, new_frame: bool) -> None:
        """
        Time the frame being received: from its first byte, it has
        C{frame_timeout_s}.  C{new_frame}: frames completed since the last
        call, so what is buffered now is a later frame's start.
        """
        timer = self._frame_timer
        if self.conn.receive_buffered and not self._reading_paused and self.connected:
            if timer is not None and timer.active() and not new_frame:
                return
            if timer is not None and timer.active():
                timer.cancel()
            self._frame_timer = self.reactor.callLater(self.limits.frame_timeout_s, self._frame_late)
        elif timer is not None:
            if timer.active():
                timer.cancel()
            self._frame_timer = None

    def _frame_late(self) -> None:
        self._frame_timer = None
        log.info(
            "closing connection from {peer}: a frame took over {timeout} s to arrive ({size} bytes so far)",
            peer=self._peer,
            timeout=self.limits.frame_timeout_s,
            size=self.conn.receive_buffered,
        )
        self._fail(ProtocolError(f"a frame took longer than {self.limits.frame_timeout_s:g} s to arrive", ErrorCode.TIMEOUT))

    def serve_inbox(self) -> None:
        """
        Serve the received messages in order while the transport has room
        for their answers, at most L{INBOX_TURN} per turn of the reactor;
        stop reading the socket while some must wait.

        One message at a time: a request is pending from the moment it is
        dispatched, so the cap counts exactly what this connection has asked
        and not been answered (spec section 7).
        """
        turn, self._inbox_turn = self._inbox_turn, None
        if turn is not None and turn.active():
            turn.cancel()  # called directly before its turn came
        budget = INBOX_TURN
        was_open = self.conn.is_open
        try:
            while budget and not self.pump.paused and not self._goaway_sent and self.connected:
                message = self.conn.next_message()
                if message is None:
                    break
                if not was_open and self.conn.is_open:
                    was_open = True
                    self._opened()
                self._dispatch(message)
                budget -= 1
        except ProtocolError as error:
            log.info("protocol error from {peer}: {error}", peer=self._peer, error=error.message)
            self._fail(error)
            return
        waiting = self.conn.frames_waiting and not self._goaway_sent and self.connected
        if waiting and not budget:
            # Other connections get their turn before the rest of this one's.
            self._inbox_turn = self.reactor.callLater(0, self.serve_inbox)
        if waiting != self._reading_paused and self.connected and self.transport is not None:
            self._reading_paused = waiting
            if waiting:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()
            # A frame we stopped reading is not the client's delay.
            self._watch_frame(new_frame=True)
        self._update_idle()

    def _opened(self) -> None:
        """
        The hello exchange is complete: the handshake timer gives way to the
        idle timer and the keep-alive.
        """
        self.setTimeout(None)
        interval = self.limits.keepalive_interval_s
        if interval and interval > 0:
            self._keepalive = KeepAlive(interval, self.reactor.seconds())
            self._schedule_keepalive()

    # -- idle and keep-alive -----------------------------------------------------

    def _update_idle(self) -> None:
        """
        Run the idle timer exactly while the connection is idle: hello done,
        no pending request, no open stream (spec section 5.7).  It starts
        afresh each time the connection becomes idle.
        """
        busy = bool(self.streams) or self.conn.pending_requests > 0
        if busy or not self.conn.is_open or self._goaway_sent:
            self._cancel_idle()
        elif self._idle_call is None:
            self._idle_call = self.reactor.callLater(self.limits.idle_timeout_s, self._idle_expired)

    def _cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _idle_expired(self) -> None:
        self._idle_call = None
        log.info("closing idle connection from {peer}", peer=self._peer)
        self._fail(ProtocolError(f"idle for {self.limits.idle_timeout_s:g} s", ErrorCode.TIMEOUT))

    def _schedule_keepalive(self) -> None:
        assert self._keepalive is not None
        delay = max(0.0, self._keepalive.deadline() - self.reactor.seconds())
        self._keepalive_call = self.reactor.callLater(delay, self._keepalive_due)

    def _keepalive_due(self) -> None:
        self._keepalive_call = None
        keepalive = self._keepalive
        if keepalive is None or self.conn.is_closed or not self.connected:
            return
        verdict = keepalive.check(self.reactor.seconds())
        if verdict is KeepAliveVerdict.DEAD:
            log.info("closing connection from {peer}: no answer to a keep-alive ping", peer=self._peer)
            self._fail(
                ProtocolError(f"keep-alive timeout: no answer to a ping within {keepalive.interval:g} s", ErrorCode.TIMEOUT)
            )
            return
        if verdict is KeepAliveVerdict.PING:
            self.transport.write(self.conn.send(m.Ping(keepalive.ping_data())))
        self._schedule_keepalive()

    def _stop_timers(self) -> None:
        self.setTimeout(None)
        self._cancel_idle()
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None
        self._keepalive = None

    def _fail(self, error: ProtocolError) -> None:
        if self.identity is None:
            # TLS never completed: nothing can be said to this peer.
            self.setTimeout(None)
            self.transport.abortConnection()
            return
        if not self._goaway_sent:
            self._goaway_sent = True
            self.transport.write(self.conn.goaway(error))
        self._close()

    def _close(self) -> None:
        self._stop_timers()
        # Nothing more will be read: what a late frame held goes now, not
        # when the peer has finished closing (up to ABORT_GRACE_S).
        self.conn.discard_received()
        if self._partial_held:
            self.factory.partial_held(self.identity.name if self.identity else "", -self._partial_held)
            self._partial_held = 0
        # The TLS layer shuts down only once no producer is registered.
        self.pump.stopProducing()
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.reactor.callLater(ABORT_GRACE_S, self.transport.abortConnection)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._stop_timers()
        if self._counted and self.identity is None and not self._timed_out:
            # The TLS handshake never finished: refused (a certificate the
            # CA did not issue, a TLS version or group not offered) or
            # abandoned.  The client cannot be told more than the alert.
            log.info(
                "TLS handshake with {peer} failed: {reason}",
                peer=self._peer,
                reason=log_value(_tls_reason(reason)),
            )
        if self._partial_held:
            self.factory.partial_held(self.identity.name if self.identity else "", -self._partial_held)
            self._partial_held = 0
        if self._counted:
            self._counted = False
            self.factory.connection_closed(self.identity.name if self._identity_counted and self.identity else None)
        self.pump.detach()
        if self._inbox_turn is not None and self._inbox_turn.active():
            self._inbox_turn.cancel()
        self._inbox_turn = None
        if self._frame_timer is not None and self._frame_timer.active():
            self._frame_timer.cancel()
        self._frame_timer = None
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        for stream_id in list(self.streams):
            self._drop_stream(stream_id)
        for wait in list(self._waits):
            wait.cancel()
        self._waits.clear()
        if reason is not None:
            # A failure raised inside the transport's own connectionLost
            # (a TLS error on a reset connection) holds the frames of that
            # call, and through them the transports: another cycle.
            drop_traceback(reason)

    # -- requests --------------------------------------------------------------

    def _dispatch(self, message: m.Message) -> None:
        if isinstance(message, m.ClientHello):
            return
        if isinstance(message, m.GoAway):
            # Close at once (spec sections 5.6, 10.1): nothing more is read,
            # answered or sent, and the waits of this connection are dropped.
            log.info(
                "client {peer} went away: {code} {message}", peer=self._peer, code=message.code, message=log_value(message.message)
            )
            self._goaway_sent = True
            self._close()
            for wait in list(self._waits):
                wait.cancel()
            return
        if isinstance(message, m.Ping):
            self.transport.write(self.conn.send(m.Pong(message.data)))
            return
        if isinstance(message, m.Pong):
            return  # any bytes are a sign of life; dataReceived noted them
        if isinstance(message, m.WindowUpdate):
            if message.stream_id in self.streams:
                self.pump.wake()
            return
        if isinstance(message, m.CancelStream):
            stream = self.streams.get(message.stream_id)
            if stream is not None:
                self._end_stream(stream, m.EndReason.CANCELLED)
            return
        handler = self._handlers.get(type(message))
        assert handler is not None, message
        request_id = message.request_id  # type: ignore[attr-defined]
        operation = _OPERATIONS[type(message)]
        job_id = getattr(message, "job_id", None)
        # A request ends idleness; the timer starts afresh once the
        # connection is idle again (spec section 5.7).
        self._cancel_idle()

        def internal_error(failure: Failure | None = None) -> None:
            # Anything unexpected is this request's INTERNAL error and a
            # logged failure, never the connection's end.
            log.failure(
                "internal error serving {operation} for {identity}",
                failure,
                operation=operation.value,
                identity=log_value(str(self.identity)),
            )
            self._audit(operation, job_id, "internal-error")
            if self.conn.is_pending(request_id):
                self._respond(m.ErrorResponse(request_id, int(ErrorCode.INTERNAL), "internal server error"))

        try:
            if self.conn.pending_requests > self.limits.max_pending_requests:
                raise RequestError(
                    f"more than {self.limits.max_pending_requests} requests pending on this connection",
                    ErrorCode.TOO_MANY_REQUESTS,
                )
            result = handler(self, message)
            if not isinstance(result, defer.Deferred):
                self._audit(operation, job_id, "allow")
                if result is not None:
                    self._respond(result)
                return
        except RequestError as error:
            self._audit(operation, job_id, error.code.name.lower())
            self._respond(m.ErrorResponse(request_id, int(error.code), error.message))
            return
        except Exception:
            internal_error()
            return
        # Answered later (start, wait): audited when the verdict is known.
        self._waits.add(result)

        def done(response: m.Message) -> None:
            self._waits.discard(result)
            try:
                self._audit(operation, getattr(response, "job_id", job_id), "allow")
                self._respond(response)
            except Exception:
                internal_error()

        def failed(failure: Failure) -> None:
            self._waits.discard(result)
            if failure.check(defer.CancelledError):
                return
            try:
                if failure.check(RequestError):
                    error = failure.value
                    self._audit(operation, job_id, error.code.name.lower())
                    self._respond(m.ErrorResponse(request_id, int(error.code), error.message))
                    return
                internal_error(failure)
            except Exception:
                internal_error()

        result.addCallbacks(done, failed)

    def _audit(self, operation: Operation, job_id: uuid.UUID | None, verdict: str) -> None:
        """
        One audit line, as C{key=value} pairs whose values cannot break the
        line (L{log_value}); at most C{audit_burst} per identity per
        C{audit_interval_s}, the rest summarized (L{ServerFactory.audit}).
        """
        name = self.identity.name if self.identity else ""
        if not self.factory.audit(name, f"{operation.value} {verdict}"):
            return
        log.info(
            "audit identity={identity} role={role} peer={peer} operation={operation} job={job_id} verdict={verdict}",
            identity=log_value(name),
            role=self.identity.role.value if self.identity and self.identity.role else '""',
            peer=log_value(self._peer),
            operation=operation.value,
            job_id=str(job_id) if job_id else "-",
            verdict=verdict,
            audit=True,
        )

    def _respond(self, response: m.Message) -> None:
        """
        Send a response or a stream's end.  One that cannot be encoded (a
        bug, or a damaged job record) is logged and replaced by what can
        always be sent, so every request is still answered and every stream
        still ends: C{INTERNAL} for a request, C{SERVER_ERROR} for a stream.
        (A status too large for the client's frame is not an error: the
        protocol core abridges it.)
        """
        if self.conn.is_closed or not self.connected:
            return
        if isinstance(response, m.ErrorResponse) and len(response.message) > MAX_ERROR_MESSAGE:
            response = m.ErrorResponse(response.request_id, response.code, response.message[:MAX_ERROR_MESSAGE] + "...")
        try:
            frame = self.conn.send(response)
        except ValueError:
            log.failure("cannot send {kind} to {peer}", kind=type(response).__name__, peer=self._peer)
            frame = self.conn.send(_fallback(response))
        self.transport.write(frame)
        self._update_idle()

    def _start(self, request: m.StartRequest) -> defer.Deferred[m.Message]:
        assert self.identity is not None
        started = self.manager.start(self.identity, request)
        return started.addCallback(lambda job: m.StartResponse(request.request_id, job.job_id))

    def _stop(self, request: m.StopRequest) -> m.Message:
        job = self.manager.get(self.identity, Operation.STOP, request.job_id)  # type: ignore[arg-type]
        if job.is_final:
            raise RequestError(f"job {job.job_id} has already ended ({job.state.label})", ErrorCode.JOB_FINISHED)
        grace = 0.0 if request.force else request.grace_ms / 1000
        job.stop(self.identity.name, grace)  # type: ignore[union-attr]
        return m.OkResponse(request.request_id)

    def _signal(self, request: m.SignalRequest) -> m.Message:
        job = self.manager.get(self.identity, Operation.STOP, request.job_id)  # type: ignore[arg-type]
        if request.signal not in m.SIGNALS_SENT:
            names = ", ".join(sorted(signal.Signals(number).name[3:] for number in m.SIGNALS_SENT))
            raise RequestError(f"signal {request.signal} cannot be sent to a job (only {names}; KILL is a forced stop)", ErrorCode.BAD_REQUEST)
        if job.is_final:
            raise RequestError(f"job {job.job_id} has already ended ({job.state.label})", ErrorCode.JOB_FINISHED)
        job.send_signal(request.signal)
        return m.OkResponse(request.request_id)

    def _status(self, request: m.StatusRequest) -> m.Message:
        job = self.manager.get(self.identity, Operation.STATUS, request.job_id)  # type: ignore[arg-type]
        return m.StatusResponse(request.request_id, job.status())

    def _list(self, request: m.ListRequest) -> m.Message:
        check_list_filters(request)
        jobs = self.manager.list(self.identity)  # type: ignore[arg-type]
        return list_page(jobs, request, self.conn.peer_max_frame_size, self._unlistable)

    def _unlistable(self, job: Any, error: Exception) -> m.JobStatus:
        # One damaged job never breaks the list for everyone: it is listed
        # with what is certainly encodable.
        log.error("job {job_id} cannot be listed: {error}", job_id=job.job_id, error=error)
        return _minimal_status(job.job_id, m.JobState.LOST, "the server cannot encode this job's status")

    def _wait(self, request: m.WaitRequest) -> defer.Deferred[m.Message]:
        job = self.manager.get(self.identity, Operation.WAIT, request.job_id)  # type: ignore[arg-type]
        return job.when_ended().addCallback(lambda status: m.StatusResponse(request.request_id, status))

    def _remove(self, request: m.RemoveRequest) -> m.Message:
        job = self.manager.get(self.identity, Operation.REMOVE, request.job_id)  # type: ignore[arg-type]
        self.manager.remove(job)
        return m.OkResponse(request.request_id)

    def _follow(self, request: m.FollowRequest) -> m.Message | None:
        job = self.manager.get(self.identity, Operation.LOGS, request.job_id)  # type: ignore[arg-type]
        if len(self.streams) >= self.limits.max_streams:
            raise RequestError(
                f"at most {self.limits.max_streams} output streams per connection", ErrorCode.TOO_MANY_STREAMS
            )
        if self.factory.streams_of(self.identity.name) >= self.limits.max_streams_per_identity:  # type: ignore[union-attr]
            raise RequestError(
                f"at most {self.limits.max_streams_per_identity} output streams per identity, on all its connections",
                ErrorCode.TOO_MANY_STREAMS,
            )
        if request.offset > job.output.end and job.is_final:
            raise RequestError(
                f"offset {request.offset} is past the end of the output ({job.output.end} bytes)",
                ErrorCode.BAD_REQUEST,
            )
        offset = request.offset
        if request.since:
            # From the first byte read at or after `since` (spec 8.7).
            offset = max(offset, job.output.marks.offset_at(request.since, job.output.end))
        self._respond(m.OkResponse(request.request_id))
        stream = _Stream(request.stream_id, job, offset, request.follow, request.timestamps)
        self.streams[stream.stream_id] = stream
        self.factory.stream_opened(self.identity.name)  # type: ignore[union-attr]
        subscription = self.pump.wake
        job.output.subscribe(subscription)
        self._subscriptions[stream.stream_id] = subscription
        self.pump.wake()
        return None

    _handlers: dict[type, Callable[..., Any]] = {
        m.StartRequest: _start,
        m.StopRequest: _stop,
        m.SignalRequest: _signal,
        m.StatusRequest: _status,
        m.ListRequest: _list,
        m.WaitRequest: _wait,
        m.RemoveRequest: _remove,
        m.FollowRequest: _follow,
    }

    # -- streams ---------------------------------------------------------------

    def serve_stream(self, stream: _Stream) -> int:
        """
        Send what one turn allows on C{stream}; return how much progress it
        made (data bytes sent, at least 1 when only a gap went out).
        """
        job = stream.job
        output = job.output
        if self.manager.jobs.get(job.job_id) is not job:
            self._end_stream(stream, m.EndReason.REMOVED)
            return 0
        window = self.conn.send_window(stream.stream_id)
        limit = min(window, TURN_BYTES)
        frame = min(FRAME_DATA, self.conn.max_output_chunk())
        sent = 0
        if stream.offset < output.end and limit > 0:
            # The turn's frames go out as one write: one copy of the data
            # (the join), one SSL_write, whose TLS records are all full
            # (frame by frame, each 64 KiB frame would end in a record of 22
            # bytes), and one read of the ciphertext.
            pieces: list[bytes | memoryview] = []
            for chunk in output.read(stream.offset, limit):
                if chunk.fd == GAP_FD:
                    pieces.append(self.conn.send(m.Gap(stream.stream_id, chunk.offset, chunk.gap)))
                else:
                    data = memoryview(chunk.data)
                    if stream.timestamps:
                        self._time_marks(stream, chunk.offset, len(data), pieces)
                    for at in range(0, len(data), frame):
                        piece = data[at : at + frame]
                        pieces.append(self.conn.send_output_head(stream.stream_id, chunk.fd, chunk.offset + at, len(piece)))
                        pieces.append(piece)
                    sent += len(data)
                stream.offset = chunk.offset + chunk.size
            self._write_turn(pieces)
            return max(sent, 1)
        if stream.offset >= output.end:
            if output.closed and job.is_final:
                self._end_stream(stream, m.EndReason.JOB_ENDED)
            elif not stream.follow:
                self._end_stream(stream, m.EndReason.CAUGHT_UP)
        return 0

    def _time_marks(self, stream: _Stream, offset: int, size: int, pieces: list[bytes | memoryview]) -> None:
        """
        The TimeMark frames for the C{size} bytes from C{offset}, before
        their Output frames: one per mark of the log (one per chunk the
        server read), and none for a range the last one sent covers.
        """
        for mark_offset, when in stream.job.output.marks.between(offset, offset + size):
            if mark_offset == offset and when == stream.mark_time:
                continue  # the mark in force goes on from the last read
            pieces.append(self.conn.send_time_mark(stream.stream_id, mark_offset, when))
            stream.mark_time = when

    def _write_turn(self, pieces: list[bytes | memoryview]) -> None:
        """
        Hand one turn's frames to the TLS layer as one write.

        Our TLS layer (L{BulkTLSMemoryBIOProtocol}) encrypts a write before
        it returns and copies whatever it must keep, so the frames are
        joined into a buffer reused turn after turn (L{_turn_scratch}), not
        into a new quarter-MiB object each turn.  Any other transport (an
        in-memory one in tests) keeps what it is given: it gets bytes.
        """
        size = sum(map(len, pieces))
        scratch = _turn_scratch() if size <= TURN_SCRATCH and isinstance(self.transport, BulkTLSMemoryBIOProtocol) else None
        if scratch is None:
            self.transport.write(b"".join(pieces))
            return
        position = 0
        for piece in pieces:
            end = position + len(piece)
            scratch[position:end] = piece
            position = end
        self.transport.write(memoryview(scratch)[:size])

    def _end_stream(self, stream: _Stream, reason: m.EndReason) -> None:
        self._drop_stream(stream.stream_id)
        try:
            status = stream.job.status()
        except Exception:
            log.failure("cannot read the status of job {job_id}", job_id=stream.job.job_id)
            status = _minimal_status(stream.job.job_id, m.JobState.LOST, "the server cannot read this job's status")
            reason = m.EndReason.SERVER_ERROR
        self._respond(m.EndOfStream(stream.stream_id, reason, status))

    def _drop_stream(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None:
            self.factory.stream_closed(self.identity.name)  # type: ignore[union-attr]
        subscription = self._subscriptions.pop(stream_id, None)
        if stream is not None and subscription is not None:
            stream.job.output.unsubscribe(subscription)


# A turn's frames: TURN_BYTES of data and the heads of its frames and gaps
# (a few hundred bytes); one buffer per reactor thread, for every connection.
TURN_SCRATCH = TURN_BYTES + (64 << 10)
_scratch = threading.local()


def _turn_scratch() -> bytearray:
    buffer = getattr(_scratch, "turn", None)
    if buffer is None:
        buffer = _scratch.turn = bytearray(TURN_SCRATCH)
    return buffer


def _minimal_status(job_id: uuid.UUID, state: m.JobState, error: str) -> m.JobStatus:
    """
    A status that can always be encoded, for a job whose own cannot.
    """
    return m.JobStatus(job_id=job_id, owner="", argv=(), state=state, error=error, abridged=True)


def _fallback(response: m.Message) -> m.Message:
    """
    What to send in place of a response or stream end that cannot be
    encoded.
    """
    if isinstance(response, m.EndOfStream):
        state = response.status.state if isinstance(response.status.state, m.JobState) else m.JobState.LOST
        status = _minimal_status(response.status.job_id, state, "the server cannot encode this job's status")
        return m.EndOfStream(response.stream_id, m.EndReason.SERVER_ERROR, status)
    request_id = getattr(response, "request_id", None)
    if request_id is None:
        raise ValueError(f"no fallback for {type(response).__name__}")
    return m.ErrorResponse(request_id, int(ErrorCode.INTERNAL), "internal server error: the response cannot be encoded")


_OPERATIONS = {
    m.StartRequest: Operation.START,
    m.StopRequest: Operation.STOP,
    m.SignalRequest: Operation.STOP,
    m.StatusRequest: Operation.STATUS,
    m.ListRequest: Operation.LIST,
    m.WaitRequest: Operation.WAIT,
    m.RemoveRequest: Operation.REMOVE,
    m.FollowRequest: Operation.LOGS,
}


class ServerFactory(Factory):
    """
    Makes a L{ServerProtocol} per connection (wrap it in TLS to serve).
    """

    def __init__(
        self,
        manager: JobManager,
        reactor: Any,
        *,
        server_name: str = "jobworker",
        limits: ServerLimits | None = None,
    ) -> None:
        self.manager = manager
        self.reactor = reactor
        self.server_name = server_name
        self.server_version = f"jobworker {__version__}"
        self.limits = limits or ServerLimits()
        # Open connections: all of them, and those past the handshake by
        # identity; open output streams by identity.
        self.open_connections = 0
        self._connections_of: dict[str, int] = {}
        self._streams_of: dict[str, int] = {}
        self._partial_of: dict[str, int] = {}
        self._audit_limit = RateLimit(self.limits.audit_burst, self.limits.audit_interval_s)
        self._audit_timer: Any = None
        self._release_call: Any = None

    def buildProtocol(self, addr: Any) -> ServerProtocol:
        return ServerProtocol(self)

    def doStop(self) -> None:
        self.stop_audit_timer()
        if self._release_call is not None and self._release_call.active():
            self._release_call.cancel()
        self._release_call = None
        super().doStop()

    # -- accounting (ServerLimits.max_connections and friends) ------------------

    def connection_opened(self) -> bool:
        """
        Count a new connection; False (and not counted) when it is one too many.
        """
        if self.open_connections >= self.limits.max_connections:
            return False
        self.open_connections += 1
        return True

    def identity_connected(self, identity: str) -> bool:
        """
        Count a connection as C{identity}'s; False (and not counted) when it
        is one too many for it.
        """
        count = self._connections_of.get(identity, 0)
        if count >= self.limits.max_connections_per_identity:
            return False
        self._connections_of[identity] = count + 1
        return True

    def connection_closed(self, identity: str | None) -> None:
        self.open_connections -= 1
        if identity is not None:
            _decrement(self._connections_of, identity)
        if self._release_call is None:
            # What the connection held (its buffers) is free now, but the
            # allocator keeps it resident unless told otherwise.
            self._release_call = self.reactor.callLater(RELEASE_MEMORY_EVERY_S, self._release_memory)

    def _release_memory(self) -> None:
        self._release_call = None
        release_free_memory()

    def partial_held(self, identity: str, change: int) -> int:
        """
        Add C{change} to the bytes of unfinished frames C{identity} holds on
        all its connections; return the new total.
        """
        total = self._partial_of.get(identity, 0) + change
        if total > 0:
            self._partial_of[identity] = total
        else:
            self._partial_of.pop(identity, None)
        return max(total, 0)

    def connections_of(self, identity: str) -> int:
        return self._connections_of.get(identity, 0)

    def streams_of(self, identity: str) -> int:
        return self._streams_of.get(identity, 0)

    def stream_opened(self, identity: str) -> None:
        self._streams_of[identity] = self._streams_of.get(identity, 0) + 1

    def stream_closed(self, identity: str) -> None:
        _decrement(self._streams_of, identity)

    # -- audit rate limit --------------------------------------------------------

    def audit(self, identity: str, kind: str) -> bool:
        """
        May an audit line of C{identity}'s, of C{kind} ("operation
        verdict"), be written now?  Summaries due are written first.
        """
        admitted, due = self._audit_limit.admit(identity, kind, self.reactor.seconds())
        self._log_suppressed(due)
        if not admitted and self._audit_timer is None:
            # The summary must come when the interval ends, not whenever
            # the identity next makes a request.
            self._audit_timer = self.reactor.callLater(self.limits.audit_interval_s, self._audit_interval_ended)
        return admitted

    def _audit_interval_ended(self) -> None:
        self._audit_timer = None
        self._log_suppressed(self._audit_limit.expire(self.reactor.seconds()))
        if self._audit_limit.pending():
            self._audit_timer = self.reactor.callLater(self.limits.audit_interval_s, self._audit_interval_ended)

    def stop_audit_timer(self) -> None:
        """
        Write what is held back and stop the timer (at shutdown).
        """
        if self._audit_timer is not None and self._audit_timer.active():
            self._audit_timer.cancel()
        self._audit_timer = None
        self._log_suppressed(self._audit_limit.expire(float("inf")))

    def _log_suppressed(self, due: list[Suppressed]) -> None:
        for summary in due:
            log.warn(
                "audit suppressed={count} identity={identity} interval={interval}s kinds={kinds}",
                count=summary.count,
                identity=log_value(summary.key),
                interval=f"{summary.interval_s:g}",
                kinds=log_value(", ".join(f"{kind}: {n}" for kind, n in sorted(summary.by_kind.items()))),
                audit=True,
                suppressed=summary.count,
            )


def _tls_reason(reason: Failure | None) -> str:
    """
    Why a TLS handshake failed, in OpenSSL's words where it gave some.
    """
    if reason is None:
        return "connection closed"
    value = reason.value
    errors = getattr(value, "args", ())
    if errors and isinstance(errors[0], list) and errors[0]:
        # pyOpenSSL: [(library, function, reason), ...]
        return "; ".join(str(error[-1]) for error in errors[0] if isinstance(error, tuple)) or str(value)
    return f"{type(value).__name__}: {value}" if str(value) else type(value).__name__


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
