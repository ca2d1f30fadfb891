"""
The TCP transport under a client connection's TLS, set up for streaming
(L{tune_transport}), and how a failed TLS handshake is told in the log
(L{tls_reason}).

This is the one module of the server that reaches into Twisted's TCP
connection (C{bufferSize}, C{SEND_LIMIT}, C{doRead}, C{_dataReceived}):
each use is guarded by C{hasattr}, so a transport without them (a UNIX
socket's, a test's L{StringTransport}) is simply left as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure

__all__ = ["READ_SIZE", "WRITE_BUFFER", "tls_reason", "tune_transport"]

# Bytes of encrypted output one connection may hold in user space before
# the pump is paused.
WRITE_BUFFER = 512 << 10
# Bytes read from the socket at once.  Twisted reads bufferSize bytes, which
# tune_transport raises to WRITE_BUFFER for the writes; but each read goes
# whole into OpenSSL's memory BIO, which keeps the largest buffer it ever
# held, so a client sending fast would leave 512 KiB behind per connection.
# What clients send is small (requests): 64 KiB, Twisted's own default.
READ_SIZE = 64 << 10


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


def tls_reason(reason: Failure | None) -> str:
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
