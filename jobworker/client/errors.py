"""
How the Twisted client's requests and follows fail when their connection
ends first (L{ClientConnectionLost}).
"""

from __future__ import annotations

from twisted.internet.error import ConnectionClosed

from jobworker.errors import ErrorCode, JobworkerError

__all__ = ["ClientConnectionLost"]


class ClientConnectionLost(JobworkerError, ConnectionClosed):
    """
    The connection ended before a request was answered or a stream ended.

    It is both a L{JobworkerError} and Twisted's L{ConnectionClosed}, so
    C{failure.check(ConnectionClosed)} finds it as it finds Twisted's own.

    @ivar code: the code of the server's C{GoAway} or of the protocol error
        that ended the connection; L{ErrorCode.INTERNAL} when the transport
        just went away.
    @ivar reason: the underlying cause, when there is one (the exception of
        the transport's C{connectionLost}, a TLS error for instance).
    """

    def __init__(
        self, message: str, code: ErrorCode | None = None, reason: BaseException | None = None
    ) -> None:
        super().__init__(message, code)
        self.reason = reason

    def __str__(self) -> str:
        return self.message
