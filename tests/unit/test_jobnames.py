"""
Job names and labels (issue 13): their syntax and caps, the records that
keep them (old records without them still load), the list filters, and
their wire encoding.  No reactor.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from jobworker.errors import ErrorCode, RequestError
from jobworker.jobnames import (
    MAX_LABEL_KEY_BYTES,
    MAX_LABEL_VALUE_BYTES,
    MAX_LABELS,
    MAX_LABELS_BYTES,
    MAX_NAME_BYTES,
    NameError_,
    check_label_filter,
    check_labels,
    check_name,
    labels_match,
)
from jobworker.protocol import messages as m, wire
from jobworker.protocol.listing import check_list_filters, list_page
from jobworker.records import salvage_status, status_from_dict, status_to_dict


def test_names_follow_dockers_syntax():
    for good in ("web", "web-1", "a", "A.b_c-9", "0abc", "x" * MAX_NAME_BYTES):
        assert check_name(good) == good
    assert check_name("") == ""  # no name
    for bad in ("-web", ".x", "_x", "a b", "a/b", "ä", "a=b", "a\n", "web\x00", "x" * (MAX_NAME_BYTES + 1)):
        with pytest.raises(NameError_):
            check_name(bad)


def test_control_characters_and_invalid_utf8_are_refused():
    for bad in ("a\x07", "a\x1b[31m", "a\x7f", "a\x85"):
        with pytest.raises(NameError_):
            check_name(bad)
        with pytest.raises(NameError_, match="control character"):
            check_labels([("k", bad)])
    # Invalid UTF-8 as Python sees it from a command line (surrogateescape).
    surrogate = b"caf\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(NameError_, match="not valid UTF-8"):
        check_name(surrogate)
    with pytest.raises(NameError_, match="not valid UTF-8"):
        check_labels([("k", surrogate)])
    with pytest.raises(NameError_):
        check_labels([(surrogate, "v")])


def test_one_past_every_label_cap_is_refused():
    at_caps = [(f"k{index}", "v") for index in range(MAX_LABELS)]
    assert check_labels(at_caps) == tuple(at_caps)
    with pytest.raises(NameError_, match=f"at most {MAX_LABELS}"):
        check_labels([*at_caps, ("one", "more")])
    assert check_labels([("k" * MAX_LABEL_KEY_BYTES, "")])
    with pytest.raises(NameError_, match="label key"):
        check_labels([("k" * (MAX_LABEL_KEY_BYTES + 1), "")])
    assert check_labels([("k", "v" * MAX_LABEL_VALUE_BYTES)])
    with pytest.raises(NameError_, match="longer than"):
        check_labels([("k", "v" * (MAX_LABEL_VALUE_BYTES + 1))])
    # The total: four values of 1 KiB with keys of 1 byte are 4100 bytes.
    fitting = [(f"{index}", "v" * (MAX_LABELS_BYTES // 4 - 1)) for index in range(4)]
    assert sum(len(k) + len(v) for k, v in fitting) == MAX_LABELS_BYTES
    assert check_labels(fitting)
    with pytest.raises(NameError_, match="in all"):
        check_labels([*fitting[:3], ("3", "v" * (MAX_LABELS_BYTES // 4))])
    with pytest.raises(NameError_, match="twice"):
        check_labels([("a", "1"), ("a", "2")])
    with pytest.raises(NameError_):
        check_labels([("", "v")])
    with pytest.raises(NameError_):
        check_labels([("a=b", "v")])


def test_label_filters():
    assert check_label_filter("app") == ("app", None)
    assert check_label_filter("app=web") == ("app", "web")
    assert check_label_filter("app=") == ("app", "")
    assert check_label_filter("a=b=c") == ("a", "b=c")
    with pytest.raises(NameError_):
        check_label_filter("=web")
    labels = (("app", "web"), ("tier", ""))
    assert labels_match(labels, ["app", "app=web", "tier", "tier="])
    assert not labels_match(labels, ["app=db"])
    assert not labels_match(labels, ["zone"])
    assert not labels_match(labels, ["tier=x"])
    assert labels_match(labels, [])


def test_records_keep_names_and_labels_and_old_records_load():
    status = m.JobStatus(uuid.uuid4(), "alice", ("true",), m.JobState.EXITED, exit_code=0, name="web-1", labels=(("app", "web"), ("b", "2")))
    record = status_to_dict(status)
    assert record["name"] == "web-1" and record["labels"] == {"app": "web", "b": "2"}
    assert status_from_dict(record) == status
    old = dict(record)
    del old["name"], old["labels"]
    loaded = status_from_dict(old)
    assert loaded.name == "" and loaded.labels == ()
    damaged = {**record, "name": "-bad\x07", "labels": {"k": "v\x00"}}
    salvaged, problems = salvage_status(damaged)
    assert salvaged.name == "" and salvaged.labels == ()
    assert any(problem.startswith("name:") for problem in problems)
    assert any(problem.startswith("labels:") for problem in problems)


@dataclass
class _Job:
    job_id: uuid.UUID
    owner: str
    created_at: int
    name: str
    labels: tuple[tuple[str, str], ...]
    state: m.JobState = m.JobState.RUNNING

    def status(self) -> m.JobStatus:
        return m.JobStatus(self.job_id, self.owner, ("x",), self.state, created_at=self.created_at, name=self.name, labels=self.labels)


def test_list_page_filters_on_name_and_labels():
    jobs = [
        _Job(uuid.UUID(int=1), "alice", 1, "web-1", (("app", "web"), ("tier", "front"))),
        _Job(uuid.UUID(int=2), "alice", 2, "db", (("app", "db"),)),
        _Job(uuid.UUID(int=3), "bob", 3, "", ()),
    ]

    def names(**filters) -> list[str]:
        page = list_page(jobs, m.ListRequest(1, **filters), 1 << 20)
        return [status.name for status in page.jobs]

    assert names() == ["web-1", "db", ""]
    assert names(name="db") == ["db"]
    assert names(labels=("app",)) == ["web-1", "db"]
    assert names(labels=("app=web",)) == ["web-1"]
    assert names(labels=("app", "tier=front")) == ["web-1"]
    assert names(labels=("app=nope",)) == []
    assert names(name="web-1", labels=("app=db",)) == []


def test_list_filters_past_the_caps_are_refused():
    check_list_filters(m.ListRequest(1, name="web", labels=tuple(f"k{i}" for i in range(MAX_LABELS))))
    with pytest.raises(RequestError) as refused:
        check_list_filters(m.ListRequest(1, labels=tuple(f"k{i}" for i in range(MAX_LABELS + 1))))
    assert refused.value.code is ErrorCode.BAD_REQUEST
    for bad in ({"name": "-x"}, {"labels": ("=v",)}, {"labels": ("k=\x07",)}):
        with pytest.raises(RequestError):
            check_list_filters(m.ListRequest(1, **bad))


def test_start_request_and_status_carry_names_and_labels():
    request = m.StartRequest(1, ("true",), name="web-1", labels=(("app", "web"),))
    frame = wire.encode_message(request)
    assert wire.decode_body(frame[4], frame[5:]) == request
    status = m.JobStatus(uuid.UUID(int=9), "alice", ("true",), m.JobState.RUNNING, name="n", labels=(("a", "b"),))
    frame = wire.encode_message(m.StatusResponse(2, status))
    assert wire.decode_body(frame[4], frame[5:]) == m.StatusResponse(2, status)


def test_an_abridged_status_with_labels_at_their_caps_fits_the_smallest_frame():
    labels = tuple((f"{index:03d}" + "k" * 60, "v" * 60) for index in range(MAX_LABELS))
    assert check_labels(labels)
    status = m.JobStatus(
        uuid.UUID(int=9), "o" * 5000, tuple("a" * 5000 for _ in range(40)), m.JobState.RUNNING,
        error="e" * 5000, name="n" * MAX_NAME_BYTES, labels=labels,
    )
    assert wire.status_size(m.abridge(status)) < (16 << 10) - 100
