"""
The clocks of one client connection, beside TLS's handshake timeout
(Twisted's C{TimeoutMixin} on the connection):

  - the frame timer: a frame must arrive whole within C{frame_timeout_s} of
    its first byte, so a client trickling one byte at a time cannot hold a
    receive buffer, or keep the idle timer from firing, for long;
  - the idle timer: a connection idle (hello done, no pending request, no
    open stream: spec section 5.7) for C{idle_timeout_s} without a break
    is closed;
  - keep-alive (L{jobworker.protocol.keepalive}): after
    C{keepalive_interval_s} of silence the client is pinged, and the
    connection closed when the ping goes unanswered for as long again.

Each closes the connection through L{TimedConnection.fail} with a
C{TIMEOUT} error, after a log line naming the peer.  Every delay is in
seconds and read through the connection's reactor, so tests run them on a
L{task.Clock <twisted.internet.task.Clock>}.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Protocol

from jobworker.errors import ErrorCode, ProtocolError
from jobworker.logs import Logger
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection
from jobworker.protocol.keepalive import KeepAlive, Verdict

if TYPE_CHECKING:
    from jobworker.server.factory import ServerLimits

__all__ = ["ConnectionTimers", "TimedConnection"]

log = Logger()


class TimedConnection(Protocol):
    """
    What L{ConnectionTimers} needs of its connection.
    """

    reactor: Any
    limits: ServerLimits
    conn: Connection
    peer: str
    connected: int | bool
    transport: Any

    def fail(self, error: ProtocolError) -> None: ...


class ConnectionTimers:
    """
    The frame timer, the idle timer and keep-alive of one connection; see
    the module docstring.
    """

    def __init__(self, connection: TimedConnection) -> None:
        # Weakly: the connection holds these timers, and a cycle would keep
        # a lost connection's buffers until the garbage collector's next
        # full pass.  A connection that is gone has no timers running
        # (it stops them when lost).
        self._connection = weakref.ref(connection)
        # Fires when the frame being received is late (frame_timeout_s).
        self._frame_timer: Any = None
        # The idle timer runs only while the connection is idle (spec 5.7).
        self._idle_call: Any = None
        self._keepalive: KeepAlive | None = None
        self._keepalive_call: Any = None

    @property
    def connection(self) -> TimedConnection:
        connection = self._connection()
        assert connection is not None, "the connection stops its timers when it is lost"
        return connection

    # -- frames ------------------------------------------------------------------

    def watch_frame(self, *, new_frame: bool, reading: bool) -> None:
        """
        Time the frame being received: from its first byte, it has
        C{frame_timeout_s}.  C{new_frame}: frames completed since the last
        call, so what is buffered now is a later frame's start.
        C{reading}: whether the connection reads the socket at all (a frame
        it stopped reading is not the client's delay).
        """
        connection = self.connection
        timer = self._frame_timer
        if connection.conn.receive_buffered and reading and connection.connected:
            if timer is not None and timer.active() and not new_frame:
                return
            if timer is not None and timer.active():
                timer.cancel()
            self._frame_timer = connection.reactor.callLater(connection.limits.frame_timeout_s, self._frame_late)
        elif timer is not None:
            if timer.active():
                timer.cancel()
            self._frame_timer = None

    def stop_frame_timer(self) -> None:
        if self._frame_timer is not None and self._frame_timer.active():
            self._frame_timer.cancel()
        self._frame_timer = None

    def _frame_late(self) -> None:
        self._frame_timer = None
        connection = self.connection
        timeout = connection.limits.frame_timeout_s
        log.info(
            "closing connection from {peer}: a frame took over {timeout} s to arrive ({size} bytes so far)",
            peer=connection.peer,
            timeout=timeout,
            size=connection.conn.receive_buffered,
        )
        connection.fail(ProtocolError(f"a frame took longer than {timeout:g} s to arrive", ErrorCode.TIMEOUT))

    # -- idleness ----------------------------------------------------------------

    def update_idle(self, idle: bool) -> None:
        """
        Run the idle timer exactly while the connection is C{idle}; it
        starts afresh each time the connection becomes idle.
        """
        if not idle:
            self.cancel_idle()
        elif self._idle_call is None:
            self._idle_call = self.connection.reactor.callLater(self.connection.limits.idle_timeout_s, self._idle_expired)

    def cancel_idle(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None

    def _idle_expired(self) -> None:
        self._idle_call = None
        connection = self.connection
        log.info("closing idle connection from {peer}", peer=connection.peer)
        connection.fail(ProtocolError(f"idle for {connection.limits.idle_timeout_s:g} s", ErrorCode.TIMEOUT))

    # -- keep-alive --------------------------------------------------------------

    def start_keepalive(self) -> None:
        """
        The hello exchange is done: start pinging a silent client, unless
        C{keepalive_interval_s} is 0.
        """
        interval = self.connection.limits.keepalive_interval_s
        if interval and interval > 0:
            self._keepalive = KeepAlive(interval, self.connection.reactor.seconds())
            self._schedule_keepalive()

    def received(self) -> None:
        """
        Bytes came from the client: a sign of life.
        """
        if self._keepalive is not None:
            self._keepalive.received(self.connection.reactor.seconds())

    def _schedule_keepalive(self) -> None:
        assert self._keepalive is not None
        delay = max(0.0, self._keepalive.deadline() - self.connection.reactor.seconds())
        self._keepalive_call = self.connection.reactor.callLater(delay, self._keepalive_due)

    def _keepalive_due(self) -> None:
        self._keepalive_call = None
        keepalive = self._keepalive
        connection = self.connection
        if keepalive is None or connection.conn.is_closed or not connection.connected:
            return
        verdict = keepalive.check(connection.reactor.seconds())
        if verdict is Verdict.DEAD:
            log.info("closing connection from {peer}: no answer to a keep-alive ping", peer=connection.peer)
            connection.fail(
                ProtocolError(f"keep-alive timeout: no answer to a ping within {keepalive.interval:g} s", ErrorCode.TIMEOUT)
            )
            return
        if verdict is Verdict.PING:
            connection.transport.write(connection.conn.send(m.Ping(keepalive.ping_data())))
        self._schedule_keepalive()

    def stop(self) -> None:
        """
        Stop the idle timer and keep-alive (the connection is closing); the
        frame timer stops when the connection is lost.
        """
        self.cancel_idle()
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None
        self._keepalive = None
