"""
Output streaming end to end: every follower gets every byte, whenever it
joins; flow control holds per stream; resume by offset; explicit gaps.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import uuid

import pytest

from jobworker.blocking.tls import client_ssl_context
from jobworker.protocol import messages as m
from jobworker.protocol.connection import MIN_FRAME_SIZE, Connection, Role
from tests.support import start_server

# A job that writes SIZE bytes of pseudo-random data (seeded, so the test
# knows the digest) in pieces, alternating stdout and stderr.
WRITER = """
import os, random, sys, time
size, seed, pause = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rng = random.Random(seed)
time.sleep(pause)
written = 0
n = 0
while written < size:
    piece = rng.randbytes(min(size - written, rng.randint(1, 65536)))
    os.write(1 if n % 3 else 2, piece)
    written += len(piece)
    n += 1
    if n % 16 == 0:
        time.sleep(0.01)
"""


def expected_streams(size: int, seed: int) -> tuple[bytes, bytes]:
    import random

    rng = random.Random(seed)
    out, err = bytearray(), bytearray()
    written = n = 0
    while written < size:
        piece = rng.randbytes(min(size - written, rng.randint(1, 65536)))
        (out if n % 3 else err).extend(piece)
        written += len(piece)
        n += 1
    return bytes(out), bytes(err)


def writer_argv(size: int, seed: int, pause: float = 0.0) -> list[str]:
    return ["python3", "-c", WRITER, str(size), str(seed), str(pause)]


def collect(server, job_id: uuid.UUID, offset: int = 0, identity: str = "viewer") -> dict:
    """
    Follow a job to its end with a blocking client; return what came.
    """
    client = server.client(identity)
    try:
        streams = {1: bytearray(), 2: bytearray()}
        gaps = []
        status = None
        expected_offset = offset
        for message in client.follow(job_id, offset=offset, window=256 << 10):
            if isinstance(message, m.Output):
                assert message.offset == expected_offset
                streams[message.fd].extend(message.data)
                expected_offset += len(message.data)
            elif isinstance(message, m.Gap):
                assert message.offset == expected_offset
                gaps.append((message.offset, message.length))
                expected_offset += message.length
            else:
                status = message.status
        return {"out": bytes(streams[1]), "err": bytes(streams[2]), "gaps": gaps, "status": status, "end": expected_offset}
    finally:
        client.close()


def test_hundred_followers_before_during_and_after(server):
    size, seed = 3 << 20, 7
    out, err = expected_streams(size, seed)
    digest = (hashlib.sha256(out).hexdigest(), hashlib.sha256(err).hexdigest())
    client = server.client()
    job_id = client.start(writer_argv(size, seed, pause=1.5))
    client.close()
    results: list = []
    errors: list = []

    def follower() -> None:
        try:
            results.append(collect(server, job_id))
        except BaseException as exc:  # reported below, with the rest
            errors.append(exc)

    threads = [threading.Thread(target=follower) for _ in range(40)]  # before the first byte
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    with server.client() as probe:
        while probe.status(job_id).output_bytes < size // 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        mid = [threading.Thread(target=follower) for _ in range(30)]  # mid-way
        for thread in mid:
            thread.start()
        probe.wait(job_id)
    late = [threading.Thread(target=follower) for _ in range(30)]  # after the end
    for thread in late:
        thread.start()
    for thread in threads + mid + late:
        thread.join(120)
    assert not errors, errors[:3]
    assert len(results) == 100
    for result in results:
        assert result["gaps"] == []
        assert (hashlib.sha256(result["out"]).hexdigest(), hashlib.sha256(result["err"]).hexdigest()) == digest
        assert result["status"].state is m.JobState.EXITED
        assert result["end"] == size


def test_resume_from_offset(server):
    size, seed = 1 << 20, 11
    with server.client() as client:
        job_id = client.start(writer_argv(size, seed))
        client.wait(job_id)
    whole = collect(server, job_id)
    resumed = collect(server, job_id, offset=size // 2 + 3)
    assert resumed["end"] == size
    assert len(resumed["out"]) + len(resumed["err"]) == size - (size // 2 + 3)
    # The resumed bytes are the tail of each stream.
    assert whole["out"].endswith(resumed["out"]) and whole["err"].endswith(resumed["err"])
    result = server.jobcli("logs", "--since-offset", str(size - 10), str(job_id))
    assert result.returncode == 0
    assert len(result.stdout) + len(result.stderr) == 10


class RawFollower:
    """
    A client that drives the sans-IO connection by hand, so a test can
    decide exactly when to grant window credit on each stream.
    """

    def __init__(self, server, identity: str = "admin", max_frame_size: int | None = None) -> None:
        context = client_ssl_context(server.certs / "ca.pem", server.certs / f"{identity}.pem", server.certs / f"{identity}.key")
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port)), server_hostname="127.0.0.1")
        self.conn = Connection(Role.CLIENT) if max_frame_size is None else Connection(Role.CLIENT, max_frame_size=max_frame_size)
        self.inbox: list = []
        self.read_until(lambda msg: isinstance(msg, m.ServerHello))
        self.sock.sendall(self.conn.send(m.ClientHello(m.PROTOCOL_VERSION, self.conn.max_frame_size)))

    def read_until(self, predicate, timeout: float = 30) -> m.Message:
        self.sock.settimeout(timeout)
        while True:
            for index, message in enumerate(self.inbox):
                if predicate(message):
                    return self.inbox.pop(index)
            data = self.sock.recv(1 << 20)
            assert data, "server closed the connection"
            self.inbox.extend(self.conn.receive_data(data))

    def follow(self, job_id: uuid.UUID, window: int) -> int:
        stream_id = self.conn.next_stream_id()
        request_id = self.conn.next_request_id()
        self.sock.sendall(self.conn.send(m.FollowRequest(request_id, job_id, stream_id, 0, window, True)))
        response = self.read_until(lambda msg: getattr(msg, "request_id", None) == request_id)
        assert isinstance(response, m.OkResponse)
        return stream_id

    def close(self) -> None:
        self.sock.close()


def test_output_frames_fit_the_smallest_frame_size_a_client_may_announce(server):
    """
    The server cuts output into frames of at most the client's announced
    size, however large the pieces it read from the job; the bytes and
    their offsets come through unchanged.
    """
    size, seed = 1 << 20, 7
    with server.client() as client:
        job_id = client.start(writer_argv(size, seed))
        client.wait(job_id)
    whole = collect(server, job_id)
    raw = RawFollower(server, max_frame_size=MIN_FRAME_SIZE)
    try:
        stream_id = raw.follow(job_id, 8 << 20)
        out = {1: bytearray(), 2: bytearray()}
        sizes = []
        expected_offset = 0
        while True:
            message = raw.read_until(lambda msg: getattr(msg, "stream_id", None) == stream_id)
            if isinstance(message, m.EndOfStream):
                break
            assert isinstance(message, m.Output)
            assert message.offset == expected_offset
            expected_offset += len(message.data)
            sizes.append(len(message.data))
            out[message.fd] += message.data
    finally:
        raw.close()
    assert expected_offset == size
    # A frame's size counts its type byte and body: a 16 KiB frame holds
    # the 13-byte head and the data, and full ones are sent while there is
    # enough.
    assert max(sizes) == MIN_FRAME_SIZE - 1 - 13
    assert bytes(out[1]) == whole["out"] and bytes(out[2]) == whole["err"]


def test_output_arrives_in_full_tls_records(server):
    """
    The server hands TLS a turn's frames in one write, so the records it
    sends are full (16 KiB) but for one at the end of each turn.  Written
    frame by frame, every 64 KiB frame would end in a record of 22 bytes:
    a fifth of all records, each one more read for the client.
    """
    size, seed = 4 << 20, 11
    with server.client() as client:
        job_id = client.start(writer_argv(size, seed))
        client.wait(job_id)
    expected = expected_streams(size, seed)
    client = server.client()
    try:
        channel = client._sock
        reads = []

        def recv_into(view):
            got = channel_recv_into(view)
            reads.append(got)
            return got

        channel_recv_into = channel.recv_into
        channel.recv_into = recv_into
        out = {1: bytearray(), 2: bytearray()}
        for message in client.follow(job_id, window=8 << 20):
            if isinstance(message, m.Output):
                out[message.fd] += message.data
    finally:
        client.close()
    assert (bytes(out[1]), bytes(out[2])) == expected
    short = [got for got in reads if got < 16 << 10]
    assert len(reads) > size // (16 << 10)
    assert len(short) <= len(reads) // 10, (len(short), len(reads))


def test_stalled_stream_does_not_hold_up_another_on_the_same_connection(server):
    size, seed = 4 << 20, 5
    with server.client() as client:
        job_id = client.start(writer_argv(size, seed))
        client.wait(job_id)
    raw = RawFollower(server)
    try:
        window = 64 << 10
        stalled = raw.follow(job_id, window)
        flowing = raw.follow(job_id, window)
        received = {stalled: 0, flowing: 0}
        done = False
        while not done:
            message = raw.read_until(lambda msg: isinstance(msg, (m.Output, m.Gap, m.EndOfStream)))
            if isinstance(message, m.Output):
                received[message.stream_id] += len(message.data)
                if message.stream_id == flowing:
                    update = raw.conn.consumed(flowing, len(message.data))
                    if update:
                        raw.sock.sendall(update)
            elif isinstance(message, m.EndOfStream):
                assert message.stream_id == flowing
                done = True
        assert received[flowing] == size
        # The stalled stream got exactly its window and not a byte more.
        assert received[stalled] == window
        # It still works: granting credit lets it go on.
        raw.sock.sendall(raw.conn.send(m.WindowUpdate(stalled, 1 << 20)))
        message = raw.read_until(lambda msg: isinstance(msg, m.Output) and msg.stream_id == stalled)
        assert message.offset == window
    finally:
        raw.close()
    # The server is fine and serves others.
    assert server.jobcli("run", "--", "echo", "ok").stdout == b"ok\n"


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_stalled_follower_neither_blocks_the_job_nor_grows_memory(server):
    size = 256 << 20
    with server.client() as client:
        job_id = client.start(["head", "-c", str(size), "/dev/zero"])
    raw = RawFollower(server)
    try:
        raw.follow(job_id, 64 << 10)
        before = _rss(server.process.pid)
        peak = before
        deadline = time.monotonic() + 60
        with server.client() as probe:
            while probe.status(job_id).state is not m.JobState.EXITED:
                assert time.monotonic() < deadline, "the job was blocked by a follower that does not read"
                peak = max(peak, _rss(server.process.pid))
                time.sleep(0.05)
            assert probe.status(job_id).output_bytes == size
        assert peak - before < 64 << 20, f"server memory grew by {(peak - before) >> 20} MiB"
    finally:
        raw.close()


@pytest.fixture(scope="module")
def small_retention_server(certs, tmp_path_factory):
    running = start_server(certs, tmp_path_factory.mktemp("retention") / "state", "--retention", "1M", "--ring-size", "256K")
    yield running
    running.stop()


def test_output_past_retention_is_an_explicit_gap(small_retention_server):
    server = small_retention_server
    size, seed = 3 << 20, 3
    out, err = expected_streams(size, seed)
    with server.client() as client:
        job_id = client.start(writer_argv(size, seed))
        client.wait(job_id)
    result = collect(server, job_id)
    assert result["end"] == size
    (gap_offset, gap_length), = result["gaps"]
    assert gap_offset == 1 << 20
    received = len(result["out"]) + len(result["err"])
    # Every byte is accounted for: kept data plus the reported gap.
    assert received + gap_length == size
    # The tail after the gap is the job's last output (at least the ring).
    assert received >= (1 << 20) + (256 << 10)
    logs = server.jobcli("logs", str(job_id))
    assert logs.returncode == 0
    assert f"{gap_length} bytes".encode() in logs.stderr


def test_rm_deletes_the_spool(server):
    with server.client() as client:
        job_id = client.start(["echo", "spooled"])
        client.wait(job_id)
    spool = server.state_dir / "jobs" / f"{job_id}.out"
    assert spool.exists()
    assert server.jobcli("rm", str(job_id)).returncode == 0
    assert not spool.exists()
    assert not (server.state_dir / "jobs" / f"{job_id}.json").exists()
    missing = server.jobcli("status", str(job_id))
    assert missing.returncode == 1 and b"no job" in missing.stderr
