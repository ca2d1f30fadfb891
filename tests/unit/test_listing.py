"""
Lists that scale (issue 17 item 3): a page costs what it lists, not what
the server knows.  These count the work (statuses asked for, statuses
encoded, jobs read, sort keys computed) instead of timing it, so that they
fail on a server that pages after encoding everything, or sorts every job
for every page, whatever the machine's speed.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

import jobworker.protocol.listing as listing
import jobworker.protocol.wire as wire
from jobworker.policy import Identity, Role
from jobworker.protocol import messages as m
from jobworker.protocol.listing import ListIndex, list_order, list_page

T0 = 1_717_243_200_000_000


class CountingJob:
    """
    A job that counts what a list reads of it.
    """

    reads: dict[str, int] = {}

    def __init__(self, created_at: int, owner: str = "alice", state: m.JobState = m.JobState.EXITED) -> None:
        self.job_id = uuid.uuid4()
        self._created_at = created_at
        self.owner = owner
        self._state = state
        self.name = ""
        self.labels: tuple[tuple[str, str], ...] = ()

    @staticmethod
    def count(what: str) -> None:
        CountingJob.reads[what] = CountingJob.reads.get(what, 0) + 1

    @property
    def created_at(self) -> int:
        self.count("created_at")
        return self._created_at

    @property
    def state(self) -> m.JobState:
        self.count("state")
        return self._state

    def status(self) -> m.JobStatus:
        self.count("status")
        return m.JobStatus(self.job_id, self.owner, ("sleep", "1"), self._state, created_at=self._created_at)


@pytest.fixture
def reads() -> dict[str, int]:
    CountingJob.reads = {}
    return CountingJob.reads


def counting_encodes(monkeypatch: pytest.MonkeyPatch) -> list[m.JobStatus]:
    encoded: list[m.JobStatus] = []
    real = wire.encode_status

    def encode(status: m.JobStatus) -> bytes:
        encoded.append(status)
        return real(status)

    monkeypatch.setattr(wire, "encode_status", encode)
    monkeypatch.setattr(listing, "encode_status", encode)
    return encoded


def test_a_page_asks_for_and_encodes_only_the_statuses_it_lists(monkeypatch: pytest.MonkeyPatch, reads: dict[str, int]) -> None:
    jobs = [CountingJob(T0 + i) for i in range(3000)]
    index: ListIndex[CountingJob] = ListIndex()
    encoded = counting_encodes(monkeypatch)
    page = list_page(index.after(jobs, (0, 0)), m.ListRequest(1, max_jobs=10), 1 << 20)
    frame = wire.encode_message(page)
    assert [status.job_id for status in page.jobs] == [job.job_id for job in jobs[:10]]
    assert page.more
    assert reads["status"] == 10
    # Each listed status is encoded once, to size the page, and its frame
    # is made of those bytes; none of the others is encoded.
    assert len(encoded) == 10 and {status.job_id for status in encoded} == {job.job_id for job in jobs[:10]}
    assert wire.decode_body(frame[4], frame[5:]) == page


def test_a_page_after_a_cursor_reads_no_job_before_it(reads: dict[str, int]) -> None:
    jobs = [CountingJob(T0 + i, state=m.JobState.RUNNING if i % 2 else m.JobState.EXITED) for i in range(2000)]
    index: ListIndex[CountingJob] = ListIndex()
    list(index.after(jobs, (0, 0)))
    cursor = jobs[1500]
    request = m.ListRequest(2, cursor._created_at, cursor.job_id, max_jobs=5, states=m.state_mask([m.JobState.RUNNING]))
    reads.clear()
    page = list_page(index.after(jobs, (request.after_created_at, request.after_job_id.int)), request, 1 << 20)
    assert [status.job_id for status in page.jobs] == [job.job_id for job in jobs[1501:1511:2]]
    # The jobs from the cursor to the page's end, and not one more: no sort
    # keys again, no state of the 1,500 jobs before it.
    assert reads.get("created_at", 0) == 0
    assert reads["state"] == 11
    assert reads["status"] == 5


def test_a_newest_first_page_reads_no_job_after_its_cursor(reads: dict[str, int]) -> None:
    jobs = [CountingJob(T0 + i, state=m.JobState.RUNNING if i % 2 else m.JobState.EXITED) for i in range(2000)]
    index: ListIndex[CountingJob] = ListIndex()
    list(index.after(jobs, (0, 0)))
    cursor = jobs[500]
    request = m.ListRequest(
        2, cursor._created_at, cursor.job_id, max_jobs=5, states=m.state_mask([m.JobState.RUNNING]), newest_first=True
    )
    reads.clear()
    page = list_page(index.before(jobs, (request.after_created_at, request.after_job_id.int)), request, 1 << 20)
    assert [status.job_id for status in page.jobs] == [job.job_id for job in jobs[499:489:-2]]
    # From the cursor down to the page's end: not the 1,500 jobs after it.
    assert reads.get("created_at", 0) == 0
    assert reads["state"] == 11
    assert reads["status"] == 5


def test_the_index_merges_starts_and_removals_without_sorting_again(reads: dict[str, int]) -> None:
    jobs = {job.job_id: job for job in (CountingJob(T0 + i) for i in range(1000))}
    index: ListIndex[CountingJob] = ListIndex()
    list(index.after(list(jobs.values()), (0, 0)))
    assert reads["created_at"] == 1000  # one sort key each, once
    reads.clear()
    for page in range(3):
        list(index.after(list(jobs.values()), (T0 + 100 * page, 0)))
    assert reads.get("created_at", 0) == 0
    late, early = CountingJob(T0 + 5000), CountingJob(T0 - 1)  # one after all, one before all
    jobs[late.job_id], jobs[early.job_id] = late, early
    gone = list(jobs)[10]
    del jobs[gone]
    listed = list(index.after(list(jobs.values()), (0, 0)))
    assert reads["created_at"] == 2  # only the new jobs' keys
    assert listed == sorted(jobs.values(), key=lambda job: job._created_at)


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.one_of(st.tuples(st.just("add"), st.integers(0, 50)), st.tuples(st.just("remove"), st.integers(0, 1000))),
        max_size=40,
    ),
    cursor=st.integers(0, 60),
)
def test_the_index_lists_what_a_sort_would(steps: list[tuple[str, int]], cursor: int) -> None:
    jobs: dict[uuid.UUID, Any] = {}
    index: ListIndex[Any] = ListIndex()
    for action, value in steps:
        if action == "add":
            job = CountingJob(T0 + value)
            jobs[job.job_id] = job
        elif jobs:
            del jobs[list(jobs)[value % len(jobs)]]
        after = (T0 + cursor, uuid.UUID(int=0).int)
        expected = [job for job in sorted(jobs.values(), key=list_order) if list_order(job) > after]
        assert list(index.after(list(jobs.values()), after)) == expected
        # Newest first: those before the cursor (every job before (0, 0)),
        # in reverse; a cursor on a job excludes it either way.
        on = list(jobs.values())[value % len(jobs)] if jobs else None
        for before in [after, (0, 0)] + ([list_order(on)] if on is not None else []):
            newest = sorted(jobs.values(), key=list_order, reverse=True)
            expected = [job for job in newest if before == (0, 0) or list_order(job) < before]
            assert list(index.before(list(jobs.values()), before)) == expected


def test_the_manager_pages_from_its_index_and_hides_other_owners_jobs(tmp_path: Any) -> None:
    from twisted.internet import task

    from jobworker.jobs.manager import JobManager, JobManagerConfig

    manager = JobManager(task.Clock(), JobManagerConfig(state_dir=str(tmp_path / "state"), isolate=False))
    jobs = [CountingJob(T0 + i, owner="alice" if i % 3 else "bob") for i in range(30)]
    manager.jobs.update((job.job_id, job) for job in reversed(jobs))  # type: ignore[misc]  # stand-ins for jobs
    alice, admin = Identity("alice", Role.USER), Identity("root", Role.ADMIN)
    listed: list[Any] = list(manager.list(admin))
    assert listed == jobs
    listed = list(manager.list(alice, list_order(jobs[20])))
    assert listed == [job for job in jobs[21:] if job.owner == "alice"]
    listed = list(manager.list(admin, newest_first=True))
    assert listed == jobs[::-1]
    listed = list(manager.list(alice, list_order(jobs[20]), newest_first=True))
    assert listed == [job for job in reversed(jobs[:20]) if job.owner == "alice"]
