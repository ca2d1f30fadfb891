"""
Tests for job statuses as plain dictionaries (L{jobworker.records}): the
JSON of C{jobcli status --json} and of the job records in the state
directory.
"""

from __future__ import annotations

import json
import uuid

import pytest
from hypothesis import given, settings, strategies as st

from jobworker.limits import Limits
from jobworker.protocol.messages import JobState, JobStatus, JobUsage, Network
from jobworker.protocol.wire import StatusSchema
from jobworker.records import RecordError, exit_status, salvage_status, status_from_dict, status_to_dict
from tests.unit.test_framing import limits, text, usages

SETTINGS = settings(max_examples=300, deadline=None)

# Microseconds since the epoch, up to the year 2100: the range job times
# take (JSON carries them as float seconds).
times = st.one_of(st.just(0), st.integers(1, 4_102_444_800 * 10**6))

statuses = st.builds(
    JobStatus,
    job_id=st.uuids(),
    owner=text,
    argv=st.lists(text, max_size=5).map(tuple),
    state=st.sampled_from(JobState),
    exit_code=st.integers(-1, 255),
    signal=st.integers(0, 64),
    created_at=times,
    started_at=times,
    ended_at=times,
    error=text,
    stopped_by=text,
    limits=limits,
    usage=usages,
    output_bytes=st.integers(0, 2**63),
    workdir=text,
    user=text,
    network=st.sampled_from(Network),
)


@SETTINGS
@given(status=statuses)
def test_round_trip_through_json(status: JobStatus) -> None:
    """
    A record written as JSON reads back as the same status.
    """
    data = json.loads(json.dumps(status_to_dict(status)))
    assert status_from_dict(data) == status


def test_json_view_of_a_finished_job() -> None:
    job_id = uuid.UUID("0b5e7c2a-3f2d-4d0e-9a57-5b1f0e6d2c11")
    status = JobStatus(
        job_id=job_id,
        owner="alice",
        argv=("sh", "-c", "exit 3"),
        state=JobState.EXITED,
        exit_code=3,
        created_at=1_700_000_000_000_000,
        started_at=1_700_000_000_250_000,
        ended_at=1_700_000_001_500_000,
        limits=Limits(memory_bytes=256 << 20),
        usage=JobUsage(cpu_usec=1234),
        output_bytes=42,
    )
    data = status_to_dict(status)
    assert data["id"] == "0b5e7c2a-3f2d-4d0e-9a57-5b1f0e6d2c11"
    assert data["owner"] == "alice"
    assert data["command"] == ["sh", "-c", "exit 3"]
    assert data["state"] == "exited"
    assert data["exit_code"] == 3
    assert data["signal"] is None
    assert data["created_at"] == 1_700_000_000.0
    assert data["started_at"] == 1_700_000_000.25
    assert data["ended_at"] == 1_700_000_001.5
    assert data["error"] is None and data["stopped_by"] is None
    assert data["network"] == "none"
    assert data["limits"]["memory_bytes"] == 256 << 20
    assert data["usage"]["cpu_usec"] == 1234
    assert data["output_bytes"] == 42
    json.dumps(data)  # JSON-ready as it is


def test_json_view_of_a_running_job() -> None:
    status = JobStatus(job_id=uuid.uuid4(), owner="bob", argv=("sleep", "9"), state=JobState.RUNNING)
    data = status_to_dict(status)
    assert data["state"] == "running"
    assert data["exit_code"] is None  # not exited: no code, not -1
    assert data["ended_at"] is None
    assert data["created_at"] is None


def test_json_view_of_a_signaled_job() -> None:
    status = JobStatus(job_id=uuid.uuid4(), owner="bob", argv=("x",), state=JobState.SIGNALED, signal=9)
    data = status_to_dict(status)
    assert data["signal"] == 9 and data["exit_code"] is None and data["state"] == "signaled"


def test_old_records_without_optional_fields() -> None:
    """
    Fields added later (workdir, user, network, limits, usage,
    output_bytes) default when a record lacks them; unknown limit names
    from a newer version are ignored.
    """
    data = status_to_dict(JobStatus(job_id=uuid.uuid4(), owner="a", argv=("x",), state=JobState.LOST))
    expected = status_from_dict(dict(data))
    for key in ("workdir", "user", "network", "limits", "usage", "output_bytes"):
        del data[key]
    assert status_from_dict(data) == expected
    data["limits"] = {"memory_bytes": 5, "gpu_count": 2}
    assert status_from_dict(data).limits == Limits(memory_bytes=5)


