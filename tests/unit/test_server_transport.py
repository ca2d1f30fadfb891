"""
Tests for L{jobworker.server.transport.tune_transport} and L{jobworker.tls.write_through}:
how the server's output reaches the socket, checked on real loopback
connections under Twisted's reactor.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import WrappingFactory

from jobworker.server.transport import WRITE_BUFFER, tune_transport
from jobworker.tls import write_through


class SendRecorder:
    """
    Stands in for a TCP transport's socket and records the size of every
    C{send} asked of it (what the kernel took is the real socket's business).
    """

    def __init__(self, sock: Any, sizes: list[int]) -> None:
        self._sock = sock
        self.sizes = sizes

    def send(self, data: Any, *flags: int) -> int:
        self.sizes.append(len(data))
        return self._sock.send(data, *flags)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class Source(Protocol):
    def __init__(self, made: Deferred[Source]) -> None:
        self.made = made

    def connectionMade(self) -> None:
        self.made.callback(self)


class Sink(Protocol):
    def __init__(self, size: int) -> None:
        self.size = size
        self.received = bytearray()
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= self.size and not self.done.called:
            self.done.callback(None)


async def connected_pair(size: int, unix_path: str | None = None, *, wrapped: bool = False) -> tuple[Any, Sink, Any]:
    """
    A loopback TCP connection (or a UNIX socket one, at C{unix_path}): the
    server side's transport (a L{WrappingFactory}'s wrapper around it, as
    TLS wraps it, if C{wrapped}), the client's sink (done after C{size}
    bytes) and the listening port.
    """
    made: Deferred[Source] = Deferred()
    factory: Any = Factory.forProtocol(lambda: Source(made))
    if wrapped:
        factory = WrappingFactory(factory)
    sink = Sink(size)
    if unix_path is None:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    else:
        port = reactor.listenUNIX(unix_path, factory)
        endpoint = UNIXClientEndpoint(reactor, unix_path)
    await connectProtocol(endpoint, sink)
    source = await made
    sink.done.addTimeout(10, reactor)
    return source.transport, sink, port


async def close(sink: Sink, port: Any) -> None:
    if sink.transport is not None:
        sink.transport.loseConnection()
    await port.stopListening()


@pytest.mark.parametrize("wrapped", [False, True], ids=["tcp", "wrapped like TLS"])
@pytest_twisted.ensureDeferred
async def test_a_full_write_buffer_goes_to_one_send(wrapped: bool) -> None:
    """
    After tuning, WRITE_BUFFER bytes written to the transport are offered to
    the kernel in one C{send} (Twisted's own limit is 128 KiB per call, one
    call per turn of the reactor), arrive intact, and TCP_NODELAY is on.
    Under TLS the protocol's transport is a wrapper; the tuning must reach
    the TCP connection beneath it.
    """
    transport, sink, port = await connected_pair(WRITE_BUFFER, wrapped=wrapped)
    try:
        tune_transport(transport)
        tcp = transport.transport if wrapped else transport
        sizes: list[int] = []
        tcp.socket = SendRecorder(tcp.socket, sizes)
        payload = random.Random(3).randbytes(WRITE_BUFFER)
        transport.write(payload)
        await sink.done
        assert bytes(sink.received) == payload
        assert sizes[0] == WRITE_BUFFER, sizes
        assert tcp.getTcpNoDelay()
        assert tcp.bufferSize == WRITE_BUFFER
    finally:
        await close(sink, port)


# -- write_through ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["tcp", "unix"])
@pytest_twisted.ensureDeferred
async def test_write_through_sends_at_once_on_an_idle_transport(family: str, tmp_path: Path) -> None:
    """
    On a transport that holds nothing, the bytes are offered to the socket
    within the call (no turn of the reactor in between), and they arrive;
    over TCP and over a UNIX socket (C{--listen unix:PATH}).
    """
    payload = random.Random(4).randbytes(200_000)
    tcp, sink, port = await connected_pair(len(payload), str(tmp_path / "s") if family == "unix" else None)
    try:
        tune_transport(tcp)
        sizes: list[int] = []
        tcp.socket = SendRecorder(tcp.socket, sizes)
        write_through(tcp, payload)
        assert sizes == [len(payload)]
        await sink.done
        assert bytes(sink.received) == payload
    finally:
        await close(sink, port)


@pytest_twisted.ensureDeferred
async def test_write_through_queues_behind_buffered_bytes() -> None:
    """
    While the transport holds bytes, nothing jumps the queue: the write
    waits for the reactor like the ones before it, and the peer gets the
    bytes in the order written.
    """
    first, second = b"first " * 1000, b"second" * 1000
    tcp, sink, port = await connected_pair(len(first) + len(second))
    try:
        sizes: list[int] = []
        tcp.socket = SendRecorder(tcp.socket, sizes)
        tcp.write(first)  # buffered until the next turn of the reactor
        write_through(tcp, second)
        assert sizes == []
        await sink.done
        assert bytes(sink.received) == first + second
    finally:
        await close(sink, port)


@pytest.mark.parametrize("close_how", ["loseConnection", "abortConnection"])
@pytest_twisted.ensureDeferred
async def test_write_through_leaves_a_closing_transport_to_twisted(close_how: str) -> None:
    """
    Once the connection is being closed, or aborted, the transport decides:
    nothing is sent from here (an aborted one sends nothing more at all),
    and nothing is raised.
    """
    tcp, sink, port = await connected_pair(1)
    try:
        sizes: list[int] = []
        tcp.socket = SendRecorder(tcp.socket, sizes)
        getattr(tcp, close_how)()
        write_through(tcp, b"late")
        assert sizes == []
    finally:
        await close(sink, port)


def test_write_through_on_a_transport_without_twisted_buffers() -> None:
    """
    A transport that is not a Twisted TCP connection (here an in-memory
    one) just gets C{write}.
    """
    transport = StringTransport()
    write_through(transport, b"abc")
    assert transport.value() == b"abc"

