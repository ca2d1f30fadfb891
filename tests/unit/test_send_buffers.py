"""
The server's send path reuses its buffers: one turn of a stream is joined
into a buffer kept for the next turn, and the TLS layer reads the turn's
ciphertext into a buffer it keeps too, copying only what the kernel does
not take at once.

Fresh quarter-MiB buffers per turn (a join, pyOpenSSL's C{bio_read} buffer
and its copy) were given back to the kernel and faulted in again, turn
after turn, in some runs: two page faults per 4 KiB sent, the server's CPU
per GiB doubled.  These tests fail if a turn allocates them again, or if a
reused buffer is handed on where it would be kept (and overwritten by the
next turn).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from OpenSSL import SSL

from jobworker.server.connection import TURN_BYTES, ServerProtocol
from jobworker.tls import BulkTLSMemoryBIOFactory, BulkTLSMemoryBIOProtocol
from tests.unit.test_tls import PKI, connect_in_memory, pki  # noqa: F401 - the fixture


class _RecordingTLS(BulkTLSMemoryBIOProtocol):
    """
    Only C{write}: what the server hands its TLS layer.
    """

    def __init__(self) -> None:
        self.writes: list[bytes | memoryview] = []

    def write(self, data: bytes | memoryview) -> None:
        self.writes.append(data)


def _turn(fill: int) -> list[bytes | memoryview]:
    head = bytes([fill]) * 16
    data = memoryview(bytes([fill]) * (64 << 10))
    return [head, data] * (TURN_BYTES // len(data))


def test_turns_are_joined_into_one_reused_buffer_for_the_tls_layer() -> None:
    transport = _RecordingTLS()
    protocol = SimpleNamespace(transport=transport)
    first, second = _turn(1), _turn(2)
    ServerProtocol._write_turn(protocol, first)  # type: ignore[arg-type]  # a stand-in with only the transport
    seen = bytes(transport.writes[0])  # the TLS layer consumes it at once
    ServerProtocol._write_turn(protocol, second)  # type: ignore[arg-type]  # a stand-in with only the transport
    one, two = transport.writes
    assert isinstance(one, memoryview) and isinstance(two, memoryview)
    assert one.obj is two.obj  # the same buffer, not a new one per turn
    assert seen == b"".join(first)
    assert bytes(two) == b"".join(second)


def test_a_transport_that_keeps_its_writes_gets_bytes() -> None:
    kept: list[object] = []
    protocol = SimpleNamespace(transport=SimpleNamespace(write=kept.append))
    turn = _turn(3)
    ServerProtocol._write_turn(protocol, turn)  # type: ignore[arg-type]  # a stand-in with only the transport
    assert kept == [b"".join(turn)]
    assert type(kept[0]) is bytes


def test_tls_reads_a_turns_ciphertext_without_pyopenssls_copying_read(pki: PKI, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A turn-sized write is encrypted and read out of the BIO into the
    reused buffer (no C{bio_read}); the in-memory transport keeps what it
    is given, so each write is copied out of that buffer before the next
    one overwrites it: the peer gets both writes intact, in order.
    """
    client, server, pump = connect_in_memory(pki.server_options(), pki.client_options("viewer"), BulkTLSMemoryBIOFactory)
    assert server.handshake_done
    reads: list[int] = []
    original = SSL.Connection.bio_read

    def counting_read(self: SSL.Connection, size: int) -> bytes:
        reads.append(size)
        return original(self, size)

    monkeypatch.setattr(SSL.Connection, "bio_read", counting_read)
    first = bytes(range(256)) * 1024
    second = bytes(reversed(range(256))) * 1024
    server.transport.write(first)
    server.transport.write(second)
    assert reads == []
    monkeypatch.undo()
    pump.flush()
    assert client.received == first + second
