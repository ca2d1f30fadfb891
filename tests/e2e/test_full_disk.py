"""
End-to-end tests of a server whose state directory fills up: a small tmpfs
mounted as the state directory (root only; on CI these fail rather than
skip when they cannot mount), filled with a file until writes fail with
ENOSPC, and emptied again.

"Output: never silently lost": a byte that could not be stored must come
back to every reader as part of an explicit gap, live and after a restart;
the spool must write again when there is room; the server logs the loss
once per job and the recovery once.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from jobworker.errors import ErrorCode, RequestError
from jobworker.protocol import messages as m
from tests.support import need, need_root, start_server


class SmallDisk:
    """
    A tmpfs of C{size} bytes mounted at C{path}, which can be filled to the
    last byte and emptied again.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
        need(result.returncode == 0, f"cannot mount a tmpfs: {result.stderr.strip()}")
        self.filler = path / "filler"

    def fill(self) -> None:
        """
        Take every free byte (writes of 4 KiB, then of 1 byte, until ENOSPC).
        """
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 4096, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as exc:
                        assert exc.errno == errno.ENOSPC, exc
                        break
        finally:
            os.close(fd)

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    need_root()
    disk = SmallDisk(tmp_path / "disk", 16 << 20)
    yield disk
    disk.unmount()


@pytest.fixture
def flags():
    """
    A directory the jobs (running as nobody) can see, for the files that
    tell them to go on.
    """
    path = Path(tempfile.mkdtemp(prefix="jobworker-flags-"))
    path.chmod(0o777)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def launch(certs, disk: SmallDisk, *args: str):
    # No namespaces: the job must see the flag files in the host's /tmp.
    return start_server(
        certs, disk.path / "state", "--no-isolation", "--cgroups", "none", "--grace", "1", "--ring-size", "256K", *args
    )


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def output_bytes(server, job_id: uuid.UUID) -> int:
    with closing(server.client("admin")) as client:
        return client.status(job_id).output_bytes


def read_output(server, job_id: uuid.UUID) -> tuple[list[tuple[int, int, bytes]], m.JobStatus | None]:
    """
    Every message of a non-follow read: (fd or 0 for a gap, offset, data or
    the gap's length as bytes of that length), joined per stream, and the
    final status.
    """
    pieces: list[tuple[int, int, bytes]] = []
    status: m.JobStatus | None = None
    with closing(server.client("admin")) as client:
        for message in client.follow(job_id, follow=False):
            if isinstance(message, m.Output):
                fd, offset, data = message.fd, message.offset, bytes(message.data)
            elif isinstance(message, m.Gap):
                fd, offset, data = 0, message.offset, b"\0" * message.length
            else:
                status = message.status
                continue
            if pieces and pieces[-1][0] == fd and pieces[-1][1] + len(pieces[-1][2]) == offset:
                last = pieces.pop()
                data = last[2] + data
                offset = last[1]
            pieces.append((fd, offset, data))
    return pieces, status


JOB = """
import os, sys, time
flags = sys.argv[1]
def wait(name):
    while not os.path.exists(os.path.join(flags, name)):
        time.sleep(0.02)
out = sys.stdout.buffer
out.write(b"a" * 100_000); out.flush()
wait("full")
for _ in range(20):
    out.write(b"b" * 100_000); out.flush()
wait("more")
out.write(b"c" * 100_000); out.flush()
"""


def test_output_lost_to_a_full_disk_is_a_gap_and_spooling_resumes(certs, small_disk, flags):
    server = launch(certs, small_disk)
    try:
        with closing(server.client("admin")) as client:
            job_id = client.start([sys.executable, "-c", JOB, str(flags)])
        wait_for(lambda: output_bytes(server, job_id) >= 100_000, 20, "the first output")
        time.sleep(0.3)  # the spool writer writes it
        small_disk.fill()
        (flags / "full").touch()
        wait_for(lambda: output_bytes(server, job_id) >= 2_100_000, 20, "the output written into a full disk")
        wait_for(lambda: "cannot write its output" in server.log(), 10, "the log line about the loss")

        # Live: the first 100,000 bytes, a gap, then the newest output the
        # ring holds (256 KiB at least): nothing silent.
        pieces, _ = read_output(server, job_id)
        assert pieces[0] == (1, 0, b"a" * 100_000)
        gaps = [piece for piece in pieces if piece[0] == 0]
        assert len(gaps) == 1 and gaps[0][1] == 100_000
        assert pieces[-1][0] == 1 and pieces[-1][2] == b"b" * len(pieces[-1][2])
        assert len(pieces[-1][2]) >= 256 << 10
        assert pieces[-1][1] + len(pieces[-1][2]) == 2_100_000

        small_disk.empty()
        wait_for(lambda: "writing its output to" in server.log(), 10, "the log line about the recovery")
        (flags / "more").touch()
        with closing(server.client("admin")) as client:
            final = client.wait(job_id)
        assert (final.state, final.exit_code, final.output_bytes) == (m.JobState.EXITED, 0, 2_200_000)
        assert "could not be stored" in final.error

        after, status = read_output(server, job_id)
        assert after[:-1] == pieces[:-1] or after[: len(pieces) - 1] == pieces[: len(pieces) - 1]
        assert after[-1] == (1, 2_100_000, b"c" * 100_000) or after[-1][2].endswith(b"c" * 100_000)
        total = sum(len(piece[2]) for piece in after)
        assert total == 2_200_000
        log = server.log()
        assert log.count("cannot write its output") == 1, log
        assert log.count("writing its output to") == 1, log
        assert "Traceback" not in log
    finally:
        server.stop()

    # After a restart every reader sees the same: the gap is on disk.
    again = launch(certs, small_disk)
    try:
        reloaded, status = read_output(again, job_id)
        assert reloaded == after
        assert status.state is m.JobState.EXITED
    finally:
        again.stop()


