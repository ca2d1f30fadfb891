"""
Tests for a job's output log (L{jobworker.output.log}) and its on-disk spool
(L{jobworker.output.spool}).

The log is checked against a reference model: the plain list of every
record appended.  Whatever the ring size and retention limit, a reader from
any offset must get each byte the log still holds, with the right offset
and stream, and an explicit gap of exactly the right size for each byte it
no longer holds.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jobworker.output.log import RECORD_HEADER_SIZE, SCAN_BLOCK, Chunk, MemorySpool, OutputLog
from jobworker.output.spool import FileSpool, SpoolFailure

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Output as a job writes it: NULs, invalid UTF-8, anything.
payloads = st.one_of(st.binary(max_size=8), st.binary(min_size=8, max_size=60))


class RecordingSpool(MemorySpool):
    """
    A memory spool that remembers where each append began: the log writes
    one record per append, so these are the record boundaries.
    """

    def __init__(self) -> None:
        super().__init__()
        self.appends: list[bytes] = []

    def append(self, *pieces: bytes, mark: int | None = None) -> None:
        self.appends.append(b"".join(pieces))
        super().append(*pieces)

    def content(self) -> bytes:
        return self.pread(0, self.size)


class Reference:
    """
    What a perfect log would hold: every byte ever appended and its stream.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.fds = bytearray()
        self.records: list[tuple[int, int, int]] = []  # (offset, fd, length)

    def append(self, fd: int, data: bytes) -> None:
        if data:
            self.records.append((len(self.data), fd, len(data)))
        self.data += data
        self.fds += bytes((fd,)) * len(data)

    @property
    def end(self) -> int:
        return len(self.data)

    def record_starting_at(self, offset: int) -> tuple[int, int, int] | None:
        for record in self.records:
            if record[0] == offset:
                return record
        return None


def read_all(log: OutputLog, offset: int = 0, limit: int = 1 << 30) -> list[Chunk]:
    """
    Read from C{offset} to the current end, C{limit} bytes per call,
    checking what every single call promises.
    """
    chunks: list[Chunk] = []
    while offset < log.end:
        got = log.read(offset, limit)
        assert got, f"no progress at offset {offset} of {log.end}"
        assert sum(len(chunk.data) for chunk in got) <= limit
        for before, after in zip(got, got[1:]):
            # Adjacent bytes of one stream come as one chunk within a read.
            assert not (before.fd == after.fd != 0), f"uncoalesced chunks {before!r} {after!r}"
        for chunk in got:
            assert chunk.offset == offset, f"chunk at {chunk.offset}, expected {offset}"
            assert chunk.size > 0
            offset += chunk.size
        chunks += got
    assert offset == log.end
    assert log.read(offset, limit) == []
    return chunks


def check_against(reference: Reference, chunks: list[Chunk], start: int = 0) -> list[tuple[int, int]]:
    """
    Every data chunk holds exactly the reference bytes, all of one stream;
    return the gaps as (offset, length).
    """
    position = start
    gaps = []
    for chunk in chunks:
        assert chunk.offset == position
        if chunk.fd == 0:
            assert chunk.data == b""
            assert chunk.gap > 0
            gaps.append((chunk.offset, chunk.gap))
        else:
            assert chunk.fd in (1, 2)
            end = chunk.offset + len(chunk.data)
            # A memoryview equals the bytearray it matches; mypy thinks not.
            assert chunk.data == reference.data[chunk.offset : end]  # type: ignore[comparison-overlap]
            # Coalescing never merges the two streams.
            assert set(reference.fds[chunk.offset : end]) == {chunk.fd}
        position += chunk.size
    assert position == reference.end  # data and gaps cover [start, end) exactly
    return gaps


def normalized(chunks: list[Chunk]) -> list[tuple[int, int, bytes, int]]:
    """
    C{chunks} with adjacent pieces of one stream (or adjacent gaps) joined,
    so that reads cut at different places compare equal.
    """
    out: list[tuple[int, int, bytes, int]] = []
    for chunk in chunks:
        if out and out[-1][0] == chunk.fd:
            fd, offset, data, gap = out.pop()
            out.append((fd, offset, data + chunk.data, gap + chunk.gap))
        else:
            out.append((chunk.fd, chunk.offset, bytes(chunk.data), chunk.gap))
    return out


