"""
Every error the service reports, with its stable wire code.

Two tiers, as in h11 and h2:

  - L{ProtocolError}: the peer broke the wire protocol (a malformed frame, an
    oversized length, an unknown message type).  The connection cannot be
    trusted any more; the receiver sends one C{GOAWAY} with the code and
    closes.
  - L{RequestError}: one request failed (unknown job, permission denied, bad
    limits, command not found).  It is answered with an C{ERROR} message
    carrying the request id; the connection and every other request on it go
    on.

The numeric values of L{ErrorCode} are part of the wire format
(C{protocol-spec/README.md}); never renumber them.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = [
    "ErrorCode",
    "JobworkerError",
    "ProtocolError",
    "RequestError",
]


class ErrorCode(IntEnum):
    # Request tier: the connection stays up.
    INTERNAL = 1
    BAD_REQUEST = 2
    NOT_FOUND = 3
    PERMISSION_DENIED = 4
    INVALID_LIMITS = 5
    COMMAND_NOT_FOUND = 6
    COMMAND_NOT_EXECUTABLE = 7
    START_FAILED = 8
    TOO_MANY_JOBS = 9
    TOO_MANY_STREAMS = 10
    JOB_FINISHED = 11
    JOB_RUNNING = 12
    UNSUPPORTED_LIMIT = 13
    SHUTTING_DOWN = 14
    TOO_MANY_REQUESTS = 15
    OUT_OF_RESOURCES = 16  # the server's disk, descriptors or processes ran out
    NAME_IN_USE = 17  # another job of the same owner, not removed, has the name
    # Connection tier: sent in GOAWAY, then the connection closes.
    PROTOCOL_ERROR = 100
    FRAME_TOO_LARGE = 101
    UNKNOWN_MESSAGE = 102
    UNSUPPORTED_VERSION = 103
    FLOW_CONTROL_ERROR = 104
    TIMEOUT = 105
    TOO_MANY_CONNECTIONS = 106


class JobworkerError(Exception):
    """
    Base of every error with a stable code.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.name}, {self.message!r})"


class ProtocolError(JobworkerError):
    """
    The peer violated the wire protocol; the connection must close.
    """

    code = ErrorCode.PROTOCOL_ERROR


class RequestError(JobworkerError):
    """
    One request failed; the connection goes on.
    """

    code = ErrorCode.BAD_REQUEST
