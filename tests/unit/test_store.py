"""
Tests for the state directory (L{jobworker.jobs.store}): record writes that are
checked and never tear a good record, and loading that trusts nothing.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import jobworker.jobs.store
from jobworker.jobs.store import JobStore
from jobworker.protocol.messages import JobState, JobStatus


@dataclass
class FakeJob:
    job_id: uuid.UUID
    exit_code: int
    env: tuple = (("A", "b"),)
    argv: tuple = ("x" * 5000,)  # a record of some KiB

    def status(self, *, live: bool = True) -> JobStatus:
        return JobStatus(self.job_id, "alice", self.argv, JobState.EXITED, exit_code=self.exit_code)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    opened = JobStore(str(tmp_path))
    opened.open()
    yield opened
    opened.close()


def loaded(store: JobStore) -> dict:
    return {record.status.job_id: record for record in store.load()}


def test_short_writes_still_write_the_whole_record(store: JobStore, monkeypatch) -> None:
    # One unchecked os.write: on a nearly full disk it writes part and
    # returns, and the rename made a torn record of it.
    real = os.write
    monkeypatch.setattr(jobworker.jobs.store.os, "write", lambda fd, data: real(fd, bytes(data[:100])))
    job = FakeJob(uuid.uuid4(), 3)
    store.save(job)
    (record,) = loaded(store).values()
    assert record.problems == [] and record.status.exit_code == 3
    assert record.status.argv == job.argv


def test_a_failed_write_keeps_the_good_record(store: JobStore, monkeypatch) -> None:
    job = FakeJob(uuid.uuid4(), 3)
    store.save(job)
    real = os.write
    calls = []

    def filling(fd: int, data) -> int:
        calls.append(1)
        if len(calls) == 1:
            return real(fd, bytes(data[:100]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(jobworker.jobs.store.os, "write", filling)
    with pytest.raises(OSError):
        store.save(FakeJob(job.job_id, 4))
    assert sorted(os.listdir(store.jobs_dir)) == [f"{job.job_id}.json"]  # no .tmp left
    assert loaded(store)[job.job_id].status.exit_code == 3


def test_a_failed_fsync_keeps_the_good_record(store: JobStore, monkeypatch) -> None:
    job = FakeJob(uuid.uuid4(), 3)
    store.save(job)

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(jobworker.jobs.store.os, "fsync", failing)
    with pytest.raises(OSError):
        store.save(FakeJob(job.job_id, 4))
    assert sorted(os.listdir(store.jobs_dir)) == [f"{job.job_id}.json"]
    monkeypatch.undo()
    assert loaded(store)[job.job_id].status.exit_code == 3


def test_load_removes_temporaries_and_ignores_foreign_files(store: JobStore) -> None:
    job = FakeJob(uuid.uuid4(), 0)
    store.save(job)
    jobs = Path(store.jobs_dir)
    (jobs / f"{job.job_id}.json.tmp").write_bytes(b"")
    (jobs / "README").write_text("not ours")
    assert list(loaded(store)) == [job.job_id]
    assert not (jobs / f"{job.job_id}.json.tmp").exists()
    assert (jobs / "README").exists()


def test_a_spool_without_a_record_is_a_job(store: JobStore) -> None:
    orphan = uuid.uuid4()
    Path(store.jobs_dir, f"{orphan}.out").write_bytes(b"")
    record = loaded(store)[orphan]
    assert record.problems == ["the job record is missing"]
    assert record.status.owner == "" and record.status.state is JobState.LOST


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "not JSON"),
        (b'{"status": ', "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"env": []}', "status: missing"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),  # deep nesting: RecursionError
    ],
)
def test_an_unreadable_record_is_a_damaged_job(store: JobStore, content: bytes, problem: str) -> None:
    job_id = uuid.uuid4()
    Path(store.jobs_dir, f"{job_id}.json").write_bytes(content)
    record = loaded(store)[job_id]
    assert any(problem in line for line in record.problems), record.problems
    assert record.status.job_id == job_id


def test_a_bad_env_is_a_problem(store: JobStore) -> None:
    job = FakeJob(uuid.uuid4(), 0)
    store.save(job)
    path = Path(store.jobs_dir, f"{job.job_id}.json")
    data = json.loads(path.read_text())
    data["env"] = [["A"], 5]
    path.write_text(json.dumps(data))
    assert loaded(store)[job.job_id].problems == ["env: not a list of [name, value] pairs"]


# -- start-up cost (issue 17 item 2) -----------------------------------------------


def test_loading_a_small_record_does_not_allocate_the_largest_one(store: JobStore) -> None:
    # The read of a record asked for MAX_RECORD_BYTES + 1 at once: a 16 MiB
    # buffer for each record of a few hundred bytes, ~60 us of every
    # record's share of the start-up.
    import tracemalloc

    store.save(FakeJob(uuid.uuid4(), 0))
    tracemalloc.start()
    try:
        [loaded] = list(store.load())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not loaded.problems
    assert peak < 1 << 20, peak


def test_a_record_that_grows_while_read_is_read_whole_up_to_the_cap(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    job = FakeJob(uuid.uuid4(), 0)
    store.save(job)
    real_fstat = os.fstat
    monkeypatch.setattr(jobworker.jobs.store.os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 10, *real_fstat(fd)[7:])))
    [loaded] = list(store.load())
    assert not loaded.problems and loaded.status.job_id == job.job_id


def test_the_collector_pauses_while_records_load_and_resumes_after(store: JobStore) -> None:
    import gc

    for _ in range(3):
        store.save(FakeJob(uuid.uuid4(), 0))
    assert gc.isenabled()
    during = [gc.isenabled() for _ in store.load()]
    assert during == [False] * 3 and gc.isenabled()
    loading = store.load()
    next(loading)
    assert not gc.isenabled()
    loading.close()  # abandoned half-way: the collector runs again
    assert gc.isenabled()


# -- write-behind (issue 17 item 4) -----------------------------------------------


class Soon:
    """
    The reactor's callFromThread, played: what the store's thread asks to
    run, run by the test when it likes.
    """

    def __init__(self) -> None:
        self.calls: list[object] = []

    def __call__(self, function: object) -> None:
        self.calls.append(function)

    def run(self) -> None:
        from twisted.logger import capturedLogs

        with capturedLogs() as logged:
            for function in self.calls:
                function()  # type: ignore[operator]
        self.calls = []
        self.logged = [event.get("log_format", "") for event in logged]


def wait_until(check: object, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def record_of(store: JobStore, job_id: uuid.UUID) -> dict:
    return json.loads(Path(store.jobs_dir, f"{job_id}.json").read_text())


def test_write_behind_syncs_records_off_the_callers_thread(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A job's first save is written before it returns (a start on a full
    disk is refused; a server that dies next leaves the record), but never
    synced on the caller's thread: every sync, and every later save, is the
    store's thread's.
    """
    import threading

    synced_on: list[str] = []
    real_fsync = os.fsync
    def fsync(fd: int) -> None:
        synced_on.append(threading.current_thread().name)
        real_fsync(fd)

    monkeypatch.setattr(jobworker.jobs.store.os, "fsync", fsync)
    store.write_behind(Soon())
    job = FakeJob(uuid.uuid4(), 1)
    store.save(job)
    assert record_of(store, job.job_id)["status"]["exit_code"] == 1
    assert synced_on == []
    job.exit_code = 2
    store.save(job)
    store.close()  # writes what is queued
    assert synced_on and threading.current_thread().name not in synced_on
    assert record_of(store, job.job_id)["status"]["exit_code"] == 2


