"""
When the server read each part of a job's output: the time marks of an
L{jobworker.output.log.OutputLog} and its times file.

The log also records when the server read each chunk of output: a time
mark (offset, time) says that the bytes from that offset on, up to the next
mark, were read at that time (microseconds since the epoch).  One mark per
chunk read from the job's pipe (never per byte or line), and fewer when
chunks come fast: a chunk read less than L{MARK_STEP_US} after the last
mark gets none (its bytes take that mark's time).  Times never go
backwards within a log: a wall clock stepped back reads as the last mark's
time.  Memory is bounded too: past L{MAX_TIME_MARKS} marks every other one
is dropped and the step doubles, so a long, chatty job keeps coarser times
rather than more memory.

The marks are written to a second spool, the times file (C{times}): an
8-byte magic C{TIME_FILE_MAGIC}, then one 16-byte entry per mark (offset
u64, time u64, big-endian), for the output the spool keeps.  A log without
one (a spool written before times were recorded) has no times, and its
readers are told so; a times file that is damaged is read up to the damage
and noted in L{jobworker.output.log.OutputLog.times_damage}: the output itself loses nothing.

Pure: no I/O of its own (the times file is a L{jobworker.output.spool.Spool}).
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_left, bisect_right

from jobworker.output.spool import Spool

__all__ = ["MARK_STEP_US", "MAX_TIME_MARKS", "TIME_ENTRY_SIZE", "TIME_FILE_MAGIC", "TimeMarks", "now_us", "read_time_file", "time_entry"]

# Time marks: at most one per millisecond at first (the resolution people
# read logs at), and at most 65 536 of them per job in memory (1 MiB).
MARK_STEP_US = 1000
MAX_TIME_MARKS = 1 << 16
TIME_FILE_MAGIC = b"JWTIMES1"
TIME_ENTRY_SIZE = 16
TIME_READ_BLOCK = 4096 * TIME_ENTRY_SIZE


def now_us() -> int:
    return time.time_ns() // 1000


class TimeMarks:
    """
    The time marks of one log, in offset order (see the module docstring).
    Pure: the caller writes what L{add} returns to the times file.
    """

    def __init__(self, max_marks: int = MAX_TIME_MARKS, step_us: int = MARK_STEP_US) -> None:
        self.offsets = array("Q")
        self.times = array("Q")
        self.max_marks = max_marks
        self.step_us = step_us
        # The time of the last mark (0: none): the hot path's one check.
        self.last_time = 0

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, offset: int, at: int) -> tuple[int, int] | None:
        """
        Note that the bytes from C{offset} on were read at C{at}; return the
        mark kept (its time may be clamped to the last one), or None when
        none was needed.
        """
        if self.offsets:
            last = self.times[-1]
            if at < last:
                at = last  # a clock stepped back: times never go backwards
            if at - last < self.step_us or offset <= self.offsets[-1]:
                return None
        if len(self.offsets) >= self.max_marks:
            # Every other mark goes, the first stays; the step doubles so
            # that the marks that come later are as far apart.
            self.offsets = self.offsets[::2]
            self.times = self.times[::2]
            self.step_us *= 2
        self.offsets.append(offset)
        self.times.append(at)
        self.last_time = at
        return offset, at

    def between(self, start: int, end: int) -> list[tuple[int, int]]:
        """
        The marks that say when bytes C{start} to C{end} (exclusive) were
        read: the one in force at C{start} (with offset C{start}), then each
        that begins inside the range.  Empty when no time is known there.
        """
        slot = bisect_right(self.offsets, start)
        marks: list[tuple[int, int]] = []
        if slot:
            marks.append((start, self.times[slot - 1]))
        while slot < len(self.offsets) and self.offsets[slot] < end:
            marks.append((self.offsets[slot], self.times[slot]))
            slot += 1
        return marks

    def offset_at(self, since: int, end: int) -> int:
        """
        The offset of the first byte read at C{since} or later: where the
        first mark whose time is not before C{since} begins; C{end} when
        there is none (no byte known to be that recent).
        """
        slot = bisect_left(self.times, since)
        return self.offsets[slot] if slot < len(self.offsets) else end


def time_entry(offset: int, at: int) -> bytes:
    return offset.to_bytes(8, "big") + at.to_bytes(8, "big")


def read_time_file(times: Spool, marks: TimeMarks, end: int) -> tuple[bool, str | None]:
    """
    Add to C{marks} the marks of a reopened log's times file C{times}
    (for output up to offset C{end}), up to the first damage; a torn last
    entry (the server died mid-write) is dropped silently.  Returns whether
    the file holds times at all (an empty one does not) and the damage
    found, if any.  Never raises: times are worth less than the output,
    which loses nothing either way.
    """
    try:
        total = times.size
        if total == 0:
            return False, None
        if times.pread(0, len(TIME_FILE_MAGIC)) != TIME_FILE_MAGIC:
            return True, "times file: not a times file (bad magic)"
        position = len(TIME_FILE_MAGIC)
        last_offset = -1
        while position + TIME_ENTRY_SIZE <= total:
            block = times.pread(position, min(TIME_READ_BLOCK, total - position))
            whole = len(block) - len(block) % TIME_ENTRY_SIZE
            if not whole:
                return True, f"times file: short read at byte {position}"
            for at in range(0, whole, TIME_ENTRY_SIZE):
                offset = int.from_bytes(block[at : at + 8], "big")
                when = int.from_bytes(block[at + 8 : at + 16], "big")
                last_time = marks.times[-1] if len(marks) else 0
                if offset <= last_offset or offset >= max(end, 1) or when < last_time:
                    return True, f"times file: bad entry at byte {position + at}"
                last_offset = offset
                marks.add(offset, when)
            position += whole
    except OSError as exc:
        return True, f"times file: cannot read: {exc.strerror or exc}"
    return True, None
