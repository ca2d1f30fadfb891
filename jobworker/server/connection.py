"""
One client connection of the server (L{ServerProtocol}): a thin Twisted
layer over the sans-IO L{Connection} and the L{JobManager}.

    TLS handshake (identity from the verified client certificate)
      -> ServerHello -> ClientHello -> requests ...

This module keeps the connection's life (hello, the handshake, idle and
keep-alive timers, GoAway, the close), its inbox and the dispatch of
requests.  What each request is answered lives in L{jobworker.server.requests};
output streaming in L{jobworker.server.streams}; what all connections
share (limits, counts by identity, the audit rate limit) in
L{jobworker.server.factory}; the connection's timers in
L{jobworker.server.timers}; the TCP transport's tuning in
L{jobworker.server.transport}.  What stays here (about 480 lines) is one
cohesive thing: the states of one connection and the order in which its
frames are taken in, answered and closed, which read best together.

The connection keeps one table of requests: those answered later (start,
wait) by request id, with the L{Deferred} to cancel when the connection
goes (L{ServerProtocol.waiting}); which ids are pending at all is the
core's to know (C{conn.pending_requests}, C{conn.is_pending}).  It keeps
one table of streams (L{ServerProtocol.streams}); each stream carries its
own subscription to its job's output.  A follower learns that its job was
removed from the job manager's removal event (C{manager.on_removed}), to
which the connection subscribes while it has streams.

Responses are flow controlled the same way as output
====================================================

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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker.audit import log_value
from jobworker.errors import ErrorCode, ProtocolError
from jobworker.logs import Logger
from jobworker.policy import Identity, Role
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection, Role as WireRole
from jobworker.server.requests import answer, fallback, minimal_status
from jobworker.server.streams import TURN_BYTES, TURN_SCRATCH, Stream, StreamPump, send_turn, turn_scratch
from jobworker.server.timers import ConnectionTimers
from jobworker.server.transport import WRITE_BUFFER, tls_reason, tune_transport
from jobworker.tls import BulkTLSMemoryBIOProtocol, drop_traceback, peer_names

if TYPE_CHECKING:
    from jobworker.jobs.manager import JobManager
    from jobworker.server.factory import ServerFactory

__all__ = ["ServerProtocol", "ABORT_GRACE_S", "INBOX_TURN", "MAX_ERROR_MESSAGE", "TURN_BYTES", "WRITE_BUFFER"]

log = Logger()

# Time to drain a GOAWAY before the connection is aborted.
ABORT_GRACE_S = 5.0
# Requests one connection has served per turn of the reactor; the rest wait
# for the next turn, after the other connections' (one read of 64 KiB can
# hold 2,600 status requests: a fifth of a second of the server's time).
INBOX_TURN = 64
# Error messages are cut to this many characters: they may quote client
# input (an environment variable name), and must always fit a frame.
MAX_ERROR_MESSAGE = 1000


@implementer(IHandshakeListener)
class ServerProtocol(Protocol, TimeoutMixin):
    """
    One client connection.
    """

    # The TLS transport (a TLSMemoryBIOProtocol) from connectionMade on: it
    # is an ITransport, an ITLSTransport, a consumer and a producer, and can
    # abort; Twisted's Protocol types it Optional[ITransport], which names
    # none of that but write and loseConnection.
    transport: Any
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
        # Output streams open on this connection, by stream id.
        self.streams: dict[int, Stream] = {}
        self.pump = StreamPump(self)
        # Requests answered later (start, wait), by request id: the answer
        # to cancel when the connection goes (see the module docstring).
        self.waiting: dict[int, defer.Deferred[Any]] = {}
        self._abort_call: Any = None
        self._goaway_sent = False
        self.peer = "?"
        # Ends our subscription to the manager's removal event; held while
        # this connection has streams.
        self._unsubscribe_removed: Callable[[], None] | None = None
        # Whether reading from the socket is paused because received frames
        # wait to be served (see "Responses are flow controlled" in the
        # module docstring; the core keeps them until next_message).
        self._reading_paused = False
        self._inbox_turn: Any = None  # the next turn of serve_inbox, if due
        self.timers = ConnectionTimers(self)

    # Twisted's TimeoutMixin reads the clock from here.
    def callLater(self, delay: float, call: Callable[..., Any], *args: Any) -> Any:
        return self.reactor.callLater(delay, call, *args)

    # -- connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"
        if not self.factory.connection_opened():
            log.warn(
                "refusing connection from {peer}: {count} connections open, the most allowed (--max-connections)",
                peer=self.peer,
                count=self.factory.open_connections,
                limit="max-connections",
            )
            self.transport.abortConnection()
            return
        self._counted = True
        self.setTimeout(self.limits.handshake_timeout_s)  # type: ignore[no-untyped-call]  # TimeoutMixin, unannotated
        tune_transport(self.transport)
        self.transport.registerProducer(self.pump, True)

    def handshakeCompleted(self) -> None:
        certificate = self.transport.getPeerCertificate()
        name, unit = peer_names(certificate) if certificate is not None else (None, None)
        self.identity = Identity(name or "", Role.from_ou(unit))
        log.info("connection from {peer} as {identity}", peer=self.peer, identity=log_value(str(self.identity)))
        refusal = self.factory.admit_identity(self.identity.name, self.peer)
        if refusal is not None:
            self.fail(refusal)
            return
        self._identity_counted = True
        hello = m.ServerHello(
            self.conn.version,
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
        log.info("closing handshake timed-out connection from {peer}", peer=self.peer)
        self.fail(ProtocolError("handshake timeout", ErrorCode.TIMEOUT))

    def dataReceived(self, data: bytes) -> None:
        if self.identity is None:
            # TLS delivers application data only after the handshake; this
            # guards a transport that would not.
            self.fail(ProtocolError("data before the TLS handshake completed"))
            return
        self.timers.received()
        try:
            self.conn.feed(data)
        except ProtocolError as error:
            log.info("protocol error from {peer}: {error}", peer=self.peer, error=error.message)
            self.fail(error)
            return
        self.timers.watch_frame(new_frame=self.conn.frames_waiting, reading=not self._reading_paused)
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
        refusal = self.factory.hold_partial(name, held - self._partial_held, self.peer)
        self._partial_held = held
        if refusal is None:
            return True
        self.fail(refusal)
        return False

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
            log.info("protocol error from {peer}: {error}", peer=self.peer, error=error.message)
            self.fail(error)
            return
        waiting = bool(self.conn.frames_waiting and not self._goaway_sent and self.connected)
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
            self.timers.watch_frame(new_frame=True, reading=not self._reading_paused)
        self._update_idle()

    def _opened(self) -> None:
        """
        The hello exchange is complete: the handshake timer gives way to the
        idle timer and the keep-alive.
        """
        self.setTimeout(None)  # type: ignore[no-untyped-call]  # TimeoutMixin, unannotated
        self.timers.start_keepalive()

    def _update_idle(self) -> None:
        """
        Run the idle timer exactly while the connection is idle: hello done,
        no pending request, no open stream (spec section 5.7).
        """
        busy = bool(self.streams) or self.conn.pending_requests > 0
        self.timers.update_idle(not busy and self.conn.is_open and not self._goaway_sent)

    def _stop_timers(self) -> None:
        self.setTimeout(None)  # type: ignore[no-untyped-call]  # TimeoutMixin, unannotated
        self.timers.stop()

    def fail(self, error: ProtocolError) -> None:
        """
        End the connection for C{error}: a C{GoAway} with its code (once),
        then the close; before TLS has finished, an abort.
        """
        if self.identity is None:
            # TLS never completed: nothing can be said to this peer.
            self.setTimeout(None)  # type: ignore[no-untyped-call]  # TimeoutMixin, unannotated
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
                peer=self.peer,
                reason=log_value(tls_reason(reason)),
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
        self.timers.stop_frame_timer()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        for stream_id in list(self.streams):
            self._drop_stream(stream_id)
        for wait in list(self.waiting.values()):
            wait.cancel()
        self.waiting.clear()
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
                "client {peer} went away: {code} {message}", peer=self.peer, code=message.code, message=log_value(message.message)
            )
            self._goaway_sent = True
            self._close()
            for wait in list(self.waiting.values()):
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
                self.end_stream(stream, m.EndReason.CANCELLED)
            return
        # A request ends idleness; the timer starts afresh once the
        # connection is idle again (spec section 5.7).
        self.timers.cancel_idle()
        answer(self, message)

    def respond(self, response: m.Message) -> None:
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
            log.failure("cannot send {kind} to {peer}", kind=type(response).__name__, peer=self.peer)
            frame = self.conn.send(fallback(response))
        self.transport.write(frame)
        self._update_idle()

    # -- streams ---------------------------------------------------------------

    def open_stream(self, stream_id: int, job: Any, offset: int, follow: bool, timestamps: bool = False) -> None:
        """
        Open a follower's stream (the follow request was answered): it is
        served from the next turn of the pump on.
        """
        assert self.identity is not None
        stream = Stream(stream_id, job, offset, follow, self.pump.wake, timestamps)
        self.streams[stream_id] = stream
        self.factory.stream_opened(self.identity.name)
        job.output.subscribe(stream.subscription)
        if self._unsubscribe_removed is None:
            self._unsubscribe_removed = self.manager.on_removed(self._job_removed)
        self.pump.wake()

    def _job_removed(self, job: Any) -> None:
        """
        The job manager removed C{job}: its followers here end (C{REMOVED}),
        whatever of its output they have not read yet.
        """
        for stream in list(self.streams.values()):
            if stream.job is job:
                self.end_stream(stream, m.EndReason.REMOVED)

    def serve_stream(self, stream: Stream) -> int:
        """
        Send what one turn allows on C{stream} (L{send_turn}); return how
        much progress it made (data bytes sent, at least 1 when only a gap
        went out), and end the stream when it is done.
        """
        sent, end = send_turn(self.conn, stream, self._write_turn)
        if end is not None:
            self.end_stream(stream, end)
        return sent

    def _write_turn(self, pieces: list[bytes | memoryview]) -> None:
        """
        Hand one turn's frames to the TLS layer as one write.

        Our TLS layer (L{BulkTLSMemoryBIOProtocol}) encrypts a write before
        it returns and copies whatever it must keep, so the frames are
        joined into a buffer reused turn after turn (L{turn_scratch}), not
        into a new quarter-MiB object each turn.  Any other transport (an
        in-memory one in tests) keeps what it is given: it gets bytes.
        """
        size = sum(map(len, pieces))
        scratch = turn_scratch() if size <= TURN_SCRATCH and isinstance(self.transport, BulkTLSMemoryBIOProtocol) else None
        if scratch is None:
            self.transport.write(b"".join(pieces))
            return
        position = 0
        for piece in pieces:
            end = position + len(piece)
            scratch[position:end] = piece
            position = end
        self.transport.write(memoryview(scratch)[:size])

    def end_stream(self, stream: Stream, reason: m.EndReason) -> None:
        """
        Close C{stream} and tell the client why, with its job's status.
        """
        self._drop_stream(stream.stream_id)
        try:
            status = stream.job.status()
        except Exception:
            log.failure("cannot read the status of job {job_id}", job_id=stream.job.job_id)
            status = minimal_status(stream.job.job_id, m.JobState.LOST, "the server cannot read this job's status")
            reason = m.EndReason.SERVER_ERROR
        self.respond(m.EndOfStream(stream.stream_id, reason, status))

    def _drop_stream(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        self.factory.stream_closed(self.identity.name if self.identity else "")
        stream.job.output.unsubscribe(stream.subscription)
        if not self.streams and self._unsubscribe_removed is not None:
            self._unsubscribe_removed()
            self._unsubscribe_removed = None
