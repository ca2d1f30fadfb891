"""
Output times (issue 13): the time marks of an output log, their times file
beside the spool, and their wire encoding (TimeMark, FollowRequest's
timestamps and since).  No reactor.
"""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import given, settings, strategies as st

from jobworker.output.log import (
    GAP_FD,
    MARK_STEP_US,
    TIME_FILE_MAGIC,
    MemorySpool,
    OutputLog,
    TimeMarks,
)
from jobworker.output.spool import FileSpool
from jobworker.protocol import messages as m, wire

T0 = 1_780_000_000_000_000  # µs


def read_all(log: OutputLog) -> bytes:
    data = b""
    offset = 0
    while True:
        chunks = log.read(offset, 1 << 20)
        if not chunks:
            return data
        for chunk in chunks:
            if chunk.fd != GAP_FD:
                data += bytes(chunk.data)
            offset = chunk.offset + chunk.size


# -- TimeMarks ---------------------------------------------------------------------


def test_one_mark_per_chunk_read_and_none_within_the_step():
    marks = TimeMarks()
    assert marks.add(0, T0) == (0, T0)
    assert marks.add(10, T0 + MARK_STEP_US - 1) is None  # too soon: takes the last mark's time
    assert marks.add(20, T0 + MARK_STEP_US) == (20, T0 + MARK_STEP_US)
    assert list(marks.offsets) == [0, 20]


def test_a_clock_stepped_back_never_makes_times_go_backwards():
    marks = TimeMarks()
    marks.add(0, T0 + 5_000_000)
    marks.add(5, T0)  # the wall clock went back 5 s
    assert list(marks.times) == [T0 + 5_000_000]
    marks.add(9, T0 + 5_000_000 + MARK_STEP_US)
    assert list(marks.times) == sorted(marks.times)


def test_between_gives_the_mark_in_force_then_those_inside():
    marks = TimeMarks()
    for index in range(5):
        marks.add(index * 100, T0 + index * 1_000_000)
    assert marks.between(150, 350) == [(150, T0 + 1_000_000), (200, T0 + 2_000_000), (300, T0 + 3_000_000)]
    assert marks.between(0, 1) == [(0, T0)]
    assert TimeMarks().between(0, 100) == []


def test_offset_at_is_the_first_byte_read_since():
    marks = TimeMarks()
    for index in range(5):
        marks.add(index * 100, T0 + index * 1_000_000)
    assert marks.offset_at(T0 + 2_000_000, 500) == 200
    assert marks.offset_at(T0 + 1_500_000, 500) == 200
    assert marks.offset_at(0, 500) == 0
    # Nothing read that recently: the end.
    assert marks.offset_at(T0 + 9_000_000, 500) == 500


def test_memory_is_bounded_by_thinning_and_a_growing_step():
    marks = TimeMarks(max_marks=8)
    for index in range(100):
        marks.add(index, T0 + index * MARK_STEP_US * 10)
    assert len(marks) <= 8
    assert marks.step_us > MARK_STEP_US
    assert marks.offsets[0] == 0 and list(marks.offsets) == sorted(set(marks.offsets))
    assert list(marks.times) == sorted(marks.times)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1000), st.integers(-10_000, 10_000_000)), max_size=60))
def test_marks_stay_ordered_whatever_the_clock_does(steps):
    marks = TimeMarks(max_marks=16)
    offset, now = 0, T0
    for size, delta in steps:
        now += delta
        marks.add(offset, now)
        offset += size
    assert list(marks.offsets) == sorted(set(marks.offsets))
    assert list(marks.times) == sorted(marks.times)
    assert len(marks) <= 16
    for start in range(0, offset + 1, 97):
        found = marks.between(start, start + 50)
        assert [o for o, _ in found] == sorted(o for o, _ in found)


# -- the log and its times file ------------------------------------------------------


def make_log(times: MemorySpool | None = None, **options) -> tuple[OutputLog, MemorySpool, MemorySpool]:
    spool = MemorySpool()
    times = MemorySpool() if times is None else times
    return OutputLog(spool, times=times, **options), spool, times


def test_append_records_when_each_chunk_was_read_and_the_file_keeps_it():
    log, spool, times = make_log()
    log.append(1, b"one\n", at=T0)
    log.append(2, b"err\n", at=T0 + 2_000_000)
    log.append(1, b"two\n", at=T0 + 2_000_100)  # within the step: no mark of its own
    log.close()
    assert log.marks.between(0, log.end) == [(0, T0), (4, T0 + 2_000_000)]
    content = times.pread(0, times.size)
    assert content[:8] == TIME_FILE_MAGIC
    assert len(content) == 8 + 2 * 16
    again = OutputLog.from_spool(MemorySpool(spool.pread(0, spool.size)), times=MemorySpool(content))
    assert again.has_times and again.times_damage is None
    assert again.marks.between(0, again.end) == [(0, T0), (4, T0 + 2_000_000)]
    assert read_all(again) == b"one\nerr\ntwo\n"