def whole_records(spool_bytes: bytes, appends: list[bytes]) -> list[tuple[int, int]]:
    """
    (spool position, log offset) after each whole record, from the spool
    format of the module docstring: fd u8, length u64 BE, data (none for a
    gap, fd 0).
    """
    position = offset = 0
    boundaries = [(0, 0)]
    for record in appends:
        fd, length = record[0], int.from_bytes(record[1:RECORD_HEADER_SIZE], "big")
        assert fd in (0, 1, 2)
        assert len(record) == RECORD_HEADER_SIZE + (0 if fd == 0 else length)
        assert length > 0
        position += len(record)
        offset += length
        boundaries.append((position, offset))
    assert position == len(spool_bytes)
    return boundaries


class OutputLogMachine(RuleBasedStateMachine):
    """
    Appends and reads in any order against a reference model, then close
    and reload from the spool alone (whole and torn).
    """

    @initialize(
        ring_size=st.integers(1, 32),
        retention=st.one_of(st.integers(0, 60), st.just(1 << 40)),
        close_after=st.integers(0, 150),
    )
    def setup(self, ring_size: int, retention: int, close_after: int) -> None:
        self.spool = RecordingSpool()
        self.log = OutputLog(self.spool, ring_size=ring_size, retention=retention)
        self.reference = Reference()
        self.ring_size = ring_size
        self.retention = retention
        # Closing ends the appends, so it waits for some output to exist.
        self.close_after = close_after

    @precondition(lambda self: not self.log.closed)
    @rule(fd=st.sampled_from([1, 2]), data=payloads)
    def append(self, fd: int, data: bytes) -> None:
        self.log.append(fd, data)
        self.reference.append(fd, data)

    @rule(where=st.floats(0, 1), limit=st.integers(1, 50))
    def read_from_anywhere(self, where: float, limit: int) -> None:
        offset = int(self.reference.end * where)
        chunks = read_all(self.log, offset, limit)
        reference = self.reference
        gaps = check_against(reference, chunks, offset)
        # Gaps only where the retention limit dropped bytes, never in the
        # last ring_size bytes a live follower needs.
        tail = reference.end - min(reference.end, self.ring_size)
        for gap_offset, gap_length in gaps:
            assert gap_offset >= min(self.retention, reference.end)
            assert gap_offset + gap_length <= tail

    @invariant()
    def end_counts_every_byte(self) -> None:
        assert self.log.end == self.reference.end

    @invariant()
    def gaps_account_for_exactly_what_was_dropped(self) -> None:
        reference = self.reference
        gaps = check_against(reference, read_all(self.log), 0)
        if self.retention >= reference.end:
            assert gaps == []
            return
        # At most one dropped range: from the retention limit to the start
        # of what the ring holds.
        assert len(normalized([Chunk(0, o, b"", n) for o, n in gaps])) <= 1
        if not gaps:
            return
        gap_end = gaps[-1][0] + gaps[-1][1]
        assert gaps[0][0] == self.retention
        # The ring keeps whole records: at least ring_size bytes, and no more
        # than ring_size plus one record (memory stays bounded).
        first = reference.record_starting_at(gap_end)
        assert first is not None, f"ring starts at {gap_end}, inside a record"
        held = reference.end - gap_end
        assert held >= self.ring_size
        assert held - first[2] < self.ring_size

    @precondition(lambda self: not self.log.closed and self.log.end >= self.close_after)
    @rule()
    def close_and_reload(self) -> None:
        before = normalized(read_all(self.log))
        self.log.close()
        assert self.log.closed
        with pytest.raises(ValueError):
            self.log.append(1, b"late")
        after = normalized(read_all(self.log))
        assert after == before

        content = self.spool.content()
        reloaded = OutputLog.from_spool(MemorySpool(content), ring_size=self.ring_size)
        assert reloaded.closed and reloaded.end == self.reference.end
        assert normalized(read_all(reloaded)) == before
        assert normalized(read_all(reloaded, limit=7)) == before

        # A torn spool (the server died mid-write) reloads up to its last
        # whole record, whatever the cut.
        boundaries = whole_records(content, self.spool.appends)
        cuts = {0, len(content), *range(0, len(content), max(1, len(content) // 12))}
        cuts |= {position - 1 for position, _ in boundaries if position}  # one byte short
        for cut in sorted(cuts):
            torn = OutputLog.from_spool(MemorySpool(content[:cut]))
            kept = max(offset for position, offset in boundaries if position <= cut)
            assert torn.end == kept
            assert normalized(read_all(torn)) == clip(before, kept)


def clip(segments: list[tuple[int, int, bytes, int]], end: int) -> list[tuple[int, int, bytes, int]]:
    out = []
    for fd, offset, data, gap in segments:
        if offset >= end:
            break
        room = end - offset
        out.append((fd, offset, data[:room], min(gap, room) if fd == 0 else 0))
    return out


TestOutputLogModel = OutputLogMachine.TestCase
TestOutputLogModel.settings = settings(
    max_examples=120, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# -- specific behaviours ---------------------------------------------------------


def test_streams_stay_separate_and_ordered() -> None:
    log = OutputLog(MemorySpool())
    log.append(1, b"out1 ")
    log.append(1, b"out2 ")
    log.append(2, b"err1 ")
    log.append(1, b"out3")
    assert log.read(0, 100) == [
        Chunk(1, 0, b"out1 out2 "),
        Chunk(2, 10, b"err1 "),
        Chunk(1, 15, b"out3"),
    ]


def test_read_limit_cuts_inside_a_record() -> None:
    log = OutputLog(MemorySpool(), ring_size=4, retention=0)
    log.append(1, b"abcdef")
    assert log.read(0, 3) == [Chunk(1, 0, b"abc")]
    assert log.read(3, 3) == [Chunk(1, 3, b"def")]


def test_reads_stay_on_record_boundaries() -> None:
    """
    A read stops before a record that would not fit whole, so the next
    read starts on a boundary and hands out the record itself, not a copy;
    only a record larger than the limit is cut.
    """
    first, second, third = b"a" * 10, b"b" * 10, b"c" * 10
    log = OutputLog(MemorySpool(), ring_size=100)
    for record in (first, second, third):
        log.append(1, record)
    assert log.read(5, 12) == [Chunk(1, 5, b"a" * 5)]  # not 5 + 7
    [chunk] = log.read(10, 12)
    assert chunk == Chunk(1, 10, second) and chunk.data is second
    assert log.read(0, 25) == [Chunk(1, 0, first + second)]
    assert log.read(0, 4) == [Chunk(1, 0, b"aaaa")]  # cut: larger than the limit


def test_spool_reads_stay_on_record_boundaries() -> None:
    """
    The same from the spool, once the ring has moved on: and the data comes
    as a view of what was read from the spool, with no slice copied out.
    """
    log = OutputLog(MemorySpool(), ring_size=10, retention=1 << 20)
    for index in range(6):
        log.append(1, bytes([65 + index]) * 10)
    assert log.read(5, 12) == [Chunk(1, 5, b"A" * 5)]
    [chunk] = log.read(10, 12)
    assert chunk == Chunk(1, 10, b"B" * 10) and isinstance(chunk.data, memoryview)
    assert [bytes(c.data) for c in log.read(0, 25)] == [b"A" * 10 + b"B" * 10]


def test_gap_past_retention_has_the_dropped_size() -> None:
    log = OutputLog(MemorySpool(), ring_size=10, retention=5)
    for index in range(10):
        log.append(1 + index % 2, bytes([index]) * 10)  # 100 bytes, 10 records
    # Spool: bytes [0, 5); ring: the last whole records holding >= 10 bytes.
    chunks = read_all(log)
    assert chunks[0] == Chunk(1, 0, b"\x00" * 5)
    assert chunks[1] == Chunk(0, 5, b"", 85)
    assert chunks[2] == Chunk(2, 90, b"\x09" * 10)
    log.close()
    assert read_all(log) == chunks


def test_no_gap_when_retention_holds_everything() -> None:
    log = OutputLog(MemorySpool(), ring_size=1, retention=1000)
    for index in range(100):
        log.append(1 + index % 2, b"%d;" % index)
    assert all(chunk.fd != 0 for chunk in read_all(log))


def test_ring_only_log_keeps_its_last_bytes() -> None:
    log = OutputLog(MemorySpool(), ring_size=8, retention=0)
    log.append(1, b"12345")
    log.append(2, b"abcde")
    log.append(1, b"XYZ")
    # Dropping "12345" still leaves 8 bytes; dropping "abcde" would not.
    assert read_all(log) == [Chunk(0, 0, b"", 5), Chunk(2, 5, b"abcde"), Chunk(1, 10, b"XYZ")]


def test_empty_append_changes_nothing() -> None:
    spool = RecordingSpool()
    log = OutputLog(spool)
    log.append(1, b"")
    assert log.end == 0 and spool.appends == []
    assert log.read(0, 10) == []


@pytest.mark.parametrize("fd", [0, 3, -1])
def test_append_refuses_other_fds(fd: int) -> None:
    log = OutputLog(MemorySpool())
    with pytest.raises(ValueError):
        log.append(fd, b"x")
    assert log.end == 0


def test_read_arguments() -> None:
    log = OutputLog(MemorySpool())
    log.append(1, b"abc")
    with pytest.raises(ValueError):
        log.read(-1, 10)
    assert log.read(3, 10) == []
    assert log.read(99, 10) == []
    assert log.read(0, 0) == []


def test_listeners_hear_appends_and_close() -> None:
    log = OutputLog(MemorySpool())
    heard: list[int] = []

    def listener() -> None:
        heard.append(log.end)

    log.subscribe(listener)
    log.append(1, b"ab")
    log.append(2, b"c")
    log.unsubscribe(listener)
    log.unsubscribe(listener)  # twice is harmless
    log.append(1, b"d")
    assert heard == [2, 3]
    log.subscribe(listener)
    log.close()
    assert heard == [2, 3, 4]


def test_close_twice_writes_once() -> None:
    spool = RecordingSpool()
    log = OutputLog(spool, ring_size=4, retention=2)
    log.append(1, b"abcdefgh")
    log.close()
    written = spool.content()
    log.close()
    assert spool.content() == written


@pytest.mark.parametrize("cut", range(1, RECORD_HEADER_SIZE + 3))
def test_torn_first_record(cut: int) -> None:
    spool = RecordingSpool()
    log = OutputLog(spool)
    log.append(2, b"xyz")
    log.close()
    torn = OutputLog.from_spool(MemorySpool(spool.content()[:cut]))
    assert torn.end == (3 if cut >= RECORD_HEADER_SIZE + 3 else 0)
    assert torn.closed


def test_reload_stops_at_a_corrupt_record() -> None:
    spool = RecordingSpool()
    log = OutputLog(spool)
    log.append(1, b"good")
    log.close()
    content = spool.content() + bytes((7,)) + (3).to_bytes(8, "big") + b"bad"
    reloaded = OutputLog.from_spool(MemorySpool(content))
    assert read_all(reloaded) == [Chunk(1, 0, b"good")]


@settings(SETTINGS, max_examples=15)
@given(
    sizes=st.lists(st.integers(1, 40_000), min_size=1, max_size=40),
    seed=st.integers(0, 2**32),
    starts=st.lists(st.floats(0, 1), min_size=1, max_size=10),
    limit=st.sampled_from([1000, 70_000, 1 << 20]),
    retention=st.sampled_from([300_000, 1 << 40]),
)
def test_large_output_read_through_the_spool_index(
    sizes: list[int], seed: int, starts: list[float], limit: int, retention: int
) -> None:
    """
    Output well past the spool's index granularity (64 KiB) reads back
    exactly from any offset, live, closed and reloaded.
    """
    generator = random.Random(seed)
    # At least 200 KiB, so that reads start from several index entries.
    sizes = sizes + [25_000] * 8
    records = [(generator.choice([1, 1, 2]), generator.randbytes(size)) for size in sizes]
    check_large_output(records, starts, limit, retention)


def test_records_larger_than_a_spool_read_block() -> None:
    """
    Records larger than the spool's 256 KiB read block, read with small and
    large limits from offsets inside them.
    """
    generator = random.Random(7)
    records = [(1, generator.randbytes(300_000)), (2, generator.randbytes(700_000)), (1, b"tail")]
    for limit in (5000, 1 << 20, 2 << 20):
        check_large_output(records, [0, 0.1, 0.25, 0.3, 0.6, 0.999], limit, 1 << 40)


def check_large_output(records: list[tuple[int, bytes]], starts: list[float], limit: int, retention: int) -> None:
    spool = RecordingSpool()
    log = OutputLog(spool, ring_size=4096, retention=retention)
    reference = Reference()
    for fd, data in records:
        log.append(fd, data)
        reference.append(fd, data)
    reloaded = None
    for stage in ("live", "closed", "reloaded"):
        if stage == "closed":
            log.close()
        if stage == "reloaded":
            reloaded = OutputLog.from_spool(MemorySpool(spool.content()), ring_size=4096)
        subject = reloaded if reloaded is not None else log
        for where in starts:
            offset = int(reference.end * where)
            check_against(reference, read_all(subject, offset, limit), offset)


# -- FileSpool -------------------------------------------------------------------


def sealed_and_written(spool: FileSpool) -> None:
    spool.seal()
    assert spool.flush(timeout=10), "the spool writer did not finish"


def test_file_spool_append_and_pread(tmp_path: Path) -> None:
    """
    Appended bytes read back at once, whether the writer thread has written
    them yet or not, and end up in the file in order.
    """
    path = str(tmp_path / "job.spool")
    spool = FileSpool(path)
    assert spool.size == 0
    spool.append(b"hello\x00")
    spool.append(b"\xffworld")
    assert spool.size == 12
    assert spool.pread(0, 6) == b"hello\x00"
    assert spool.pread(4, 4) == b"o\x00\xffw"  # across two appends
    assert spool.pread(6, 100) == b"\xffworld"  # short at the end
    assert spool.pread(12, 10) == b""
    sealed_and_written(spool)
    assert spool.error is None
    assert Path(path).read_bytes() == b"hello\x00\xffworld"
    assert spool.pread(3, 5) == b"lo\x00\xffw"
    assert os.stat(path).st_mode & 0o777 == 0o600  # job output may be private


@settings(SETTINGS, max_examples=30)
@given(
    pieces=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=30),
    reads=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 5000)), max_size=20),
)
def test_file_spool_reads_match_appends_while_writing(pieces: list[bytes], reads: list[tuple[int, int]]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        spool = FileSpool(os.path.join(directory, "job.spool"))
        content = b""
        for index, piece in enumerate(pieces):
            spool.append(piece)
            content += piece
            position, size = reads[index % len(reads)] if reads else (0, 10)
            position %= len(content) + 1
            assert spool.pread(position, size) == content[position : position + size]
        sealed_and_written(spool)
        assert spool.pread(0, len(content) + 1) == content
        spool.remove()


def test_file_spool_writes_the_pieces_of_an_append_in_order(tmp_path: Path) -> None:
    """
    A record's header and data are appended as separate pieces and written
    with one writev: they land contiguously, in order, between the
    neighbouring appends.
    """
    path = tmp_path / "job.spool"
    spool = FileSpool(str(path))
    spool.append(b"<")
    spool.append(b"head", b"", b"er|", b"data")
    spool.append(b">")
    assert spool.size == 13
    assert spool.pread(2, 9) == b"eader|dat"  # across pieces, before or after the write
    sealed_and_written(spool)
    assert path.read_bytes() == b"<header|data>"


def test_pieces_after_a_short_write() -> None:
    from jobworker.output.spool import _after

    pieces = [b"abc", b"", b"defg", b"h"]
    for skip in range(9):
        assert b"".join(_after(pieces, skip)) == b"abcdefgh"[skip:]
    assert _after(pieces, 0) is pieces  # nothing written yet: no copy


def test_file_spool_reopen_appends(tmp_path: Path) -> None:
    path = str(tmp_path / "job.spool")
    first = FileSpool(path)
    first.append(b"abc")
    sealed_and_written(first)
    again = FileSpool(path)
    assert again.size == 3
    again.append(b"def")
    assert again.pread(0, 6) == b"abcdef"
    sealed_and_written(again)
    assert FileSpool(path, create=False).size == 6


def test_file_spool_sealed_refuses_appends(tmp_path: Path) -> None:
    spool = FileSpool(str(tmp_path / "job.spool"))
    spool.append(b"abc")
    spool.seal()
    spool.seal()  # twice is harmless
    with pytest.raises(ValueError):
        spool.append(b"more")
    assert spool.flush(timeout=10)
    assert spool.pread(0, 10) == b"abc"
    assert spool.size == 3


def test_file_spool_read_only_cannot_append(tmp_path: Path) -> None:
    path = str(tmp_path / "job.spool")
    spool = FileSpool(path)
    spool.append(b"x")
    sealed_and_written(spool)
    reader = FileSpool(path, create=False)
    with pytest.raises(ValueError):
        reader.append(b"y")
    assert reader.pread(0, 10) == b"x"


def test_file_spool_remove(tmp_path: Path) -> None:
    path = tmp_path / "job.spool"
    spool = FileSpool(str(path))
    spool.append(b"abc")
    spool.remove()
    assert not path.exists()
    spool.remove()  # already gone: fine
    with pytest.raises(ValueError):
        spool.append(b"x")
    assert spool.flush(timeout=10)
    assert not path.exists()


def test_a_lazy_file_spool_is_made_by_the_writer_not_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A start made the times file on the reactor thread: up to 0.9 ms here.
    path = tmp_path / "job.times"
    made_on: list[str] = []
    real_open = os.open

    def watching_open(name, flags, *args):
        if str(name) == str(path) and flags & os.O_CREAT:
            made_on.append(threading.current_thread().name)
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", watching_open)
    spool = FileSpool(str(path), lazy=True)
    assert made_on == [] and not path.exists()
    spool.append(b"abc")
    spool.append(b"def")
    assert spool.pread(0, 6) == b"abcdef"  # from the queue or the file
    spool.seal()
    assert spool.flush(timeout=10)
    assert path.read_bytes() == b"abcdef"
    assert len(made_on) == 1 and made_on[0] != threading.current_thread().name


def test_a_lazy_file_spool_sealed_unwritten_leaves_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "job.times"
    spool = FileSpool(str(path), lazy=True)
    spool.seal()
    assert spool.flush(timeout=10)
    assert path.read_bytes() == b""


def test_a_lazy_file_spool_removed_leaves_no_file(tmp_path: Path) -> None:
    # Removed with writes still queued: the writer must not make the file
    # after the unlink.
    for number in range(50):
        path = tmp_path / f"job-{number}.times"
        spool = FileSpool(str(path), lazy=True)
        spool.append(b"x" * 1000)
        spool.remove()
        assert spool.flush(timeout=10)
    settled_writer = FileSpool(str(tmp_path / "last"), lazy=True)
    settled_writer.seal()
    assert settled_writer.flush(timeout=10)  # the writer is past every remove above
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["last"]


def test_a_lazy_file_spool_that_cannot_be_made_fails_and_is_retried(tmp_path: Path) -> None:
    directory = tmp_path / "later"
    spool = FileSpool(str(directory / "job.times"), lazy=True)
    spool.append(b"lost")
    deadline = time.monotonic() + 10
    while spool.failure is None:
        assert time.monotonic() < deadline, "no failure reported"
        time.sleep(0.001)
    assert isinstance(spool.error, FileNotFoundError) and spool.failure.position == 0
    directory.mkdir()
    spool.resume()
    spool.append(b"kept")
    spool.seal()
    assert spool.flush(timeout=10)
    assert (directory / "job.times").read_bytes() == b"kept"


def settled(spool: FileSpool, timeout: float = 10) -> None:
    """
    Wait until the writer thread has dealt with everything queued.
    """
    deadline = time.monotonic() + timeout
    while spool.backlog:
        assert time.monotonic() < deadline, "the spool writer did not catch up"
        time.sleep(0.001)


def test_file_spool_drops_what_it_could_not_write() -> None:
    """
    On a full disk the spool must not keep the bytes in memory (it did: 32
    MiB per job, for ever, since the first error stopped every later
    write).  It drops them, reports where it stopped and the mark of the
    first record lost, and drops appends until resumed.  /dev/full fails
    every write with ENOSPC.
    """
    spool = FileSpool("/dev/full")
    failures: list[SpoolFailure] = []
    spool.on_failed = failures.append
    spool.append(b"A" * 10, mark=0)
    spool.append(b"B" * 10, mark=10)
    settled(spool)
    assert spool.failure is not None and spool.failure.error.errno == errno.ENOSPC
    assert (spool.failure.position, spool.failure.mark) == (0, 0)
    assert failures == [spool.failure]
    assert spool.backlog == 0 and spool.size == 0
    assert spool.pread(0, 30) == b""
    spool.append(b"C" * 10, mark=20)  # dropped at once
    assert spool.backlog == 0
    spool.resume()
    assert spool.failure is None
    spool.append(b"D" * 10, mark=30)
    settled(spool)
    assert spool.failure is not None and spool.failure.mark == 30
    assert len(failures) == 2
    sealed_and_written(spool)


class FillingDisk:
    """
    Makes the spool's writes fail with ENOSPC while C{full}, as a brief
    full disk would (a write that fits partly writes part, then fails).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import jobworker.output.spool

        self.full = False
        self.room = 0  # bytes a write may still take once full
        real = os.pwritev

        def pwritev(fd: int, buffers, offset: int) -> int:
            if not self.full:
                return real(fd, buffers, offset)
            if self.room <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            data = b"".join(bytes(b) for b in buffers)[: self.room]
            self.room -= len(data)
            return real(fd, [data], offset)

        monkeypatch.setattr(jobworker.output.spool.os, "pwritev", pwritev)


def test_a_brief_full_disk_becomes_a_gap_and_spooling_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = FillingDisk(monkeypatch)
    path = str(tmp_path / "job.out")
    spool = FileSpool(path)
    recovered = []
    spool.on_recovered = lambda: recovered.append(True)
    log = OutputLog(spool, ring_size=100)
    reference = Reference()

    def emit(fd: int, data: bytes) -> None:
        log.append(fd, data)
        reference.append(fd, data)

    emit(1, b"a" * 50)
    emit(2, b"b" * 50)
    settled(spool)
    disk.full, disk.room = True, 30  # the next record is written in part
    emit(1, b"c" * 50)
    settled(spool)
    assert spool.failure is not None and log.spool_failing
    for index in range(10):
        emit(1 + index % 2, bytes([65 + index]) * 40)  # 400 bytes; the ring keeps 100
    settled(spool)
    assert spool.backlog == 0  # nothing held for the disk
    live = read_all(log)
    gaps = check_against(reference, live)
    # Lost: from the failed record to the ring's first (three 40-byte records).
    assert gaps == [(100, reference.end - 120 - 100)]
    disk.full = False
    log.retry_spool()
    assert not log.spool_failing
    emit(2, b"tail")
    settled(spool)
    assert recovered == [True]
    assert check_against(reference, read_all(log)) == gaps
    log.close()
    sealed_and_written(spool)
    reloaded = OutputLog.from_spool(FileSpool(path, create=False), expected_end=reference.end)
    assert reloaded.damage is None
    assert normalized(read_all(reloaded)) == normalized(live + [Chunk(2, reference.end - 4, b"tail")])
    assert log.lost_bytes == gaps[0][1]


class FlakySpool(MemorySpool):
    """
    A memory spool whose disk can fill: while full, an append fails, and
    drops itself and every append until resume(), as FileSpool does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.full = False
        self.failure: SpoolFailure | None = None

    def append(self, *pieces: bytes, mark: int | None = None) -> None:
        if self.failure is not None:
            return
        if self.full:
            from jobworker.output.spool import SpoolFailure

            self.failure = SpoolFailure(self.size, mark, OSError(errno.ENOSPC, "full"))
            return
        super().append(*pieces)

    def resume(self) -> None:
        self.failure = None


@settings(SETTINGS, max_examples=200)
@given(
    steps=st.lists(
        st.one_of(
            st.tuples(st.sampled_from([1, 2]), payloads),
            st.sampled_from(["full", "space", "retry"]),
        ),
        max_size=60,
    ),
    ring_size=st.integers(1, 40),
    retention=st.one_of(st.integers(0, 200), st.just(1 << 40)),
)
def test_a_full_disk_never_loses_output_silently(steps, ring_size: int, retention: int) -> None:
    """
    Whenever the disk fills and empties, every reader (live, and from the
    spool after a restart) gets each byte the log holds and an explicit gap
    of the exact size for each byte it does not; the newest ring_size bytes
    are never a gap while the job runs.
    """
    spool = FlakySpool()
    log = OutputLog(spool, ring_size=ring_size, retention=retention)
    reference = Reference()
    for step in steps:
        if step == "full":
            spool.full = True
        elif step == "space":
            spool.full = False
        elif step == "retry":
            log.retry_spool()
        else:
            log.append(*step)
            reference.append(*step)
        gaps = check_against(reference, read_all(log))
        tail = reference.end - min(reference.end, ring_size)
        for gap_offset, gap_length in gaps:
            assert gap_offset + gap_length <= tail
    spool.full = False
    live = normalized(read_all(log))
    log.close()
    assert normalized(read_all(log)) == live
    reloaded = OutputLog.from_spool(MemorySpool(spool.pread(0, spool.size)), expected_end=reference.end)
    check_against(reference, read_all(reloaded))
    assert normalized(read_all(reloaded)) == live


# -- damage ------------------------------------------------------------------------


def test_a_truncated_spool_under_a_live_log_is_a_gap_not_a_spin(tmp_path: Path) -> None:
    """
    A spool truncated behind the server's back made the reader count a
    short pread as progress and read the same offset for ever.
    """
    path = tmp_path / "job.out"
    spool = FileSpool(str(path))
    log = OutputLog(spool, ring_size=1000)
    damage: list[str] = []
    log.on_damage = damage.append
    reference = Reference()
    for index in range(40):
        data = bytes([65 + index % 26]) * 5000  # 200 KB, four index entries
        log.append(1, data)
        reference.append(1, data)
    settled(spool)
    os.truncate(path, 70_000)
    chunks = read_all(log, 0, 10_000)  # read_all fails on any read without progress
    gaps = check_against(reference, chunks)
    assert gaps and gaps[0][0] < 70_000
    assert damage and "byte" in damage[0] and log.damage == damage[0]
    assert len(damage) == 1  # noted once
    # What comes after the hole, where the index knows a record, reads on.
    assert any(chunk.fd == 1 and chunk.offset > 100_000 for chunk in chunks)
    sealed_and_written(spool)


def test_a_deleted_spool_reads_as_a_gap(tmp_path: Path) -> None:
    path = tmp_path / "job.out"
    spool = FileSpool(str(path))
    log = OutputLog(spool)
    log.append(1, b"x" * 100)
    log.close()
    sealed_and_written(spool)
    os.unlink(path)
    assert read_all(log) == [Chunk(0, 0, b"", 100)]
    assert "cannot read" in (log.damage or "")


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda content: content[:15], "missing"),  # truncated in the second record
        (lambda content: content[:13] + b"\x07" + content[14:], "bad record header at byte 13"),
        (lambda content: content[:13] + b"\x00" + bytes(8) + content[22:], "bad record header at byte 13"),
    ],
    ids=["truncated", "bad-fd", "empty-gap"],
)
def test_a_damaged_spool_reloads_its_readable_part_and_a_gap(damage, expected: str) -> None:
    spool = RecordingSpool()
    log = OutputLog(spool)
    log.append(1, b"good")
    log.append(2, b"lost")
    log.close()
    reloaded = OutputLog.from_spool(MemorySpool(damage(spool.content())), expected_end=8)
    assert normalized(read_all(reloaded)) == [(1, 0, b"good", 0), (0, 4, b"", 4)]
    assert expected in (reloaded.damage or "")


