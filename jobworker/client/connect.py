"""
Connecting the Twisted client: to an address or endpoint with the
credentials given (L{connect}), or to a server the client configuration
names, as C{jobcli} would (L{connect_configured}).
"""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint

from jobworker.client.protocol import JobworkerClientProtocol
from jobworker.clientside.address import UnixAddress, parse_address
from jobworker.protocol.connection import DEFAULT_MAX_FRAME_SIZE
from jobworker.protocol.keepalive import DEFAULT_KEEPALIVE_INTERVAL

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTCP, IReactorTime

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "connect", "connect_configured"]

StrPath = str | PathLike[str]

# The hello exchange (and the TCP and TLS set-up before it) must end within
# this many seconds, as for the blocking client.
DEFAULT_CONNECT_TIMEOUT = 30.0


def connect(
    reactor: IReactorTCP | IReactorTime | Any,
    endpoint_or_address: IStreamClientEndpoint | tuple[str, int] | str,
    *,
    ca: StrPath,
    cert: StrPath,
    key: StrPath,
    hostname: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
) -> defer.Deferred[JobworkerClientProtocol]:
    """
    Connect to a server over mutual TLS 1.3; fires with the client once the
    hello exchange has ended.

    @param endpoint_or_address: C{"HOST:PORT"} (C{"[::1]:8443"} for IPv6;
        the port defaults to 8443), a C{(host, port)} pair, or a plain
        (not TLS) client endpoint, which is wrapped in TLS here.
    @param ca: PEM file of the CA certificates the server's certificate must
        chain to.
    @param cert: PEM file of this client's certificate.
    @param key: PEM file of its unencrypted private key.
    @param hostname: the name or address the server's certificate must
        carry; defaults to the host dialled, and is required with an
        endpoint.
    @param timeout: seconds for TCP, TLS and the hello together; requests
        have no time limit.
    @param keepalive_interval: see L{JobworkerClientProtocol}; default 30 s.
    @raise CredentialError: (synchronously) a CA, certificate or key file
        cannot be used.
    @return: fails with L{ClientConnectionLost} when the server closes the
        connection before its hello (a refused certificate, say), with
        L{TimeoutError} after C{timeout}, or with the endpoint's error when
        the server cannot be reached.
    """
    from jobworker.tls import client_tls_options

    if isinstance(endpoint_or_address, (str, tuple)):
        address = parse_address(endpoint_or_address) if isinstance(endpoint_or_address, str) else endpoint_or_address
        if isinstance(address, UnixAddress):
            raise ValueError(
                f"{endpoint_or_address!r}: the Twisted client dials TCP; give a UNIX socket as an endpoint"
                " (UNIXClientEndpoint) with hostname='localhost'"
            )
        host, port = address
        endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        if hostname is None:
            hostname = host
    else:
        endpoint = endpoint_or_address
        if hostname is None:
            raise ValueError("hostname is required with an endpoint: the server's certificate must name it")
    clock = cast("IReactorTime", reactor)
    options = client_tls_options(ca, cert, key, hostname)
    protocol = JobworkerClientProtocol(
        max_frame_size=max_frame_size, clock=clock, keepalive_interval=keepalive_interval
    )
    connecting: defer.Deferred[Any] = connectProtocol(wrapClientTLS(options, endpoint), protocol)
    # While this waits on ready, a cancellation (the timeout's) reaches
    # ready, whose canceller aborts the connection.
    connecting.addCallback(lambda _: protocol.ready)
    connecting.addCallback(lambda _: protocol)
    connecting.addTimeout(timeout, clock)
    return connecting


def connect_configured(
    reactor: IReactorTCP | IReactorTime | Any,
    server: str | None = None,
    *,
    config_path: StrPath | None = None,
    **options: Any,
) -> defer.Deferred[JobworkerClientProtocol]:
    """
    L{connect} to the server C{server} names, with the credentials
    C{jobcli} would use (L{jobworker.clientside.config}: flags aside, the
    environment, then the configuration file at C{config_path}, default
    C{$XDG_CONFIG_HOME/jobworker/config.toml}).  C{options} are those of
    L{connect}.

    @raise jobworker.clientside.config.ClientConfigError: (synchronously) a bad
        file, or C{server} names several servers.
    """
    from jobworker.clientside.config import ClientConfigError, load_client_config, resolve_targets

    targets = resolve_targets(load_client_config(config_path), server=server)
    if len(targets) != 1:
        raise ClientConfigError(f"{server!r} names {len(targets)} servers; a client talks to one")
    target = targets[0]
    return connect(
        reactor, target.address.value, ca=target.ca.value, cert=target.cert.value, key=target.key.value, **options
    )