def test_write_behind_merges_queued_saves_and_never_resurrects_a_forgotten_job(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    gate = threading.Event()
    written: list[bytes] = []
    real_replace = JobStore._replace

    def slow_replace(self: JobStore, path: str, content: bytes, **options: object) -> None:
        if threading.current_thread().name == "jobworker-records":
            gate.wait(5)
            written.append(content)
        real_replace(self, path, content, **options)  # type: ignore[arg-type]

    monkeypatch.setattr(JobStore, "_replace", slow_replace)
    store.write_behind(Soon())
    kept, forgotten = FakeJob(uuid.uuid4(), 0), FakeJob(uuid.uuid4(), 0)
    for job in (kept, forgotten):
        store.save(job)
    for code in range(1, 30):
        kept.exit_code = forgotten.exit_code = code
        store.save(kept)
        store.save(forgotten)
    store.forget(forgotten.job_id)
    gate.set()
    store.close()
    assert record_of(store, kept.job_id)["status"]["exit_code"] == 29
    assert len(written) <= 3  # one under way when the gate closed, the newest of each job
    assert not Path(store.jobs_dir, f"{forgotten.job_id}.json").exists()


def test_write_behind_retries_a_failed_write_until_it_is_written(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno as errno_

    monkeypatch.setattr(jobworker.jobs.store, "WRITE_RETRY_S", 0.01)
    soon = Soon()
    store.write_behind(soon)
    job = FakeJob(uuid.uuid4(), 1)
    store.save(job)
    full = True
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if full:
            raise OSError(errno_.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(jobworker.jobs.store.os, "write", write)
    job.exit_code = 7
    store.save(job)  # no error here: it is the thread's
    wait_until(lambda: soon.calls)
    soon.run()
    assert soon.logged == ["could not save job {job_id}: {error}; retrying every {interval} s"]
    assert record_of(store, job.job_id)["status"]["exit_code"] == 1  # the old record stays whole
    full = False
    wait_until(lambda: soon.calls)
    soon.run()
    assert soon.logged == ["job {job_id}: its record is saved again"]
    assert record_of(store, job.job_id)["status"]["exit_code"] == 7
    assert not list(Path(store.jobs_dir).glob("*.tmp"))


def test_write_behind_removes_a_settled_supervisors_files_off_the_callers_thread(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    The backlog, end record and socket of a job whose end is settled are
    removed by the store's thread (three unlinks the reactor does not
    wait for); closing the store waits for them; what cannot be removed
    is logged through the reactor, and left.
    """
    import threading

    removed_on: list[str] = []
    real_unlink = os.unlink

    def unlink(path: str) -> None:
        removed_on.append(threading.current_thread().name)
        real_unlink(path)

    monkeypatch.setattr(jobworker.jobs.store.os, "unlink", unlink)
    soon = Soon()
    store.write_behind(soon)
    job_id, stuck = uuid.uuid4(), uuid.uuid4()
    paths = [store.backlog_path(job_id), store.end_path(job_id), store.socket_file(job_id)]
    for path in paths:
        Path(path).write_bytes(b"x")
    os.mkdir(store.end_path(stuck))  # not a file: unlink fails
    store.forget_supervisor_once_saved(job_id)
    store.forget_supervisor_once_saved(stuck)
    store.close()
    assert not any(os.path.exists(path) for path in paths)
    assert removed_on and threading.current_thread().name not in removed_on
    assert os.path.isdir(store.end_path(stuck))
    assert len(soon.calls) == 1  # the one failure's log line, for the reactor


def test_a_supervisors_files_go_once_the_final_record_is_written_never_before(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # The end record tells the next server how a job ended until the final
    # record does: unlinked first, a crash between read the job as lost.
    import errno as errno_

    monkeypatch.setattr(jobworker.jobs.store, "WRITE_RETRY_S", 0.01)
    soon = Soon()
    store.write_behind(soon)
    job = FakeJob(uuid.uuid4(), 1)
    store.save(job)
    files = [Path(store.backlog_path(job.job_id)), Path(store.end_path(job.job_id)), Path(store.socket_file(job.job_id))]
    for path in files:
        path.write_text("")
    full = True
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if full:
            raise OSError(errno_.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(jobworker.jobs.store.os, "write", write)
    job.exit_code = 0  # its final state
    store.save(job)
    store.forget_supervisor_once_saved(job.job_id)
    wait_until(lambda: soon.calls)  # the write failed
    assert all(path.exists() for path in files)
    full = False
    wait_until(lambda: not any(path.exists() for path in files))
    assert record_of(store, job.job_id)["status"]["exit_code"] == 0