@pytest.mark.parametrize("key", ["id", "owner", "command", "state", "exit_code", "signal", "created_at", "error"])
def test_missing_required_field(key: str) -> None:
    data = status_to_dict(JobStatus(job_id=uuid.uuid4(), owner="a", argv=("x",), state=JobState.EXITED, exit_code=0))
    del data[key]
    with pytest.raises(RecordError, match=f"^{key}: missing"):
        status_from_dict(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


@pytest.mark.parametrize(
    "key, value",
    [
        ("id", 123),
        ("state", 3),
        ("state", None),
        ("network", None),
        ("limits", None),
        ("usage", []),
        ("created_at", float("inf")),  # json.loads reads "Infinity"
        ("created_at", float("nan")),
        # Found by hand against a live server: each made every `list` that
        # included the job drop the connection (the status could not be
        # encoded), and `logs` hang without an EndOfStream.
        ("signal", 300),
        ("exit_code", 2**40),
        ("created_at", 1e300),
        ("owner", 5),
        ("owner", None),
        ("command", ["ok", 7]),
        ("command", "sh"),
        ("exit_code", True),
        ("output_bytes", -1),
        ("output_bytes", 2**64),
        ("usage", {"pids_peak": 2**32}),
        ("limits", {"memory_bytes": -5}),
        ("error", "x" * 70_000),
        ("user", "\ud800"),  # a lone surrogate: not UTF-8
    ],
)
def test_corrupt_field_is_refused_with_its_name(key: str, value: object) -> None:
    record = status_to_dict(JobStatus(job_id=uuid.uuid4(), owner="a", argv=("x",), state=JobState.EXITED, exit_code=0))
    record[key] = value
    with pytest.raises(RecordError, match=f"^{key}"):
        status_from_dict(record)
    # Salvaged, the rest of the record is kept and the field defaults.
    salvaged, problems = salvage_status(record)
    assert len(problems) == 1 and problems[0].startswith(key)
    if key != "id":
        assert salvaged.job_id == uuid.UUID(record["id"])
        assert salvaged.owner == ("a" if key != "owner" else "")
    StatusSchema.build(salvaged)


def encodes(status: JobStatus) -> None:
    """
    C{status} can be sent to a client, and arrives as it is.
    """
    assert StatusSchema.parse(StatusSchema.build(status)) == status


@settings(SETTINGS, max_examples=300, report_multiple_bugs=False)
@given(status=statuses, data=st.data())
def test_a_damaged_record_is_refused_or_can_be_sent(status: JobStatus, data: st.DataObject) -> None:
    """
    Records are untrusted input: whatever a field holds, the validator
    either refuses the record with a L{RecordError} or returns a status
    that encodes on the wire (the defect was a status that did not, which
    broke every `list` that included it).
    """
    record = status_to_dict(status)
    for _ in range(data.draw(st.integers(1, 3), label="fields")):
        key = data.draw(st.sampled_from(sorted(record)), label="key")
        record[key] = data.draw(json_values, label="value")
    record = json.loads(json.dumps(record))
    try:
        loaded = status_from_dict(record)
    except RecordError:
        pass
    else:
        encodes(loaded)
    salvaged, problems = salvage_status(record, status.job_id)
    encodes(salvaged)
    assert salvaged.job_id == status.job_id
    if not problems:
        assert salvaged == status_from_dict(record)


@settings(SETTINGS, max_examples=200)
@given(value=json_values)
def test_anything_at_all_is_salvaged_without_raising(value: object) -> None:
    job_id = uuid.uuid4()
    salvaged, problems = salvage_status(value, job_id)
    encodes(salvaged)
    assert problems  # nothing drawn here is a whole record
    with pytest.raises(RecordError):
        status_from_dict(value)


def test_an_empty_object_is_not_a_record() -> None:
    with pytest.raises(RecordError, match="id: "):
        status_from_dict({})


# -- exit_status -------------------------------------------------------------------


def job(state: JobState, exit_code: int = -1, signal: int = 0) -> JobStatus:
    return JobStatus(job_id=uuid.uuid4(), owner="a", argv=("x",), state=state, exit_code=exit_code, signal=signal)


@pytest.mark.parametrize(
    "status, code",
    [
        (job(JobState.EXITED, 0), 0),
        (job(JobState.EXITED, 3), 3),
        (job(JobState.EXITED, 255), 255),
        (job(JobState.SIGNALED, signal=9), 137),
        (job(JobState.SIGNALED, signal=11), 139),
        (job(JobState.STOPPED, signal=15), 143),
        (job(JobState.OOM, signal=9), 137),
        (job(JobState.TIMEOUT, signal=9), 137),
        (job(JobState.FAILED, 127), 127),  # command not found
        (job(JobState.FAILED, 126), 126),  # not executable
        (job(JobState.FAILED, 125), 125),
        (job(JobState.FAILED), 125),
        (job(JobState.LOST), 125),
    ],
    ids=lambda value: value.state.label if isinstance(value, JobStatus) else str(value),
)
def test_exit_status(status: JobStatus, code: int) -> None:
    assert exit_status(status) == code


@settings(SETTINGS, max_examples=100)
@given(state=st.sampled_from(JobState), exit_code=st.integers(-1, 255), signal=st.integers(1, 64))
def test_a_signal_decides_the_exit_status(state: JobState, exit_code: int, signal: int) -> None:
    assert exit_status(job(state, exit_code, signal)) == 128 + signal


@settings(SETTINGS, max_examples=100)
@given(state=st.sampled_from(JobState), exit_code=st.integers(0, 255))
def test_the_job_exit_code_is_the_exit_status(state: JobState, exit_code: int) -> None:
    assert exit_status(job(state, exit_code)) == exit_code


@settings(max_examples=300, deadline=None)
@given(status=statuses, data=st.data())
def test_the_one_pass_check_reads_a_record_as_the_field_by_field_one(status: JobStatus, data: st.DataObject) -> None:
    """
    The fast path of salvage_status (issue 17: start-up with 10,000
    records) accepts only what the field-by-field path reads without a
    problem, and reads it to the same status; a changed field makes it give
    way to that path.
    """
    from jobworker import records

    record = json.loads(json.dumps(status_to_dict(status)))
    key = data.draw(st.sampled_from([None, *sorted(record)]))
    if key is not None:
        record[key] = data.draw(st.one_of(st.none(), st.integers(-5, 2**65), st.text(max_size=5), st.lists(st.integers(), max_size=2), st.floats(allow_nan=True)))
    fast = records._sound_status(record, status.job_id)
    monkeypatched = records._sound_status
    try:
        records._sound_status = lambda data, job_id: None
        slow, problems = salvage_status(record, status.job_id)
    finally:
        records._sound_status = monkeypatched
    if fast is not None:
        assert not problems and fast == slow
    elif key is None and all(text.isascii() for text in (status.owner, status.error, status.stopped_by, status.workdir, status.user, *status.argv)):
        raise AssertionError("a record as status_to_dict writes it took the slow path")
