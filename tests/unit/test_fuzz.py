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

from hypothesis import HealthCheck, given, settings, strategies as st

from jobworker.errors import ProtocolError
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection, Role
from jobworker.protocol.framing import FrameBuffer
from jobworker.protocol.wire import HEADER_SIZE, encode_message
from tests.fuzzing import CONNECTION_CODES, CoreTarget, ProtocolTarget, assert_clean, print_report, run
from tests.unit.test_framing import any_message

# Inputs per target: together more than 5,000, in about 10 s.
CORE_INPUTS = 2500
PROTOCOL_INPUTS = 2500


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_fuzz_the_sans_io_core() -> None:
    before = _rss_kib()
    report = run(CoreTarget(), CORE_INPUTS, seed=20261201)
    growth = _rss_kib() - before
    print_report("core", report, growth)
    assert_clean(report)
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
    print_report("server protocol", report, growth)
    assert_clean(report)
    assert report.inputs == PROTOCOL_INPUTS
    assert report.protocol_errors > PROTOCOL_INPUTS // 10
    assert report.codes.get("NOT_FOUND", 0) > 0  # requests got as far as the job manager
    assert growth < 64 << 10


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
