"""
Tests for L{jobworker.server.tune_transport}: how a client connection's
transport is set up for streaming, checked on a real loopback connection
under Twisted's reactor.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import WrappingFactory

from jobworker.server import WRITE_BUFFER, tune_transport


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
    made: Deferred[Source] = Deferred()
    factory: Factory = Factory.forProtocol(lambda: Source(made))
    if wrapped:
        factory = WrappingFactory(factory)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    sink = Sink(WRITE_BUFFER)
    try:
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), sink)
        source = await made
        transport = source.transport
        tune_transport(transport)
        tcp = transport.transport if wrapped else transport  # type: ignore[union-attr]
        sizes: list[int] = []
        tcp.socket = SendRecorder(tcp.socket, sizes)
        payload = random.Random(3).randbytes(WRITE_BUFFER)
        transport.write(payload)  # type: ignore[union-attr]
        sink.done.addTimeout(10, reactor)
        await sink.done
        assert bytes(sink.received) == payload
        assert sizes[0] == WRITE_BUFFER, sizes
        assert tcp.getTcpNoDelay()
        assert tcp.bufferSize == WRITE_BUFFER
    finally:
        if sink.transport is not None:
            sink.transport.loseConnection()
        await port.stopListening()
