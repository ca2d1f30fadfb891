"""
Fuzzing as a standing check (the CI-sized run; C{bench/fuzz.py} is the
long one): the frame decoder and the server's connection state machine meet
thousands of valid, mutated and random inputs, and only the documented
protocol errors come out.  See L{tests.fuzzing} for the inputs and what
counts as a crash.

Each run prints its counts (inputs, crashes, tracebacks, protocol errors,
codes seen, memory growth); C{pytest -s} shows them.
"""

from __future__ import annotations

import random
import resource
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobworker.errors import ProtocolError
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection, Role
from jobworker.protocol.framing import FrameBuffer
from jobworker.protocol.wire import HEADER_SIZE, encode_message
from tests.fuzzing import CONNECTION_CODES, CoreTarget, FuzzReport, LiveTarget, ProtocolTarget, run, run_parallel
from tests.test_framing import any_message

# Inputs per target: together more than 5,000, in about 10 s.
CORE_INPUTS = 2500
PROTOCOL_INPUTS = 2500
LIVE_INPUTS = 300


def _isolation() -> list[str]:
    """
    As root the server runs jobs in namespaces, as it would in production
    (the starts that the fuzzer makes mostly fail: no such command); as
    anyone else it must run them without.
    """
    import os

    return [] if os.geteuid() == 0 else ["--no-isolation"]


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _print(name: str, report: FuzzReport, growth_kib: int) -> None:
    print(
        f"\nfuzz {name}: {report.inputs} inputs, {report.crashes} crashes, {report.tracebacks} tracebacks,"
        f" {report.protocol_errors} protocol errors, {report.messages} messages,"
        f" RSS growth {growth_kib} KiB, codes {dict(sorted(report.codes.items()))}"
    )


def _assert_clean(report: FuzzReport) -> None:
    assert report.crashes == 0 and report.tracebacks == 0, [
        (data.hex(), what) for data, what in report.examples
    ]


def test_fuzz_the_sans_io_core() -> None:
    before = _rss_kib()
    report = run(CoreTarget(), CORE_INPUTS, seed=20261201)
    growth = _rss_kib() - before
    _print("core", report, growth)
    _assert_clean(report)
    assert report.inputs == CORE_INPUTS
    # The inputs reach both outcomes: protocol errors and served messages.
    assert report.protocol_errors > CORE_INPUTS // 10 and report.messages > CORE_INPUTS // 2
    assert growth < 64 << 10


def test_fuzz_the_server_protocol() -> None:
    target = ProtocolTarget()
    try:
        before = _rss_kib()
        report = run(target, PROTOCOL_INPUTS, seed=20261202)
        growth = _rss_kib() - before
    finally:
        target.close()
    _print("server protocol", report, growth)
    _assert_clean(report)
    assert report.inputs == PROTOCOL_INPUTS
    assert report.protocol_errors > PROTOCOL_INPUTS // 10
    assert report.codes.get("NOT_FOUND", 0) > 0  # requests got as far as the job manager
    assert growth < 64 << 10


def test_fuzz_a_live_server(certs: Path, tmp_path: Path) -> None:
    """
    Raw inputs over real TLS after a valid hello, against a real server
    (no cgroups: what is tested is the protocol): no
    traceback in its log, and it is still alive and serving at the end.
    """
    from jobworker.blocking.tls import client_ssl_context
    from tests.support import start_server

    server = start_server(
        certs, tmp_path / "state", *_isolation(), "--cgroups", "none", "--frame-timeout", "1",
        "--max-finished-jobs", "20", "--audit-rate-limit", "0",
    )
    try:
        context = client_ssl_context(certs / "ca.pem", certs / "alice.pem", certs / "alice.key")
        report, targets = run_parallel(lambda: LiveTarget("127.0.0.1", server.port, context), LIVE_INPUTS, 20261203, 6)
        for target in targets:
            target.close()
        assert server.alive()
        with server.client("alice") as client:
            client.list()
        log = server.log()
    finally:
        server.stop()
    _print(f"live server ({sum(target.connections for target in targets)} connections)", report, 0)
    _assert_clean(report)
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
    assert report.inputs == LIVE_INPUTS


# -- Hypothesis on the core -------------------------------------------------------

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _open_server() -> Connection:
    conn = Connection(Role.SERVER)
    conn.send(m.ServerHello(m.PROTOCOL_VERSION, conn.max_frame_size, "fuzz", "alice", "user"))
    conn.receive_data(encode_message(m.ClientHello(m.PROTOCOL_VERSION, 1 << 20)))
    assert conn.is_open
    return conn


pieces = st.one_of(
    any_message.map(encode_message),
    st.binary(min_size=1, max_size=64),
    st.tuples(any_message.map(encode_message), st.integers(0, 10_000), st.integers(0, 255)).map(
        lambda t: t[0][: t[1] % (len(t[0]) + 1)] + bytes([t[2]]) + t[0][t[1] % (len(t[0]) + 1) + 1 :]
    ),
)


@SETTINGS
@given(st.lists(pieces, min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_server_core_raises_only_protocol_errors(frames: list[bytes], rng: random.Random) -> None:
    """
    Whatever a client sends after the hello, in whatever pieces, the server
    core returns messages or raises a ProtocolError with a connection-tier
    code, after which it is closed; its receive buffer never holds more than
    one maximum frame.
    """
    conn = _open_server()
    data = b"".join(frames)
    position = 0
    try:
        while position < len(data):
            step = rng.randint(1, max(1, len(data) - position))
            conn.receive_data(data[position : position + step])
            position += step
            assert conn.receive_buffered <= conn.max_frame_size + HEADER_SIZE
    except ProtocolError as error:
        assert error.code in CONNECTION_CODES
        assert conn.is_closed
        assert conn.receive_data(data) == []


@SETTINGS
@given(st.binary(max_size=2000), st.lists(st.integers(1, 300), max_size=20))
def test_frame_buffer_keeps_only_what_has_arrived(data: bytes, steps: list[int]) -> None:
    """
    The frame buffer holds at most the bytes of one incomplete frame that
    have arrived, never the length the frame announces.
    """
    buffer = FrameBuffer(1 << 20)
    position = 0
    since_boundary = 0
    try:
        for step in [*steps, len(data)]:
            chunk = data[position : position + step]
            position += len(chunk)
            buffer.receive(chunk)
            since_boundary += len(chunk)
            assert len(buffer) <= since_boundary
            if len(buffer) == 0:
                since_boundary = 0
    except ProtocolError:
        pass
