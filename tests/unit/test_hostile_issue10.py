"""
Hostile checks of issue 10 as merged: one past each limit, odd inputs and
combinations that the per-section tests did not try.  Each test here
reproduced a defect on the code it was written against; they are kept fast
(no server process) where the unit level proves the same thing.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobworker.jobs.store import JobStore
from jobworker.output.log import RECORD_HEADER_SIZE, OutputLog
from jobworker.output.spool import FileSpool
from jobworker.protocol import messages as m
from jobworker.protocol.wire import status_size

U64 = 2**64 - 1


def finishes(call: Callable[[], Any], unblock: Callable[[], None], timeout: float = 2) -> Any:
    """
    C{call()}'s result, run on a thread; fails (rather than hangs the
    suite) when it has not returned within C{timeout} seconds, after
    C{unblock()} has freed the thread.
    """
    result: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        unblock()
        thread.join(timeout)
        raise AssertionError(f"{call} blocked for more than {timeout} s")
    if errors:
        raise errors[0]
    return result[0]


def open_writer(path: Path) -> Callable[[], None]:
    """
    What frees a reader blocked opening the FIFO at C{path}: a writer.
    """

    def unblock() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)

    return unblock


def record(fd: int, length: int, data: bytes = b"") -> bytes:
    return bytes([fd]) + length.to_bytes(RECORD_HEADER_SIZE - 1, "big") + data


# -- section 5: damaged state ---------------------------------------------------


def test_a_job_record_that_is_a_fifo_does_not_hang_the_start_up(tmp_path: Path) -> None:
    # open() of a FIFO waits for a writer: the server never started.
    store = JobStore(str(tmp_path))
    os.makedirs(store.jobs_dir)
    job_id = uuid.uuid4()
    fifo = Path(store.jobs_dir) / f"{job_id}.json"
    os.mkfifo(fifo)
    [loaded] = finishes(lambda: list(store.load()), open_writer(fifo))
    assert loaded.status.job_id == job_id
    assert any("not a regular file" in problem for problem in loaded.problems), loaded.problems


def test_a_job_record_that_is_a_directory_or_dev_zero(tmp_path: Path) -> None:
    store = JobStore(str(tmp_path))
    os.makedirs(store.jobs_dir)
    directory, zero = uuid.uuid4(), uuid.uuid4()
    os.mkdir(Path(store.jobs_dir) / f"{directory}.json")
    os.symlink("/dev/zero", Path(store.jobs_dir) / f"{zero}.json")
    loaded = {item.status.job_id: item for item in finishes(lambda: list(store.load()), lambda: None)}
    assert set(loaded) == {directory, zero}
    # (This one held before: "cannot be read: Is a directory", and 16 MiB
    # of zeros read to find the record too large.)
    for item in loaded.values():
        assert item.problems, item


def test_a_spool_replaced_by_a_fifo_under_a_running_server_does_not_hang_a_reader(tmp_path: Path) -> None:
    # A finished job's spool is opened per read: a FIFO in its place blocked
    # the reactor thread in open() until somebody wrote to it.
    path = tmp_path / "job.out"
    path.write_bytes(record(1, 3, b"abc"))
    log = OutputLog.from_spool(FileSpool(str(path), create=False))
    path.unlink()
    os.mkfifo(path)
    chunks = finishes(lambda: log.read(0, 100), open_writer(path))
    assert [(chunk.offset, chunk.gap) for chunk in chunks] == [(0, 3)]
    assert log.damage and "output spool" in log.damage


def test_a_live_spool_replaced_by_a_fifo_does_not_hang_a_reader(tmp_path: Path) -> None:
    path = tmp_path / "job.out"
    spool = FileSpool(str(path))
    log = OutputLog(spool, ring_size=1)
    log.append(1, b"abc")
    log.append(1, b"defg")  # the ring keeps only this
    spool.seal()
    assert spool.flush(5)
    spool._sealed = False  # read as a running job's spool does, keeping one descriptor
    path.unlink()
    os.mkfifo(path)
    chunks = finishes(lambda: log.read(0, 100), open_writer(path))
    assert chunks and chunks[0].offset == 0 and chunks[0].gap == 3


def test_gap_records_that_add_up_past_u64_are_damage_not_an_unsendable_status(tmp_path: Path) -> None:
    # Two record headers whose lengths sum past 2**64 - 1: the output's end
    # did not fit the wire's u64, so status, list and logs of the job failed.
    path = tmp_path / "job.out"
    path.write_bytes(record(1, 3, b"abc") + record(0, U64) + record(1, 3, b"xyz"))
    log = OutputLog.from_spool(FileSpool(str(path), create=False))
    assert log.end <= U64
    assert log.damage and "bad record header" in log.damage
    assert log.read(0, 100)[0].data == b"abc"


def test_a_record_whose_output_end_is_at_the_u64_limit_still_encodes(tmp_path: Path) -> None:
    from jobworker.protocol import messages as m

    path = tmp_path / "job.out"
    path.write_bytes(record(1, 3, b"abc") + record(0, U64 - 3))
    log = OutputLog.from_spool(FileSpool(str(path), create=False), expected_end=U64)
    status = m.JobStatus(uuid.uuid4(), "alice", ("true",), m.JobState.EXITED, exit_code=0, output_bytes=log.end)
    assert status_size(status) > 0


# -- section 4: out of resources at start ----------------------------------------


@pytest.mark.parametrize("errno_", [errno.EMFILE, errno.ENFILE, errno.ENOSPC])
def test_a_uid_claim_that_fails_for_want_of_resources_is_out_of_resources(errno_: int) -> None:
    # The first file a start opens is its uid's lock file; when that failed
    # (no descriptors, a full disk) the start answered START_FAILED, not
    # OUT_OF_RESOURCES naming the cause as every later step does.
    from types import SimpleNamespace

    from jobworker.errors import ErrorCode, RequestError
    from jobworker.jobs.manager import JobManager

    def allocate(holder: str) -> int:
        raise OSError(errno_, os.strerror(errno_))

    manager = SimpleNamespace(uids=SimpleNamespace(allocate=allocate), _resource_error=JobManager._resource_error)
    with pytest.raises(RequestError) as refused:
        JobManager._allocate_uid(manager, uuid.uuid4(), "")  # type: ignore[arg-type]  # a stand-in manager
    assert refused.value.code is ErrorCode.OUT_OF_RESOURCES
    assert os.strerror(errno_) in refused.value.message


# -- section 1: the time options -----------------------------------------------------


@pytest.mark.parametrize(
    "option, value",
    [
        ("--keepalive-interval", "nan"),  # every connection then died with an Unhandled Error
        ("--keepalive-interval", "inf"),
        ("--idle-timeout", "nan"),
        ("--idle-timeout", "-1"),  # every connection closed at its hello
        ("--idle-timeout", "0"),
        ("--idle-timeout", "inf"),
        ("--handshake-timeout", "-5"),
        ("--handshake-timeout", "nan"),
        ("--grace", "nan"),
        ("--grace", "-1"),
        ("--grace", "inf"),
    ],
)
def test_server_time_options_must_be_finite_seconds(option: str, value: str) -> None:
    from twisted.python import usage

    from jobworker.server.service import Options

    with pytest.raises(usage.UsageError, match=option.lstrip("-")):
        Options().parseOptions([option, value])


@pytest.mark.parametrize("option, value", [("--keepalive-interval", "0"), ("--grace", "0"), ("--idle-timeout", "0.5")])
def test_server_time_options_within_the_rules(option: str, value: str) -> None:
    from jobworker.server.service import Options

    options = Options()
    options.parseOptions([option, value])
    assert options[option.lstrip("-")] == float(value)


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "abc"])
def test_jobcli_keepalive_must_be_finite_seconds(value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # "inf" passed, and the socket timeout then raised OverflowError; a bad
    # JOBWORKER_KEEPALIVE raised a traceback before any argument was read.
    from jobworker import cli

    with pytest.raises(SystemExit) as exited:
        cli._parser().parse_args(["--keepalive", value, "list"])
    assert exited.value.code == 2
    assert "keepalive" in capsys.readouterr().err
    # The environment's value is read when the command connects: one line
    # naming the variable, no traceback.
    monkeypatch.setenv("JOBWORKER_KEEPALIVE", value)
    args = cli._parser().parse_args(["list"])
    with pytest.raises(cli.UsageError, match="JOBWORKER_KEEPALIVE"):
        cli._keepalive(args)


# -- section 6: unexpected errors ------------------------------------------------------


def test_a_job_whose_status_raises_does_not_break_the_list(monkeypatch: pytest.MonkeyPatch) -> None:
    # A status that cannot be encoded was handled, but one that raises (a
    # usage read that fails in an unexpected way) made the whole ListRequest
    # INTERNAL: one job broke `jobcli list` for everyone.
    from twisted.logger import capturedLogs

    from tests.unit.test_server_protocol import T0, Session, list_all

    session = Session(monkeypatch)
    bad = session.manager.add(created_at=T0)
    good = session.manager.add(created_at=T0 + 1)
    bad.broken = True
    with capturedLogs() as logged:
        listed, _ = list_all(session)
    assert [status.job_id for status in listed] == [bad.job_id, good.job_id]
    assert listed[0].error and not listed[1].error
    assert any(str(bad.job_id) in str(event.get("job_id", "")) for event in logged)
    assert not session.closing


def test_paging_a_filtered_list_while_jobs_come_and_go(monkeypatch: pytest.MonkeyPatch) -> None:
    # Between pages: the cursor's own job is removed, a job not yet listed
    # stops matching the filter, new jobs start.  No job is listed twice;
    # every job that matched throughout is listed once, the new ones too.
    from tests.unit.test_server_protocol import T0, Session

    session = Session(monkeypatch)
    running = m.state_mask([m.JobState.RUNNING])
    kept = [session.manager.add(owner="alice", created_at=T0 + i) for i in range(9)]
    session.manager.add(owner="bob", created_at=T0 + 100)  # never matches the owner filter
    listed: list[uuid.UUID] = []
    after = (0, uuid.UUID(int=0))
    added = []
    for page_number in range(50):
        session.write(m.ListRequest(page_number + 1, after[0], after[1], max_jobs=2, states=running, owner="alice"))
        [page] = session.received()
        assert isinstance(page, m.ListResponse), page
        listed += [status.job_id for status in page.jobs]
        if not page.more:
            break
        after = (page.jobs[-1].created_at, page.jobs[-1].job_id)
        if page_number == 0:
            session.manager.remove(session.manager.jobs[page.jobs[-1].job_id])
            kept[5].state = m.JobState.EXITED  # no longer matches
        if page_number < 3:
            added.append(session.manager.add(owner="alice", created_at=T0 + 1000 + page_number))
    assert len(listed) == len(set(listed))
    expected = [job.job_id for job in kept if job is not kept[5]] + [job.job_id for job in added]
    assert listed == expected


def test_the_pending_cap_across_writes_counts_every_kind_of_request(monkeypatch: pytest.MonkeyPatch) -> None:
    # 128 waits over several writes fill the cap exactly: the next request
    # of any kind (a status too, spec section 13: "the new one included")
    # is refused, and one answer makes room for exactly one more.
    from jobworker.errors import ErrorCode
    from tests.unit.test_server_protocol import Session, errors_of

    session = Session(monkeypatch)
    job = session.manager.add()
    for first in range(1, 129, 32):
        session.write(*(m.WaitRequest(i, job.job_id) for i in range(first, first + 32)))
    assert errors_of(session.received()) == {}
    session.write(m.WaitRequest(129, job.job_id), m.StatusRequest(130, job.job_id))
    assert errors_of(session.received()) == {129: ErrorCode.TOO_MANY_REQUESTS, 130: ErrorCode.TOO_MANY_REQUESTS}
    job.ended[0].callback(job.status())
    session.received()
    session.write(m.StatusRequest(131, job.job_id), m.WaitRequest(132, job.job_id), m.WaitRequest(133, job.job_id))
    assert errors_of(session.received()) == {133: ErrorCode.TOO_MANY_REQUESTS}