def test_a_sound_spool_reloads_without_damage() -> None:
    spool = RecordingSpool()
    log = OutputLog(spool)
    log.append(1, b"good")
    log.close()
    reloaded = OutputLog.from_spool(MemorySpool(spool.content()), expected_end=4)
    assert reloaded.damage is None and reloaded.end == 4


def test_output_log_survives_a_restart_on_disk(tmp_path: Path) -> None:
    path = str(tmp_path / "job.spool")
    spool = FileSpool(path)
    log = OutputLog(spool, ring_size=16, retention=40)
    reference = Reference()
    for index in range(30):
        data = b"%02d\x00\xfe" % index
        log.append(1 + index % 2, data)
        reference.append(1 + index % 2, data)
    before = normalized(read_all(log))
    log.close()
    assert normalized(read_all(log)) == before  # read while the writer may lag
    spool.seal()
    assert spool.flush(timeout=10)
    reloaded = OutputLog.from_spool(FileSpool(path, create=False), ring_size=16)
    after = normalized(read_all(reloaded, limit=9))
    assert after == before
    gaps = check_against(reference, read_all(reloaded), 0)
    assert gaps and gaps[0][0] == 40


class CountingReads(MemorySpool):
    """
    A spool that notes each read: (position, bytes asked for).
    """

    def __init__(self, content: bytes) -> None:
        super().__init__(content)
        self.reads: list[tuple[int, int]] = []

    def pread(self, position: int, size: int) -> bytes:
        self.reads.append((position, size))
        return super().pread(position, size)


