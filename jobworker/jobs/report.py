"""
What a job reports of itself besides its state: its usage, read from its
cgroup, and its error text, with what is wrong with its output.  No reactor;
the only I/O is the cgroup's files, read by L{read_usage}.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from jobworker.output.log import OutputLog
from jobworker.protocol.messages import JobUsage

__all__ = ["MAX_ERROR_CHARS", "UsageReading", "error_text", "now_us", "read_usage"]

# A job's error text, notes on damaged or lost output included, is cut to
# this many characters (the wire carries at most 65,535 bytes of UTF-8).
MAX_ERROR_CHARS = 8192


def now_us() -> int:
    """
    The wall-clock time in microseconds since the epoch, as job records and
    statuses carry it.
    """
    return time.time_ns() // 1000


def error_text(error: str, output: OutputLog) -> str:
    """
    A job's C{error}, with what is wrong with its C{output}: damage found in
    its spool, bytes a full disk kept from being stored; at most
    L{MAX_ERROR_CHARS} characters.
    """
    notes = [error] if error else []
    if output.damage and output.damage not in error:
        notes.append(output.damage)
    if output.lost_bytes:
        lost = f"{output.lost_bytes} bytes of output could not be stored (disk full) and are a gap"
        if lost not in error:
            notes.append(lost)
    return "; ".join(notes)[:MAX_ERROR_CHARS]


@dataclass(frozen=True)
class UsageReading:
    """
    One read of a job's cgroup: what the job used, and whether the cgroup's
    OOM killer has struck.
    """

    usage: JobUsage
    oom: bool


def read_usage(cgroup: Any) -> UsageReading | None:
    """
    Read C{cgroup}'s usage (a L{jobworker.host.cgroups.JobCgroup}); None
    when its files cannot be read (the caller keeps what it read last).
    """
    try:
        usage = cgroup.usage()
    except OSError:
        return None
    return UsageReading(
        JobUsage(
            cpu_usec=usage.cpu_usec,
            memory_peak_bytes=usage.memory_peak_bytes,
            io_read_bytes=usage.io_read_bytes,
            io_write_bytes=usage.io_write_bytes,
            pids_peak=usage.pids_peak,
        ),
        bool(usage.oom_killed),
    )