def test_the_default_clock_is_now():
    ticks = iter([T0, T0 + 5_000_000])
    log, _, _ = make_log(clock=lambda: next(ticks))
    log.append(1, b"a")
    log.append(1, b"b")
    assert log.marks.between(0, 2) == [(0, T0), (1, T0 + 5_000_000)]


def test_marks_of_the_tail_past_retention_are_written_at_close():
    log, spool, times = make_log(retention=10, ring_size=100)
    log.append(1, b"0123456789", at=T0)  # the spooled head
    log.append(1, b"x" * 30, at=T0 + 1_000_000)  # ring only while it runs
    log.append(1, b"y" * 30, at=T0 + 2_000_000)
    assert times.size == 8 + 16  # only the head's mark so far
    log.close()
    again = OutputLog.from_spool(MemorySpool(spool.pread(0, spool.size)), times=MemorySpool(times.pread(0, times.size)))
    assert again.marks.between(0, again.end) == [(0, T0), (10, T0 + 1_000_000), (40, T0 + 2_000_000)]


def _todays_spool(tmp_path, content: list[tuple[int, bytes]]) -> str:
    """
    A spool written the way a server writes one today (the spool file and
    its format unchanged), without a times file: what an older server left.
    """
    path = str(tmp_path / f"{uuid.uuid4()}.out")
    spool = FileSpool(path)
    log = OutputLog(spool)  # no times file: as a server before them
    for fd, data in content:
        log.append(fd, data)
    log.close()
    spool.seal()
    assert spool.flush(10)
    return path


def test_a_spool_without_a_times_file_reads_as_before(tmp_path):
    path = _todays_spool(tmp_path, [(1, b"out\n"), (2, b"err\n")])
    assert not os.path.exists(path[:-4] + ".times")
    log = OutputLog.from_spool(FileSpool(path, create=False), expected_end=8, times=None)
    assert read_all(log) == b"out\nerr\n"
    assert log.damage is None
    assert not log.has_times
    assert log.marks.between(0, 8) == []
    # since: no byte is known to be that recent.
    assert log.marks.offset_at(T0, log.end) == log.end


def test_a_file_spool_and_times_file_survive_a_reopen(tmp_path):
    out = str(tmp_path / "job.out")
    times_path = str(tmp_path / "job.times")
    spool, times = FileSpool(out), FileSpool(times_path)
    log = OutputLog(spool, times=times)
    log.append(1, b"a" * 1000, at=T0)
    log.append(1, b"b" * 1000, at=T0 + 1_000_000)
    log.close()
    for each in (spool, times):
        each.seal()
        assert each.flush(10)
    again = OutputLog.from_spool(FileSpool(out, create=False), times=FileSpool(times_path, create=False))
    assert again.marks.between(0, again.end) == [(0, T0), (1000, T0 + 1_000_000)]


def _reopen_with_times(content: bytes, marks=((0, T0), (4, T0 + 1_000_000), (8, T0 + 2_000_000))) -> OutputLog:
    log, spool, _ = make_log()
    for _offset, at in marks:
        log.append(1, b"abc\n", at=at)
    log.close()
    return OutputLog.from_spool(MemorySpool(spool.pread(0, spool.size)), times=MemorySpool(content))


@pytest.mark.parametrize(
    ("damage", "kept"),
    [
        ("bad magic", 0),
        ("offsets going back", 1),
        ("time going back", 1),
        ("offset past the end", 3),
        ("torn last entry", 3),
        ("zeros", 1),
    ],
)
def test_a_damaged_times_file_loses_only_times_from_the_damage_on(damage, kept):
    entries = [(0, T0), (4, T0 + 1_000_000), (8, T0 + 2_000_000)]
    good = TIME_FILE_MAGIC + b"".join(o.to_bytes(8, "big") + t.to_bytes(8, "big") for o, t in entries)
    content = {
        "bad magic": b"XXXXXXXX" + good[8:],
        "offsets going back": good[:8 + 16] + (0).to_bytes(8, "big") + (T0 + 5).to_bytes(8, "big") + good[8 + 32 :],
        "time going back": good[:8 + 16] + (4).to_bytes(8, "big") + (T0 - 1).to_bytes(8, "big") + good[8 + 32 :],
        "offset past the end": good + (99).to_bytes(8, "big") + (T0 + 9_000_000).to_bytes(8, "big"),
        "torn last entry": good + b"\x00\x01\x02",
        "zeros": good[:8 + 16] + bytes(32),
    }[damage]
    log = _reopen_with_times(content)
    assert read_all(log) == b"abc\n" * 3, "the output loses nothing"
    assert log.damage is None
    assert len(log.marks) == kept
    if damage == "torn last entry":
        assert log.times_damage is None  # the server died mid-write: not damage
    else:
        assert log.times_damage is not None


