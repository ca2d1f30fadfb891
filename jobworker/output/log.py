"""
A job's output: every byte from the first, with absolute offsets.

Design
======

The output of a job is one ordered sequence of records, each a run of
stdout (fd 1) or stderr (fd 2) bytes, or a gap.  Offsets count data bytes
over both streams together from 0, so one number places a follower anywhere
in the history and lets a client resume after a lost connection.

Two stores hold it:

  - the spool, an append-only file of records (9-byte header: fd u8,
    length u64 big-endian; then the data, none for a gap with fd 0),
    holding the first C{retention} bytes;
  - the ring, the last C{ring_size} bytes in memory, which live followers
    read without a system call.

While the job runs, output past the retention limit lives only in the ring.
When the log closes, the part of the ring the spool lacks is appended to the
spool behind an explicit gap record, so the spool alone then holds the
head, a gap with its byte count, and the tail: the history a restart keeps.
A follower never sees bytes vanish silently: a range that neither store
holds is handed out as a gap of that many bytes.

A spool that cannot write (a full disk) drops what it could not write and
says where it stopped (its C{failure}): the log then holds the bytes from
there on in the ring only, exactly as past the retention limit, and when
its owner calls L{OutputLog.retry_spool} (space may have returned) it
writes a gap record for what the ring no longer holds, then the ring, and
spools on.  The bytes lost that way are counted (L{OutputLog.lost_bytes}).

Nothing read from the spool is trusted: a record header that is not one the
log writes, or a read that comes back short (a file truncated, damaged or
deleted behind the server's back), is damage.  The reader is handed a gap
up to the next record the index knows (or the ring), never an empty chunk
that would make it read the same place for ever, and the first damage found
is kept in L{OutputLog.damage} for the job's status.  A log reopened from
its spool stops at the first damage, and an C{expected_end} beyond what
the spool holds (the job's record counted more output) becomes a gap too.

Memory is bounded per job by C{ring_size} plus a sparse index of the spool
(two 8-byte numbers per C{INDEX_EVERY} bytes: 256 KiB for 1 GiB of output).
Reads from the spool are bounded by the caller's C{limit}, so serving a
follower far behind never blocks the reactor for long.

The log also records when the server read each chunk of output (its time
marks, written to a times file): see L{jobworker.output.timemarks}.

This module does no I/O of its own: the spool is an object with
C{append}/C{pread} (L{jobworker.output.spool.FileSpool} on disk,
L{jobworker.output.spool.MemorySpool} in tests).

Why it is one module of over 400 lines: it is one class, L{OutputLog},
whose ring, spool, index, gaps and damage share the same offsets and
invariants (every method reads or keeps them); the time marks and the
spool itself live in their own modules.  C{MemorySpool}, C{Spool} and the
time-mark names are re-exported here for existing importers.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from jobworker.output.spool import MemorySpool, Spool
from jobworker.output.timemarks import (
    MARK_STEP_US,
    MAX_TIME_MARKS,
    TIME_FILE_MAGIC,
    TimeMarks,
    now_us,
    read_time_file,
    time_entry,
)

__all__ = [
    "Chunk",
    "Spool",
    "MemorySpool",
    "OutputLog",
    "RECORD_HEADER_SIZE",
    "DEFAULT_RING_SIZE",
    "DEFAULT_RETENTION",
    "TimeMarks",
    "TIME_FILE_MAGIC",
    "MAX_TIME_MARKS",
    "MARK_STEP_US",
]

RECORD_HEADER_SIZE = 9
GAP_FD = 0
DEFAULT_RING_SIZE = 4 << 20  # 4 MiB: a live follower at hundreds of MB/s stays inside it
DEFAULT_RETENTION = 1 << 30  # 1 GiB
INDEX_EVERY = 64 << 10  # one index entry per 64 KiB of spooled output
_SPOOL_READ_BLOCK = 256 << 10
# The bytes read at once when a reopened spool's record headers are scanned.
SCAN_BLOCK = 64 << 10
# The most output a job can have: offsets and gap lengths are u64 on the
# wire, so a spool whose records add up to more is damaged (its end could
# not be sent in a status).
MAX_OUTPUT_END = 2**64 - 1


class Chunk(NamedTuple):
    """
    A piece of output: C{data} from stream C{fd} at C{offset}, or, when
    C{fd} is 0, a gap of C{gap} dropped bytes starting at C{offset}.
    """

    fd: int
    offset: int
    data: bytes | memoryview
    gap: int = 0

    @property
    def size(self) -> int:
        return self.gap if self.fd == GAP_FD else len(self.data)


def _header(fd: int, length: int) -> bytes:
    return bytes((fd,)) + length.to_bytes(8, "big")


class OutputLog:
    """
    The output of one job; see the module docstring.

    @ivar end: offset one past the last byte produced so far.
    @ivar closed: no more output will come.
    @ivar damage: what is wrong with the spool, found on reopening it or on
        a read (None while nothing is); the readers get a gap there.
    @ivar lost_bytes: bytes that were never stored because the spool could
        not write them (readers get a gap for them).
    @ivar on_damage: called with L{damage} when it is first found.
    """

    def __init__(
        self,
        spool: Spool,
        *,
        ring_size: int = DEFAULT_RING_SIZE,
        retention: int = DEFAULT_RETENTION,
        times: Spool | None = None,
        clock: Callable[[], int] = now_us,
    ) -> None:
        """
        @param times: the spool the time marks are written to (see the
            module docstring); None keeps them in memory only.
        @param clock: now, in microseconds since the epoch.
        """
        self._spool = spool
        self._times = times
        self._clock = clock
        self._marks = TimeMarks()
        # The log knows when its output was read: False for a log reopened
        # from a spool that has no times file (written before they were).
        self._has_times = True
        self._times_damage: str | None = None
        # Opens the times file of a reopened log, read on the first use of
        # its marks (see from_spool); None once read, or for a log that has
        # its marks.
        self._unread_times: Callable[[], Spool | None] | None = None
        self._on_times_damage: Callable[[str], None] | None = None
        self._last_mark_written = -1  # the offset of the last mark in the file
        if times is not None and times.size == 0:
            times.append(TIME_FILE_MAGIC, mark=None)
        self.ring_size = ring_size
        self.retention = retention
        self.end = 0
        self.closed = False
        self._spooled_end = 0  # data offset one past the spooled head
        self._spool_records = 0  # spool bytes (headers included) written
        self._index_offsets = array("Q", [0])
        self._index_positions = array("Q", [0])
        self._ring: deque[tuple[int, int, bytes]] = deque()  # (offset, fd, data)
        self._ring_bytes = 0
        self._listeners: list[Callable[[], None]] = []
        self.damage: str | None = None
        self.lost_bytes = 0
        self.on_damage: Callable[[str], None] | None = None
        self._failure_seen: object = None  # the spool failure handled last
        self._spool_failed = False

    @classmethod
    def from_spool(
        cls,
        spool: Spool,
        *,
        ring_size: int = DEFAULT_RING_SIZE,
        expected_end: int = 0,
        times: Spool | Callable[[], Spool | None] | None = None,
        on_times_damage: Callable[[str], None] | None = None,
    ) -> OutputLog:
        """
        Reopen a closed log from its spool (after a restart): scan the
        records once to rebuild the index.  The scan stops at the first
        record that is not one the log writes (noted in L{damage}); a torn
        last record (the server died mid-write) is dropped silently.

        @param expected_end: the output the job's record counted; what the
            spool lacks of it is a gap, and noted in L{damage}.
        @param times: the log's times file, read now; or a function that
            opens it (None: there is none), called, and the file read, only
            when the marks are first used (L{marks}, L{has_times},
            L{times_damage}): most finished jobs' output is never read
            again, and a server starting with 10,000 of them would open
            and read 10,000 files for nothing.
        @param on_times_damage: called with L{times_damage} when the times
            file is read and found damaged.
        """
        log = cls(spool, ring_size=ring_size, retention=2**63)
        position = 0
        offset = 0
        total = spool.size
        # The headers are read SCAN_BLOCK bytes at a time while the records
        # are small (a read each cost a job of many small records one
        # system call, and an open, per record), one at a time after a
        # large one (never the data of a large record for nothing).
        block = b""
        block_start = 0
        small = True
        while position < total:
            at = position - block_start
            if at + RECORD_HEADER_SIZE > len(block):
                want = min(SCAN_BLOCK if small else RECORD_HEADER_SIZE, total - position)
                block, block_start, at = spool.pread(position, want), position, 0
                if len(block) < RECORD_HEADER_SIZE:
                    if len(block) != total - position:
                        log._damaged(f"output spool: short read at byte {position}")
                    break  # else a torn header: the server died mid-write
            header = block[at : at + RECORD_HEADER_SIZE]
            fd, length = header[0], int.from_bytes(header[1:], "big")
            payload = 0 if fd == GAP_FD else length
            if fd not in (GAP_FD, 1, 2) or (fd == GAP_FD and length == 0) or offset + length > MAX_OUTPUT_END:
                log._damaged(f"output spool: bad record header at byte {position}")
                break
            if position + RECORD_HEADER_SIZE + payload > total:
                break  # torn last record
            log._note_record(offset, position)
            position += RECORD_HEADER_SIZE + payload
            offset += length
            small = payload < SCAN_BLOCK // 16
        log.end = log._spooled_end = offset
        log._spool_records = position
        if expected_end > offset:
            missing = expected_end - offset
            log.end = expected_end
            if log.damage is None:
                log._damaged(f"output spool: {missing} bytes of output missing from byte {offset} on")
        log.closed = True
        log._on_times_damage = on_times_damage
        if callable(times):
            log._unread_times = times
        else:
            log._load_times(times)
        return log

    @property
    def marks(self) -> TimeMarks:
        """
        When the output was read (see L{jobworker.output.timemarks}).
        """
        if self._unread_times is not None:
            self._read_unread_times()
        return self._marks

    @property
    def has_times(self) -> bool:
        """
        Whether the log knows when its output was read: False for a log
        reopened from a spool that has no times file (written before they
        were).
        """
        if self._unread_times is not None:
            self._read_unread_times()
        return self._has_times

    @property
    def times_damage(self) -> str | None:
        """
        What is wrong with the times file, found when it was read; the
        marks after it are lost.
        """
        if self._unread_times is not None:
            self._read_unread_times()
        return self._times_damage

    def _read_unread_times(self) -> None:
        opened, self._unread_times = self._unread_times, None
        assert opened is not None
        self._load_times(opened())

    def _load_times(self, times: Spool | None) -> None:
        """
        Read the marks of a reopened log from its times file (see
        L{read_time_file}): a log without one has no times.
        """
        if times is None:
            self._has_times = False
            return
        has_times, damage = read_time_file(times, self._marks, self.end)
        if not has_times:
            self._has_times = False
        if damage is not None:
            self._times_damage = damage
            if self._on_times_damage is not None:
                self._on_times_damage(damage)

    def _write_mark(self, offset: int, at: int) -> None:
        times = self._times
        if times is None:
            return
        if getattr(times, "failure", None) is not None:
            # A full disk: the marks it dropped are lost (the output's times
            # get coarser there), the next one is tried again.
            resume = getattr(times, "resume", None)
            if resume is not None:
                resume()
        self._last_mark_written = offset
        try:
            times.append(time_entry(offset, at), mark=None)
        except (OSError, ValueError):
            pass  # a sealed or broken times file: the output goes on

    def _damaged(self, what: str) -> None:
        if self.damage is None:
            self.damage = what
            if self.on_damage is not None:
                self.on_damage(what)

    # -- writing ---------------------------------------------------------------

    def append(self, fd: int, data: bytes, at: int | None = None) -> None:
        """
        Add C{data} read from the job's C{fd} (1 or 2) at time C{at}
        (microseconds since the epoch; default: now by the log's clock).
        """
        if self.closed:
            raise ValueError("output log is closed")
        if fd not in (1, 2):
            raise ValueError(f"fd must be 1 or 2, not {fd}")
        if not data:
            return
        self._check_spool()
        offset = self.end
        self.end += len(data)
        if at is None:
            at = self._clock()
        marks = self._marks
        # One comparison per chunk when chunks come fast (most get no mark).
        if at - marks.last_time >= marks.step_us:
            mark = marks.add(offset, at)
            if mark is not None and offset < self.retention:
                self._write_mark(*mark)
        room = self.retention - self._spooled_end
        if room > 0 and self._spooled_end == offset:
            head = data if len(data) <= room else data[:room]
            self._spool_record(fd, offset, head)
        self._ring.append((offset, fd, data))
        self._ring_bytes += len(data)
        while self._ring and self._ring_bytes - len(self._ring[0][2]) >= self.ring_size:
            self._ring_bytes -= len(self._ring.popleft()[2])
        self._notify()

    def close(self) -> None:
        """
        No more output: move the part of the ring the spool lacks behind an
        explicit gap record, so the spool alone holds the whole history.
        """
        if self.closed:
            return
        self._check_spool()
        self._resume_spool()
        tail = self._marks.between(self._ring_start(), self.end)
        self._spool_ring(2**63)
        # The marks of the tail just spooled (past the retention limit);
        # those of bytes nobody holds any more are not worth keeping.
        for offset, at in tail:
            if offset > self._last_mark_written:
                self._write_mark(offset, at)
        # The spool now holds everything it could (a spool still failing
        # drops the rest; the job's record counts it, so a reload shows it
        # as a gap); a finished job keeps no memory.
        self._ring.clear()
        self._ring_bytes = 0
        self.closed = True
        self._notify()

    def _spool_ring(self, retention: int) -> None:
        """
        Append what the spool lacks behind an explicit gap for what the ring
        no longer holds, up to C{retention} data bytes.
        """
        if self._spooled_end >= self.end or self._spooled_end >= retention:
            return
        ring_start = self._ring_start()
        if ring_start > self._spooled_end:
            self._spool_record(GAP_FD, self._spooled_end, b"", ring_start - self._spooled_end)
        for offset, fd, data in self._ring:
            room = retention - self._spooled_end
            if room <= 0:
                break
            if offset + len(data) > self._spooled_end:
                skip = max(0, self._spooled_end - offset)
                self._spool_record(fd, offset + skip, data[skip : skip + room])

    def _spool_record(self, fd: int, offset: int, data: bytes, gap: int = 0) -> None:
        length = gap if fd == GAP_FD else len(data)
        self._note_record(offset, self._spool_records)
        self._spool.append(_header(fd, length), data, mark=offset)
        self._spool_records += RECORD_HEADER_SIZE + len(data)
        self._spooled_end = offset + length

    @property
    def stored_end(self) -> int:
        """
        The offset below which every byte appended is stored as well as it
        will be: written by the spool, or past what the spool keeps (the
        retention limit, a full disk), where the ring alone holds it.
        """
        first_unwritten = getattr(self._spool, "first_unwritten", None)
        return self.end if first_unwritten is None else min(first_unwritten, self.end)

    def skip_to(self, offset: int) -> None:
        """
        The output up to C{offset} was produced but is lost (never reached
        this log): readers get a gap there, and the spool records it.
        """
        if self.closed:
            raise ValueError("output log is closed")
        if offset <= self.end:
            return
        gap = offset - self.end
        self._check_spool()
        if self._spooled_end == self.end and self.end < self.retention and not self._spool_failed:
            self._spool_record(GAP_FD, self.end, b"", gap)
        self.lost_bytes += gap
        self.end = offset
        # The ring holds contiguous output only.
        self._ring.clear()
        self._ring_bytes = 0
        self._notify()

    def continue_on(self, spool: Spool, retention: int, times: Spool | None = None) -> None:
        """
        Open a log reopened by L{from_spool} for more output: C{spool} is
        the same file, open for appending at the end of its last whole
        record (a job taken back by a new server).
        """
        self._spool = spool
        self._times = times
        self.retention = retention
        self.closed = False

    @property
    def spool_bytes(self) -> int:
        """
        The spool bytes (headers included) of the records the log holds.
        """
        return self._spool_records

    # -- a spool that cannot write -------------------------------------------

    @property
    def spool_failing(self) -> bool:
        """
        The spool stopped writing and L{retry_spool} has not brought it back.
        """
        self._check_spool()
        return self._spool_failed

    def _check_spool(self) -> None:
        """
        Take in a failure of the spool: it holds the records before
        C{failure.position} and nothing after, so the spooled head ends at
        the first record it lost.
        """
        failure = getattr(self._spool, "failure", None)
        if failure is None or failure is self._failure_seen:
            return
        self._failure_seen = failure
        self._spool_failed = True
        position, mark = failure.position, failure.mark
        if mark is None or mark > self._spooled_end:
            return  # nothing of ours was lost (a failure before our appends)
        lost_from = mark
        self._spool_records = position
        self._spooled_end = lost_from
        while len(self._index_positions) > 1 and self._index_positions[-1] >= position:
            self._index_positions.pop()
            self._index_offsets.pop()

    def _resume_spool(self) -> None:
        if not self._spool_failed:
            return
        resume = getattr(self._spool, "resume", None)
        if resume is not None:
            resume()
        self._spool_failed = False
        ring_start = self._ring_start()
        if ring_start > self._spooled_end:
            self.lost_bytes += min(ring_start, self.end) - self._spooled_end

    def retry_spool(self) -> None:
        """
        Try the spool again after it failed: write a gap for what is gone
        from memory, then what the ring holds, and spool on from there.  If
        the disk is still full, the spool fails again (cheaply: the gap
        record comes first, and it is 9 bytes).
        """
        self._check_spool()
        if not self._spool_failed or self.closed:
            return
        self._resume_spool()
        self._spool_ring(self.retention)

    def _note_record(self, offset: int, position: int) -> None:
        if offset - self._index_offsets[-1] >= INDEX_EVERY:
            self._index_offsets.append(offset)
            self._index_positions.append(position)

    # -- reading ---------------------------------------------------------------

    def _ring_start(self) -> int:
        return self._ring[0][0] if self._ring else self.end

    def read(self, offset: int, limit: int) -> list[Chunk]:
        """
        Up to C{limit} data bytes of output from C{offset}, in order.

        Adjacent bytes of the same stream come as one chunk; a range nobody
        holds comes as a gap chunk (which does not count against C{limit}).
        Returns C{[]} at the end of what exists now.

        A read cuts a record only when the record alone is larger than
        C{limit}; otherwise it stops before a record that would not fit
        whole, so that a follower's reads stay on record boundaries and hand
        out the records themselves, never copies joined from two of them.
        Chunk data is bytes-like: C{bytes}, or a read-only view.
        """
        if offset < 0:
            raise ValueError("offset must not be negative")
        chunks: list[Chunk] = []
        if offset >= self.end or limit <= 0:
            return chunks
        self._check_spool()
        ring_start = self._ring_start()
        if offset < self._spooled_end and offset < ring_start:
            chunks = self._read_spool(offset, limit)
            if chunks:
                return chunks
            if offset < self._spooled_end:
                # Damage where the spool should hold this: a gap to the
                # next record the index knows, or to what follows the spool.
                return [Chunk(GAP_FD, offset, b"", self._resync_point(offset, ring_start) - offset)]
        if offset < ring_start:
            return [Chunk(GAP_FD, offset, b"", ring_start - offset)]
        return self._read_ring(offset, limit)

    def _resync_point(self, offset: int, ring_start: int) -> int:
        """
        Where reading may go on after damage at C{offset}: the next record
        the index knows, else the end of the spooled head; never past the
        ring, always past C{offset}.
        """
        slot = bisect_right(self._index_offsets, offset)
        after = self._index_offsets[slot] if slot < len(self._index_offsets) else self._spooled_end
        return max(offset + 1, min(after, self._spooled_end, ring_start))

    def _read_ring(self, offset: int, limit: int) -> list[Chunk]:
        chunks: list[Chunk] = []
        pieces: list[bytes] = []
        current_fd = 0
        start = offset
        taken = 0
        for record_offset, fd, data in self._ring:
            record_end = record_offset + len(data)
            if record_end <= offset:
                continue
            skip = max(0, offset - record_offset)
            room = limit - taken
            if len(data) - skip > room:
                if taken:
                    break  # the record goes whole in the next read; see read()
                piece = data[skip : skip + room]
            else:
                piece = data[skip:] if skip else data
            if fd != current_fd and pieces:
                chunks.append(Chunk(current_fd, start, b"".join(pieces)))
                start += sum(map(len, pieces))
                pieces = []
            current_fd = fd
            pieces.append(piece)
            taken += len(piece)
            if taken >= limit:
                break
        if pieces:
            chunks.append(Chunk(current_fd, start, b"".join(pieces)))
        return chunks

    def _read_spool(self, offset: int, limit: int) -> list[Chunk]:
        slot = bisect_right(self._index_offsets, offset) - 1
        record_offset = self._index_offsets[slot]
        position = self._index_positions[slot]
        chunks: list[Chunk] = []
        taken = 0
        block = b""
        block_start = position
        while taken < limit and position < self._spool_records and record_offset < self._spooled_end:
            if position + RECORD_HEADER_SIZE > block_start + len(block):
                block_start = position
                try:
                    block = self._spool.pread(position, max(_SPOOL_READ_BLOCK, limit + RECORD_HEADER_SIZE))
                except OSError as exc:
                    self._damaged(f"output spool: cannot read at byte {position}: {exc.strerror or exc}")
                    break
                if len(block) < RECORD_HEADER_SIZE:
                    self._damaged(f"output spool: short read at byte {position}")
                    break
            at = position - block_start
            fd = block[at]
            length = int.from_bytes(block[at + 1 : at + RECORD_HEADER_SIZE], "big")
            payload = 0 if fd == GAP_FD else length
            record_end = record_offset + length
            if fd not in (GAP_FD, 1, 2) or (fd == GAP_FD and length == 0) or record_end > self._spooled_end:
                self._damaged(f"output spool: bad record header at byte {position}")
                break
            if record_end > offset:
                skip = max(0, offset - record_offset)
                if fd == GAP_FD:
                    if chunks:
                        break  # hand data out first; the gap comes on the next read
                    return [Chunk(GAP_FD, record_offset + skip, b"", length - skip)]
                if taken and length - skip > limit - taken:
                    break  # the record goes whole in the next read; see read()
                want = min(length - skip, limit - taken)
                data_at = position + RECORD_HEADER_SIZE + skip
                data: bytes | memoryview
                if data_at - block_start + want <= len(block):
                    # A view, not a copy: the block is ours alone.
                    data = memoryview(block)[data_at - block_start : data_at - block_start + want]
                else:
                    try:
                        data = self._spool.pread(data_at, want)
                    except OSError as exc:
                        self._damaged(f"output spool: cannot read at byte {data_at}: {exc.strerror or exc}")
                        break
                    if len(data) != want:
                        # Counting a short read as progress made the
                        # reader spin on the same offset for ever.
                        self._damaged(f"output spool: short read at byte {data_at}")
                        break
                if chunks and chunks[-1].fd == fd:
                    last = chunks.pop()
                    data = b"".join((last.data, data))
                    chunks.append(Chunk(fd, last.offset, data))
                else:
                    chunks.append(Chunk(fd, record_offset + skip, data))
                taken += want
            position += RECORD_HEADER_SIZE + payload
            record_offset = record_end
        return chunks

    # -- followers -------------------------------------------------------------

    def subscribe(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback()} after new output arrives and when the log closes.
        """
        self._listeners.append(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        try:
            self._listeners.remove(callback)
        except ValueError:
            pass

    def wake_listeners(self) -> None:
        """
        Call every listener now, though no output came: the job changed in
        a way its readers must look at (it was removed).
        """
        self._notify()

    def _notify(self) -> None:
        for callback in list(self._listeners):
            callback()