def test_a_reopened_spool_of_small_records_is_scanned_in_blocks() -> None:
    spool = RecordingSpool()
    log = OutputLog(spool)
    for index in range(5000):
        log.append(1 + index % 2, b"%09d\n" % index)
    log.close()
    counting = CountingReads(spool.content())
    reloaded = OutputLog.from_spool(counting)
    assert len(counting.reads) <= spool.size // SCAN_BLOCK + 1
    assert b"".join(chunk.data for chunk in read_all(reloaded)) == b"".join(b"%09d\n" % index for index in range(5000))


def test_a_reopened_spool_of_large_records_is_scanned_header_by_header() -> None:
    spool = RecordingSpool()
    log = OutputLog(spool)
    for index in range(6):
        log.append(1, bytes([index]) * (100 << 10))
    log.close()
    counting = CountingReads(spool.content())
    reloaded = OutputLog.from_spool(counting)
    assert reloaded.end == 6 * (100 << 10) and reloaded.damage is None
    # One block at the start, then only the headers: no record's data.
    assert counting.reads[1:] == [(index * (RECORD_HEADER_SIZE + (100 << 10)), RECORD_HEADER_SIZE) for index in range(1, 6)]


def test_a_spool_shorter_than_it_said_is_a_short_read() -> None:
    spool = RecordingSpool()
    log = OutputLog(spool)
    for _ in range(100):
        log.append(1, b"ab")
    log.close()
    content = spool.content()

    class Shrunk(MemorySpool):
        # The file lost its second half after its size was taken.
        size = len(content)

        def pread(self, position: int, size: int) -> bytes:
            return content[: len(content) // 2][position : position + size]

    reloaded = OutputLog.from_spool(Shrunk(), expected_end=200)
    assert reloaded.damage is not None and "short read" in reloaded.damage