class _Unreadable(MemorySpool):
    def pread(self, position: int, size: int) -> bytes:
        raise OSError(5, "Input/output error")


def test_an_unreadable_times_file_is_noted_not_raised():
    log = _reopen_with_times(b"", marks=((0, T0),))
    assert not log.has_times
    log, spool, _ = make_log()
    log.append(1, b"x", at=T0)
    log.close()
    again = OutputLog.from_spool(MemorySpool(spool.pread(0, spool.size)), times=_Unreadable(b"x" * 40))
    assert "cannot read" in (again.times_damage or "")
    assert read_all(again) == b"x"


class _FailingTimes(MemorySpool):
    """A times spool whose disk is full: it drops appends until resumed."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: object | None = None
        self.resumed = 0

    def append(self, *pieces: bytes, mark: int | None = None) -> None:
        if self.failure is None and self.size >= 8:
            self.failure = "full"
            return
        super().append(*pieces, mark=mark)

    def resume(self) -> None:
        self.failure = None
        self.resumed += 1


def test_a_full_disk_under_the_times_file_costs_times_not_output():
    times = _FailingTimes()
    log, spool, _ = make_log(times=times)
    for index in range(4):
        log.append(1, b"line\n", at=T0 + index * 1_000_000)
    log.close()
    assert read_all(log) == b"line\n" * 4
    assert times.resumed >= 1
    assert len(log.marks) == 4  # memory keeps them while the server runs


# -- the wire ----------------------------------------------------------------------------


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_time_mark_fast_path_matches_the_schema(stream_id, offset, time):
    message = m.TimeMark(stream_id, offset, time)
    fast = wire.encode_time_mark(stream_id, offset, time)
    assert fast == wire.encode_message(message)
    assert len(fast) == wire.TIME_MARK_FRAME_SIZE
    assert wire.decode_body(fast[4], fast[5:]) == message


def test_follow_request_carries_timestamps_and_since():
    request = m.FollowRequest(1, uuid.UUID(int=5), 3, offset=7, timestamps=True, since=T0)
    frame = wire.encode_message(request)
    assert wire.decode_body(frame[4], frame[5:]) == request
    # The two fields are the body's last 9 bytes.
    assert frame[-9:] == b"\x01" + T0.to_bytes(8, "big")


def test_a_version_2_hello_is_refused():
    from jobworker.errors import ErrorCode, ProtocolError
    from jobworker.protocol.connection import Connection, Role

    server = Connection(Role.SERVER)
    server.send(m.ServerHello(m.PROTOCOL_VERSION, 1 << 20, "s", "alice", "user"))
    with pytest.raises(ProtocolError) as refused:
        server.receive_data(wire.encode_message(m.ClientHello(2, 1 << 20)))
    assert refused.value.code is ErrorCode.UNSUPPORTED_VERSION
    assert "version 2 is not supported" in refused.value.message


def test_a_reopened_logs_times_file_is_opened_and_read_on_first_use():
    """
    Given a function that opens it, the times file of a reopened log is
    opened only when its marks are first used, its damage reported then.
    """
    log, spool, times = make_log()
    log.append(1, b"abc\n", at=T0)
    log.append(1, b"def\n", at=T0 + 2_000_000)
    log.close()
    damaged = times.pread(0, times.size) + b"\x00" * 16
    opened: list[str] = []
    reported: list[str] = []

    def open_times() -> MemorySpool:
        opened.append("times")
        return MemorySpool(damaged)

    again = OutputLog.from_spool(MemorySpool(spool.pread(0, spool.size)), times=open_times, on_times_damage=reported.append)
    assert read_all(again) == b"abc\ndef\n"
    assert opened == [] and reported == []
    assert again.marks.between(0, again.end) == [(0, T0), (4, T0 + 2_000_000)]
    assert opened == ["times"] and len(reported) == 1 and "bad entry" in reported[0]
    assert again.times_damage == reported[0] and again.has_times
    assert opened == ["times"]
    # No times file at all: opened once, then the log has no times.
    none = OutputLog.from_spool(MemorySpool(spool.pread(0, spool.size)), times=lambda: None)
    assert not none.has_times and none.marks.between(0, none.end) == []
