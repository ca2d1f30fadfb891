"""
Hostile checks of issue 10 that need a server process (full disks, a job
whose files were replaced, a client that leaves mid-start); the rest, at the
unit level, are L{tests.unit.test_hostile_issue10}.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jobworker.protocol import messages as m
from tests.e2e.test_full_disk import small_disk  # noqa: F401 - a fixture


def test_a_server_restarted_on_a_full_disk_starts_and_records_its_lost_job_later(certs, small_disk) -> None:
    # After a crash, the restart finds the disk full: the helper's bytecode
    # cannot be written and the lost job's record cannot be saved.  The
    # server must start, list the job as lost, and save it once there is room.
    import json
    import time
    from contextlib import closing

    from tests.e2e.test_full_disk import launch

    first = launch(certs, small_disk)
    try:
        with closing(first.client("admin")) as client:
            job_id = client.start(["sleep", "1000.000424242"])
            deadline = time.monotonic() + 10
            while client.status(job_id).state is not m.JobState.RUNNING:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        first.process.kill()
        first.process.wait()
    finally:
        first.stop()
    (small_disk.path / "state" / "isolate.pyc").unlink(missing_ok=True)
    small_disk.fill()
    second = launch(certs, small_disk)
    try:
        listed = json.loads(second.jobcli("list", "--json", check=True, timeout=20).stdout)
        assert [(job["id"], job["state"]) for job in listed] == [(str(job_id), "lost")]
        assert second.jobcli("run", "--", "true").returncode != 0  # refused, not hung
        small_disk.empty()
        deadline = time.monotonic() + 10
        while "its record is saved again" not in second.log():
            assert time.monotonic() < deadline, second.log()[-2000:]
            time.sleep(0.05)
        assert second.jobcli("run", "--", "echo", "ok", timeout=20).stdout == b"ok\n"
        log = second.log()
        assert "Traceback" not in log and "Unhandled" not in log
    finally:
        second.stop()
    record = json.loads((small_disk.path / "state" / "jobs" / f"{job_id}.json").read_text())
    assert record["status"]["state"] == "lost"


@pytest.fixture
def tiny_disk(tmp_path: Path):
    from tests.e2e.test_full_disk import SmallDisk
    from tests.support import need_root

    need_root()
    disk = SmallDisk(tmp_path / "disk", 4 << 20)
    yield disk
    disk.unmount()


def test_a_job_that_fills_the_disk_with_its_own_output(certs, tiny_disk) -> None:
    # The disk fills with the job's own spool (4 MiB tmpfs, 6 MB of
    # output): what could not be stored is one gap of the exact size, live
    # and after a restart; removing the job gives the room back.
    import sys
    from contextlib import closing

    from tests.e2e.test_full_disk import launch, read_output

    total = 6_000_000
    script = f"import sys; [sys.stdout.buffer.write(bytes([65 + i % 26]) * 250_000) for i in range({total // 250_000})]"
    server = launch(certs, tiny_disk)
    try:
        with closing(server.client("admin")) as client:
            job_id = client.start([sys.executable, "-c", script])
            final = client.wait(job_id)
        assert (final.state, final.exit_code, final.output_bytes) == (m.JobState.EXITED, 0, total)
        pieces, status = read_output(server, job_id)
        gaps = [piece for piece in pieces if piece[0] == 0]
        stored = sum(len(data) for fd, _, data in pieces if fd == 1)
        assert len(gaps) >= 1 and stored + sum(len(data) for _, _, data in gaps) == total
        assert stored > 0
        # Every byte served is the byte the job wrote there.
        expected = b"".join(bytes([65 + i % 26]) * 250_000 for i in range(total // 250_000))
        for fd, offset, data in pieces:
            if fd == 1:
                assert data == expected[offset : offset + len(data)], offset
        live = [(fd, offset, len(data)) for fd, offset, data in pieces]
    finally:
        server.stop()
    again = launch(certs, tiny_disk)
    try:
        pieces, _ = read_output(again, job_id)
        after = [(fd, offset, len(data)) for fd, offset, data in pieces]
        assert sum(length for _, _, length in after) == total
        assert [piece for piece in after if piece[0] == 1][0] == [piece for piece in live if piece[0] == 1][0]
        assert again.jobcli("rm", str(job_id), timeout=20).returncode == 0
        assert again.jobcli("run", "--", "echo", "ok", timeout=20).stdout == b"ok\n"
        log = again.log() + server.log()
        assert "Traceback" not in log and "Unhandled" not in log
    finally:
        again.stop()
    assert not list((tiny_disk.path / "state" / "jobs").glob("*.tmp"))


def test_a_job_whose_files_are_directories_is_listed_and_removed(certs, tmp_path: Path) -> None:
    # A directory where a job's record or spool should be: listed with an
    # error; `rm` raised IsADirectoryError (INTERNAL, a traceback) after it
    # had already dropped the job from memory.
    import json
    from contextlib import closing

    from tests.support import start_server

    state = tmp_path / "state"
    jobs = state / "jobs"
    first = start_server(certs, state)
    try:
        with closing(first.client("admin")) as client:
            ids = {name: client.start(["sh", "-c", f"echo {name}"]) for name in ("record-dir", "spool-dir")}
            for job_id in ids.values():
                client.wait(job_id)
    finally:
        first.stop()
    record = jobs / f"{ids['record-dir']}.json"
    record.unlink()
    record.mkdir()
    spool = jobs / f"{ids['spool-dir']}.out"
    spool.unlink()
    spool.mkdir()
    second = start_server(certs, state)
    try:
        listed = {job["id"]: job for job in json.loads(second.jobcli("list", "--json", check=True, timeout=20).stdout)}
        assert "not a regular file" in listed[str(ids["record-dir"])]["error"]
        assert "output spool" in listed[str(ids["spool-dir"])]["error"]
        for job_id in ids.values():
            removed = second.jobcli("rm", str(job_id), timeout=20)
            assert removed.returncode == 0, removed.stderr
        assert json.loads(second.jobcli("list", "--json", check=True).stdout) == []
        log = second.log()
        assert "Traceback" not in log and "Unhandled" not in log
        assert f"{ids['record-dir']}.json" in log  # what was left there is named
    finally:
        second.stop()


def test_a_client_that_leaves_while_its_start_is_pending(certs, tmp_path: Path) -> None:
    # The connection's pending Deferreds are cancelled when it goes (a
    # GoAway, or a drop): for a start, that was the job's own "started"
    # Deferred, which the job later fired again (AlreadyCalledError).  The
    # job must start and end normally, and nothing be logged as unhandled.
    import json
    import time

    from tests.e2e.test_e2e_protocol import RawClient
    from tests.support import start_server

    server = start_server(certs, tmp_path / "state")
    try:
        for leave in ("goaway", "drop"):
            client = RawClient(server)
            client.send(m.StartRequest(1, ("sh", "-c", f"echo {leave}")))
            if leave == "goaway":
                client.send(m.GoAway(0, "bye"))
            client.sock.close()
        deadline = time.monotonic() + 15
        while True:
            listed = json.loads(server.jobcli("list", "--json", check=True, timeout=20).stdout)
            if len(listed) == 2 and all(job["state"] == "exited" for job in listed):
                break
            assert time.monotonic() < deadline, listed
            time.sleep(0.1)
        for job in listed:
            assert server.jobcli("logs", job["id"], check=True).stdout in (b"goaway\n", b"drop\n")
        log = server.log()
        assert "Traceback" not in log and "Unhandled" not in log and "AlreadyCalled" not in log, log[-3000:]
    finally:
        server.stop()
