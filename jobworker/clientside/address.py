"""
A server's address as a user writes it: C{HOST:PORT}, C{[IPv6]:PORT}, or
C{unix:PATH}.
"""

from __future__ import annotations

__all__ = ["DEFAULT_PORT", "UnixAddress", "parse_address"]

# The port a server listens on unless told otherwise (see the twistd
# plugin's --listen).
DEFAULT_PORT = 8443


class UnixAddress(str):
    """
    The path of a server's UNIX socket (C{jobcli --server unix:PATH}).  TLS
    runs over it as over TCP; the server's certificate must name
    L{UnixAddress.tls_name}, C{localhost}, as a development PKI's does.
    """

    tls_name = "localhost"


def parse_address(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int] | UnixAddress:
    """
    Split C{HOST:PORT} (C{[::1]:8443} for IPv6); the port is optional.
    C{unix:PATH} names a UNIX socket.

    @raise ValueError: an address that is none of these, or a port outside
        1..65535.
    """
    if address.startswith("unix:"):
        if not address[5:]:
            raise ValueError(f"bad address {address!r}: no socket path")
        return UnixAddress(address[5:])
    host, port = address, default_port
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise ValueError(f"bad address {address!r}")
        host = address[1:end]
        rest = address[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad address {address!r}")
            port = int(rest[1:])
    elif address.count(":") == 1:
        host, _, port_text = address.partition(":")
        port = int(port_text)
    if not host or not 0 < port < 65536:
        raise ValueError(f"bad address {address!r}")
    return host, port
