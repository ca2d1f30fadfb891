"""
The C{since} of a follow, as both clients take it: seconds since the epoch
(a float, as C{time.time()} gives) on the library side, microseconds on the
wire (C{FollowRequest.since}, spec section 8.7).
"""

from __future__ import annotations

__all__ = ["since_microseconds"]


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
