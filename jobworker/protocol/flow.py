"""
Per-stream flow control: byte credits granted by the receiver.

Each output stream has a window: the bytes of output data the server may
still send on it.  The client opens the stream with an initial window and
adds to it with C{WindowUpdate} as it consumes data.  A server whose window
is 0 sends nothing more on that stream, so a client that stops reading one
stream stops that stream only; other streams and requests on the connection
go on (as in HTTP/2, RFC 9113 section 5.2).
"""

from __future__ import annotations

from jobworker.errors import ErrorCode, ProtocolError

__all__ = ["DEFAULT_WINDOW", "MAX_WINDOW", "SendWindow", "ReceiveWindow"]

# The largest window a stream may have, as in HTTP/2: it keeps windows in
# 31 bits and lets a receiver grant at most 2 GiB of unread data.
MAX_WINDOW = 2**31 - 1
# The window both clients grant a follow unless told otherwise, in bytes:
# the most output of one stream that may be on its way to a client, sent but
# not yet consumed.  8 MiB keeps a fast path busy between two window
# updates (the clients give credit back in batches of half the window).
DEFAULT_WINDOW = 8 << 20


class SendWindow:
    """
    The sender's view: how many bytes it may still send.
    """

    def __init__(self, initial: int) -> None:
        if not 0 <= initial <= MAX_WINDOW:
            raise ProtocolError(f"initial window {initial} out of range", ErrorCode.FLOW_CONTROL_ERROR)
        self.available = initial

    def consume(self, size: int) -> None:
        if size > self.available:
            raise ValueError(f"sending {size} bytes with only {self.available} of window")
        self.available -= size

    def grant(self, increment: int) -> None:
        if increment <= 0 or self.available + increment > MAX_WINDOW:
            raise ProtocolError(
                f"window update of {increment} makes the window invalid",
                ErrorCode.FLOW_CONTROL_ERROR,
            )
        self.available += increment


class ReceiveWindow:
    """
    The receiver's view: what it granted, and when to grant more.

    Credit is returned in batches of at least half the window, so a stream of
    small outputs does not cost one update frame each.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.outstanding = size  # bytes the sender may send before we grant more
        self._consumed = 0  # bytes processed and not yet granted back

    def received(self, size: int) -> None:
        if size > self.outstanding:
            raise ProtocolError(
                f"peer sent {size} bytes with {self.outstanding} of window left",
                ErrorCode.FLOW_CONTROL_ERROR,
            )
        self.outstanding -= size

    def granted(self, increment: int) -> None:
        """
        Record credit granted by an explicit C{WindowUpdate}.
        """
        self.outstanding += increment

    def consumed(self, size: int) -> int:
        """
        Record that C{size} bytes were processed; return the credit to grant
        now, or 0 to wait for more.
        """
        self._consumed += size
        if self._consumed * 2 < self.size:
            return 0
        increment, self._consumed = self._consumed, 0
        self.outstanding += increment
        return increment
