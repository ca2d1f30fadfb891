"""
Keep-alive: when to ping a quiet peer, and when to give up on it.

Pure: the owner passes the time (seconds, any monotonic clock) and does
the I/O.  The rule, the same at both ends (spec section 5.7):

  - after C{interval} seconds in which nothing at all has arrived from the
    peer, send one C{Ping};
  - if nothing arrives during the C{interval} seconds after that ping, the
    peer is dead: send C{GoAway(TIMEOUT)} if possible, and close.

Any bytes from the peer count as a sign of life, not only the C{Pong}, so a
busy connection never pings.  A peer that vanished without closing (its
host died, a cable was pulled, the process was SIGSTOPped) is noticed at
most C{2 * interval} seconds after its last bytes arrived.  The dead-peer
verdict needs a ping that went unanswered for a whole C{interval}: an owner
that could not look at the connection for a while (a blocked write) gets a
chance to read what has arrived meanwhile before it gives up.
"""

from __future__ import annotations

from enum import Enum
from itertools import count

__all__ = ["DEFAULT_KEEPALIVE_INTERVAL", "KeepAlive", "Verdict"]

# Seconds of silence before a ping.  30 s is what OpenSSH users commonly set
# (ServerAliveInterval) and well inside the idle timeouts of NAT boxes and
# load balancers (often 60 s to 5 min), so a quiet connection also stays
# open through them; a vanished peer is noticed within a minute.
DEFAULT_KEEPALIVE_INTERVAL = 30.0


class Verdict(Enum):
    WAIT = "wait"  # nothing to do before deadline()
    PING = "ping"  # send a Ping now
    DEAD = "dead"  # a ping went unanswered: close


class KeepAlive:
    """
    The keep-alive state of one end of a connection.

    @ivar interval: seconds; see the module docstring.  Must be above 0
        (an owner that wants no keep-alive does not make one).
    """

    def __init__(self, interval: float, now: float) -> None:
        if not interval > 0:
            raise ValueError("the keep-alive interval must be above 0 seconds")
        self.interval = interval
        self.last_received = now
        self.ping_sent_at: float | None = None
        self._data = count(1)

    def received(self, now: float) -> None:
        """
        Bytes arrived from the peer.
        """
        self.last_received = now
        self.ping_sent_at = None

    def check(self, now: float) -> Verdict:
        """
        What to do now.  After L{Verdict.PING}, send L{ping_data}'s value in a
        C{Ping}: the verdict counts it as sent.
        """
        if self.ping_sent_at is not None:
            if now - self.ping_sent_at >= self.interval:
                return Verdict.DEAD
            return Verdict.WAIT
        if now - self.last_received >= self.interval:
            self.ping_sent_at = now
            return Verdict.PING
        return Verdict.WAIT

    def ping_data(self) -> int:
        """
        A fresh opaque value for a C{Ping} (u64).
        """
        return next(self._data) & 0xFFFFFFFFFFFFFFFF

    def deadline(self) -> float:
        """
        The time of the next check that can change anything.
        """
        if self.ping_sent_at is not None:
            return self.ping_sent_at + self.interval
        return self.last_received + self.interval