def test_a_brief_full_disk_costs_the_server_no_memory(certs, small_disk, flags):
    """
    A spool that failed once kept every later byte in memory (32 MiB per job,
    for ever): the server's RSS grows by little more than the ring.
    """
    server = launch(certs, small_disk, "--ring-size", "64K")
    try:
        script = f'while [ ! -e {flags}/full ]; do sleep 0.02; done; head -c 200000000 /dev/zero'
        with closing(server.client("admin")) as client:
            job_ids = [client.start(["sh", "-c", script]) for _ in range(3)]
            wait_for(lambda: all(client.status(j).state is m.JobState.RUNNING for j in job_ids), 10, "the jobs")
        small_disk.fill()
        before = rss(server.process.pid)
        (flags / "full").touch()
        for job_id in job_ids:
            with closing(server.client("admin")) as client:
                final = client.wait(job_id)
            assert final.state is m.JobState.EXITED and final.output_bytes == 200_000_000
        grown = rss(server.process.pid) - before
        assert grown < 24 << 20, f"the server grew by {grown >> 20} MiB"
    finally:
        server.stop()
        small_disk.empty()


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_final_state_saved_while_the_disk_is_full_is_kept(certs, small_disk, flags):
    server = launch(certs, small_disk)
    try:
        with closing(server.client("admin")) as client:
            job_id = client.start(["sh", "-c", f'while [ ! -e {flags}/full ]; do sleep 0.02; done; exit 7'])
            wait_for(lambda: client.status(job_id).state is m.JobState.RUNNING, 10, "the job to run")
            small_disk.fill()
            (flags / "full").touch()
            final = client.wait(job_id)
        assert final.exit_code == 7
        wait_for(lambda: "could not save job" in server.log(), 10, "the failed save")
        small_disk.empty()
        wait_for(lambda: "its record is saved again" in server.log(), 10, "the record saved again")
    finally:
        server.stop()
    assert not list((small_disk.path / "state" / "jobs").glob("*.tmp"))
    again = launch(certs, small_disk)
    try:
        record = json.loads(again.jobcli("status", "--json", str(job_id), check=True).stdout)
        assert (record["state"], record["exit_code"]) == ("exited", 7), record
    finally:
        again.stop()


def test_start_on_a_full_disk_is_refused_with_the_cause(certs, small_disk):
    server = launch(certs, small_disk)
    try:
        small_disk.fill()
        refused = server.jobcli("start", "--", "true")
        assert refused.returncode != 0
        assert b"state directory is full" in refused.stderr, refused.stderr
        with closing(server.client("admin")) as client:
            with pytest.raises(RequestError) as caught:
                client.start(["true"])
            assert caught.value.code is ErrorCode.OUT_OF_RESOURCES
            assert client.list() == ()  # nothing half-made stays listed
        jobs_dir = small_disk.path / "state" / "jobs"
        assert list(jobs_dir.iterdir()) == []  # no .json.tmp, no .out left
        log = server.log()
        assert "Traceback" not in log and "Unhandled" not in log
        small_disk.empty()
        ran = server.jobcli("run", "--", "echo", "ok")
        assert (ran.returncode, ran.stdout) == (0, b"ok\n"), (ran.stderr, server.log()[-3000:])
    finally:
        server.stop()


def test_start_without_file_descriptors_is_refused_with_the_cause(certs, tmp_path):
    need_root()
    server = start_server(certs, tmp_path / "state", "--no-isolation", "--cgroups", "none")
    try:
        with closing(server.client("admin")) as client:
            assert client.start(["true"])  # warm: the helper is compiled, the pool made
            open_now = len(os.listdir(f"/proc/{server.process.pid}/fd"))
            subprocess.run(["prlimit", f"--pid={server.process.pid}", f"--nofile={open_now + 2}:"], check=True)
            try:
                with pytest.raises(RequestError) as caught:
                    client.start(["true"])
            finally:
                subprocess.run(["prlimit", f"--pid={server.process.pid}", "--nofile=1024:"], check=True)
            assert caught.value.code is ErrorCode.OUT_OF_RESOURCES, caught.value
            assert "file descriptors" in caught.value.message
            assert client.start(["true"])
        log = server.log()
        assert "Traceback" not in log and "Unhandled" not in log
    finally:
        server.stop()
