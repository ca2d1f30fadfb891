"""
End-to-end tests of a state directory damaged behind the server's back: a
spool truncated under a running server, records with values out of range or
not JSON, spools truncated, with a bad record header or deleted, and a
spool whose record is gone.

Each must be detected and survived: the server starts and serves; the
damaged job is listed (state C{lost} for a damaged record) with an error
that says what is wrong; its readable output is served with a gap for what
is missing; the other jobs are untouched; no traceback.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from contextlib import closing

from jobworker.output.log import GAP_FD, RECORD_HEADER_SIZE
from jobworker.protocol import messages as m
from tests.support import start_server


def read_pieces(server, job_id: uuid.UUID, timeout: float = 20) -> tuple[list[m.Output | m.Gap], m.JobStatus]:
    """
    A non-follow read of the whole output: its Output and Gap messages in
    order, and the EndOfStream's status.  Fails if it takes over C{timeout}.
    """
    pieces: list[m.Output | m.Gap] = []
    deadline = time.monotonic() + timeout
    with closing(server.client("admin")) as client:
        for message in client.follow(job_id, follow=False):
            assert time.monotonic() < deadline, "the read did not end"
            if isinstance(message, (m.Output, m.Gap)):
                pieces.append(message)
            else:
                return pieces, message.status
    raise AssertionError("no EndOfStream")


def read_output(server, job_id: uuid.UUID, timeout: float = 20) -> tuple[bytes, int, m.JobStatus]:
    """
    A non-follow read of the whole output: the data bytes, the bytes in
    gaps, and the EndOfStream's status.
    """
    pieces, status = read_pieces(server, job_id, timeout)
    data = b"".join(piece.data for piece in pieces if isinstance(piece, m.Output))
    gaps = sum(piece.length for piece in pieces if isinstance(piece, m.Gap))
    return data, gaps, status


def spool_records(raw: bytes) -> list[tuple[int, int, int]]:
    """
    The records of a spool file, read the simple way a test can trust:
    (position in the file, fd, length) for each whole record.
    """
    records = []
    position = 0
    while position + RECORD_HEADER_SIZE <= len(raw):
        fd = raw[position]
        length = int.from_bytes(raw[position + 1 : position + RECORD_HEADER_SIZE], "big")
        payload = 0 if fd == GAP_FD else length
        if position + RECORD_HEADER_SIZE + payload > len(raw):
            break
        records.append((position, fd, length))
        position += RECORD_HEADER_SIZE + payload
    return records


def test_a_spool_truncated_under_a_running_server(certs, tmp_path):
    # Reads from the spool (the ring is small): a short pread was counted
    # as progress, and the reactor spun on it for ever.
    server = start_server(certs, tmp_path / "state", "--ring-size", "64K", "--grace", "1")
    try:
        with closing(server.client("admin")) as client:
            job_id = client.start(["sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' x; exec sleep 1000"])
            deadline = time.monotonic() + 20
            while client.status(job_id).output_bytes < 1_000_000:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        # Wait until the spool writer has written it all: cutting a spool
        # it still writes would damage it somewhere else as well.
        spool = tmp_path / "state" / "jobs" / f"{job_id}.out"
        while sum(length for _, _, length in spool_records(spool.read_bytes())) < 1_000_000:
            assert time.monotonic() < deadline, "the spool writer did not catch up"
            time.sleep(0.05)
        cut = 100_000
        # How the output was cut into records depends on timing (how much
        # the pipe held at each read), so the bytes that stay readable are
        # those of the records wholly before the cut.
        kept = sum(
            length for position, _, length in spool_records(spool.read_bytes()) if position + RECORD_HEADER_SIZE + length <= cut
        )
        with open(spool, "r+b") as handle:
            handle.truncate(cut)
        pieces, status = read_pieces(server, job_id)
        # The pieces cover the output once, in order, from its first byte.
        offset = 0
        for piece in pieces:
            assert piece.offset == offset
            offset += piece.length if isinstance(piece, m.Gap) else len(piece.data)
        assert offset == 1_000_000
        before = [piece for piece in pieces if piece.offset < kept]
        assert all(isinstance(piece, m.Output) and piece.data == b"x" * len(piece.data) for piece in before)
        assert any(isinstance(piece, m.Gap) and piece.offset == kept for piece in pieces)
        assert "output spool" in status.error
        # The server still serves, and stops on SIGTERM.
        assert server.jobcli("status", str(job_id), timeout=10).returncode == 0
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=20) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.log()
    finally:
        server.stop()


DAMAGES = {
    # key: (what to do to the record's status, what the error must name)
    "signal": (lambda status: status.update(signal=300), "signal: 300 out of range"),
    "exit_code": (lambda status: status.update(exit_code=2**40), "exit_code"),
    "created_at": (lambda status: status.update(created_at=1e300), "created_at"),
    "owner": (lambda status: status.update(owner=5), "owner: not text"),
}


def test_damaged_records_and_spools_are_listed_and_served(certs, tmp_path):
    state = tmp_path / "state"
    jobs = state / "jobs"
    first = start_server(certs, state)
    names = [*DAMAGES, "not-json", "spool-truncated", "spool-bad-header", "spool-deleted", "record-deleted", "good"]
    ids = {}
    try:
        with closing(first.client("alice")) as client:
            for name in names:
                ids[name] = client.start(["sh", "-c", f"printf '{name}-out'; printf '{name}-err' >&2; exit 3"])
            for job_id in ids.values():
                assert client.wait(job_id).exit_code == 3
    finally:
        first.stop()

    def record_path(name: str):
        return jobs / f"{ids[name]}.json"

    def spool_path(name: str):
        return jobs / f"{ids[name]}.out"

    for name, (damage, _) in DAMAGES.items():
        record = json.loads(record_path(name).read_text())
        damage(record["status"])
        record_path(name).write_text(json.dumps(record))
    record_path("not-json").write_text('{"status": {"id": ')
    content = spool_path("spool-truncated").read_bytes()
    spool_path("spool-truncated").write_bytes(content[:-3])
    content = bytearray(spool_path("spool-bad-header").read_bytes())
    first_length = int.from_bytes(content[1:9], "big")
    content[9 + first_length] = 7  # the second record's fd
    spool_path("spool-bad-header").write_bytes(bytes(content))
    spool_path("spool-deleted").unlink()
    record_path("record-deleted").unlink()

    second = start_server(certs, state)
    try:
        listed = json.loads(second.jobcli("list", "--json", check=True, timeout=20).stdout)
        by_id = {job["id"]: job for job in listed}
        for name in names:
            assert str(ids[name]) in by_id, name
        for name, (_, said) in DAMAGES.items():
            job = by_id[str(ids[name])]
            assert job["state"] == "lost", job
            assert "damaged job record" in job["error"] and said in job["error"], job
        assert "not JSON" in by_id[str(ids["not-json"])]["error"]
        assert "record is missing" in by_id[str(ids["record-deleted"])]["error"]
        for name in ("spool-truncated", "spool-bad-header", "spool-deleted"):
            job = by_id[str(ids[name])]
            assert (job["state"], job["exit_code"]) == ("exited", 3), job
            assert "output spool" in (job["error"] or ""), job
        good = by_id[str(ids["good"])]
        assert (good["state"], good["exit_code"], good["error"]) == ("exited", 3, None)

        # Every job's output ends with an EndOfStream; what can be read is
        # served, and what is missing is a gap of the right size.
        expected = {name: len(f"{name}-out{name}-err") for name in names}
        for name in names:
            data, gaps, status = read_output(second, ids[name])
            if name in ("not-json", "record-deleted"):
                assert data == f"{name}-out{name}-err".encode()  # the spool is intact
                continue
            assert len(data) + gaps == expected[name], name
        data, gaps, _ = read_output(second, ids["spool-truncated"])
        assert data == b"spool-truncated-out" and gaps == len("spool-truncated-err") - 0
        data, gaps, _ = read_output(second, ids["spool-bad-header"])
        assert data == b"spool-bad-header-out" and gaps == len("spool-bad-header-err")
        data, gaps, _ = read_output(second, ids["spool-deleted"])
        assert data == b"" and gaps == expected["spool-deleted"]
        good_logs = second.jobcli("logs", str(ids["good"]), check=True)
        assert (good_logs.stdout, good_logs.stderr) == (b"good-out", b"good-err")
        # A user sees their own damaged jobs unless the owner was the damage.
        mine = json.loads(second.jobcli("list", "--json", identity="alice", check=True).stdout)
        assert str(ids["signal"]) in {job["id"] for job in mine}
        assert str(ids["owner"]) not in {job["id"] for job in mine}
        # A damaged job can be removed like any other.
        assert second.jobcli("rm", str(ids["signal"])).returncode == 0
        log = second.log()
        assert "Traceback" not in log and "Unhandled" not in log
    finally:
        second.stop()
