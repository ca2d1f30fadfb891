"""
TLS 1.3 for the blocking client over a connected socket, through the
standard library's memory BIOs (L{TLSChannel}): one C{recv} per batch of
records rather than two per record.
"""

from __future__ import annotations

import socket
import ssl

__all__ = ["CIPHER_READ", "TLSChannel"]

# The most ciphertext taken from the kernel by one recv (see TLSChannel).
CIPHER_READ = 256 << 10


class TLSChannel:
    """
    TLS 1.3 over a connected socket, through a pair of memory BIOs.

    An C{ssl.SSLSocket} has OpenSSL read the socket itself, one TLS record
    at a time: a read of the record's 5-byte header, then one of its body,
    so 130 000 system calls per GiB received.  Here one C{recv} takes all the
    kernel holds, up to L{CIPHER_READ}, and OpenSSL then decrypts record
    after record from memory.  The interface is the part of C{SSLSocket}'s
    that L{BlockingClient} uses, with the same errors: C{ssl.SSLError} for
    TLS failures and alerts, C{OSError} (C{socket.timeout} among them) from
    the socket.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, host: str) -> None:
        self.socket = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=host)
        self._cipher = bytearray(CIPHER_READ)
        self._cipher_view = memoryview(self._cipher)

    def handshake(self) -> None:
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        # Whatever OpenSSL wrote (handshake, data, a KeyUpdate reply) goes out.
        if self._outgoing.pending:
            self.socket.sendall(self._outgoing.read())

    def _fill(self) -> None:
        size = self.socket.recv_into(self._cipher)
        if size:
            self._incoming.write(self._cipher_view[:size])
        else:
            self._incoming.write_eof()

    def recv_into(self, view: memoryview) -> int:
        """
        Decrypt the next bytes into C{view} (one record at most); 0 at the
        end of the stream, with or without the server's close_notify.
        """
        while True:
            try:
                # Given a buffer, read() returns the count (typeshed knows
                # only the form that returns bytes).
                return self._tls.read(len(view), view)  # type: ignore[return-value]
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
            except ssl.SSLEOFError:
                return 0  # as SSLSocket's suppress_ragged_eofs has it

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[self._tls.write(view) :]
        self._flush()

    def settimeout(self, seconds: float | None) -> None:
        self.socket.settimeout(seconds)

    def buffered(self) -> bool:
        """
        Whether bytes are here already (ciphertext or plaintext), so a read
        may not need the socket.
        """
        return bool(self._incoming.pending or self._tls.pending())

    def fileno(self) -> int:
        return self.socket.fileno()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._tls.cipher()

    def version(self) -> str | None:
        return self._tls.version()

    def close(self) -> None:
        self.socket.close()
