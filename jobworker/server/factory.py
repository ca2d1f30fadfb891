"""
What all of a server's connections share: their limits (L{ServerLimits}),
the factory that makes one L{ServerProtocol} per connection and counts what
they hold (connections, streams and unfinished frames, by identity), and
the rate limit of the audit log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.protocol import Factory

from jobworker import __version__
from jobworker.audit import RateLimit, Suppressed, log_value
from jobworker.errors import ErrorCode, ProtocolError
from jobworker.host.memory import release_free_memory
from jobworker.jobs.manager import JobManager
from jobworker.logs import Logger
from jobworker.protocol.connection import DEFAULT_MAX_FRAME_SIZE
from jobworker.protocol.keepalive import DEFAULT_KEEPALIVE_INTERVAL
from jobworker.server.connection import ServerProtocol

__all__ = ["ServerFactory", "ServerLimits"]

log = Logger()

# After a connection closes, freed memory goes back to the kernel at most
# this often (see jobworker.host.memory), seconds.
RELEASE_MEMORY_EVERY_S = 1.0


@dataclass(frozen=True, kw_only=True)
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

    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 300.0
    keepalive_interval_s: float = DEFAULT_KEEPALIVE_INTERVAL
    max_pending_requests: int = 128
    max_streams: int = 256
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    frame_timeout_s: float = 30.0
    max_connections: int = 512
    max_connections_per_identity: int = 128
    max_streams_per_identity: int = 256
    max_partial_bytes_per_identity: int = 32 << 20
    audit_burst: int = 1000
    audit_interval_s: float = 10.0


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
        super().doStop()  # type: ignore[no-untyped-call]  # Twisted's, unannotated

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

    def admit_identity(self, identity: str, peer: str) -> ProtocolError | None:
        """
        Count a connection whose handshake is done as C{identity}'s; the
        error to close it with (logged here) when it is one too many.
        """
        if self.identity_connected(identity):
            return None
        limit = self.limits.max_connections_per_identity
        log.warn(
            "refusing connection from {peer}: too many connections for {identity} (--max-connections-per-identity {limit})",
            peer=peer,
            identity=log_value(identity),
            limit=limit,
        )
        return ProtocolError(
            f"identity {identity!r} already has {limit} connections open, the most allowed",
            ErrorCode.TOO_MANY_CONNECTIONS,
        )

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

    def hold_partial(self, identity: str, change: int, peer: str) -> ProtocolError | None:
        """
        Add C{change} bytes to C{identity}'s unfinished frames; the error to
        close the connection from C{peer} with (logged here) when the total
        is over C{max_partial_bytes_per_identity}.
        """
        total = self.partial_held(identity, change)
        limit = self.limits.max_partial_bytes_per_identity
        if total <= limit:
            return None
        log.warn(
            "closing connection from {peer}: {identity} has {total} bytes of unfinished frames on its connections (limit {limit})",
            peer=peer,
            identity=log_value(identity),
            total=total,
            limit=limit,
        )
        return ProtocolError(
            f"identity {identity!r} has more than {limit} bytes of unfinished frames on its connections",
            ErrorCode.TOO_MANY_CONNECTIONS,
        )

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


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)
