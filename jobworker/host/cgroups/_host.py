"""
The system calls the drivers make, gathered so that a test can replace
them, and the file reading and bounded waiting both drivers share.

Reads go straight to the files (a fake cgroupfs keeps its state in plain
files); everything with a side effect in the kernel (making and removing
cgroups, writing control files, signals, time) goes through L{HostCalls}.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from jobworker.errors import ErrorCode, RequestError
from jobworker.host.cgroups._interface import CgroupError

__all__ = [
    "HostCalls",
    "write_file",
    "read_text",
    "read_keyed",
    "read_pids",
    "optional_int",
    "optional_keyed",
    "poll",
    "kill_each",
    "walk_up",
    "write_limit",
    "make_each",
    "remove_directories",
    "remove_empty",
    "UNSUPPORTED",
    "POLL_INTERVAL",
    "KILL_TIMEOUT",
    "REMOVE_TIMEOUT",
    "FREEZE_TIMEOUT",
]

# errno values that mean "this kernel has no such control file or device":
# the feature is missing, which is not the same as the host failing.
UNSUPPORTED = frozenset({errno.ENOENT, errno.ENODEV, errno.EOPNOTSUPP})

# Seconds.  Processes die within milliseconds of SIGKILL unless stuck in
# the kernel (uninterruptible I/O on a dead NFS server); waiting longer
# than a few seconds would only hold up the caller's thread.
POLL_INTERVAL = 0.02
FIRST_POLL_INTERVAL = 0.001
FREEZE_TIMEOUT = 1.0
KILL_TIMEOUT = 3.0
REMOVE_TIMEOUT = 5.0


def write_file(path: str, text: str) -> None:
    """
    Write C{text} to a control file in one write(2), as cgroupfs requires.

    The file is never created: a missing control file raises
    C{FileNotFoundError}, meaning the kernel lacks the feature.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode("ascii"))
    finally:
        os.close(fd)


def _mkdir(path: str) -> None:
    os.mkdir(path, 0o755)


@dataclass(frozen=True)
class HostCalls:
    """
    The kernel as the drivers use it.  The defaults are the real calls;
    L{jobworker.host.cgroups.testing} supplies a fake.
    """

    mkdir: Callable[[str], None] = _mkdir
    rmdir: Callable[[str], None] = os.rmdir
    write: Callable[[str, str], None] = write_file
    kill: Callable[[int, int], None] = os.kill
    sleep: Callable[[float], None] = time.sleep
    monotonic: Callable[[], float] = time.monotonic
    getpid: Callable[[], int] = os.getpid


def read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def read_keyed(path: str) -> dict[str, int]:
    """
    Read a flat keyed file (C{cpu.stat}, C{memory.events}): C{"key N"} per
    line.  Lines whose value is not a whole number are left out.
    """
    values = {}
    for line in read_text(path).splitlines():
        key, _, value = line.partition(" ")
        try:
            values[key] = int(value)
        except ValueError:
            pass
    return values


def optional_int(path: str) -> int | None:
    """
    The number in a one-value file, C{None} if it cannot be read (the
    kernel lacks it, or the cgroup is gone) or holds no number (C{"max"}).
    """
    try:
        return int(read_text(path).strip())
    except (OSError, ValueError):
        return None


def optional_keyed(path: str) -> dict[str, int]:
    """
    L{read_keyed}, but empty if the file cannot be read.
    """
    try:
        return read_keyed(path)
    except OSError:
        return {}


def read_pids(path: str) -> list[int]:
    """
    Read a C{cgroup.procs} file: one pid per line.
    """
    return [int(word) for word in read_text(path).split() if word.isascii() and word.isdigit()]


def poll(calls: HostCalls, done: Callable[[], bool], timeout: float) -> bool:
    """
    Call C{done} every L{POLL_INTERVAL} until it is true or C{timeout}
    seconds have passed.

    @return: the last answer of C{done}.
    """
    deadline = calls.monotonic() + timeout
    # From FIRST_POLL_INTERVAL, doubling up to POLL_INTERVAL: a SIGKILLed
    # process is gone in well under a millisecond, and a kill that always
    # slept 20 ms kept a thread of the pool (and its share of the GIL) per
    # job, ~40 ms per job in a stop of hundreds.
    interval = FIRST_POLL_INTERVAL
    while not done():
        if calls.monotonic() >= deadline:
            return False
        calls.sleep(interval)
        interval = min(POLL_INTERVAL, interval * 2)
    return True


def kill_each(calls: HostCalls, pids: Iterable[int]) -> None:
    """
    SIGKILL each of C{pids}; one that is already gone is no error.
    """
    for pid in pids:
        try:
            calls.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def walk_up(top: str) -> list[str]:
    """
    C{top} and every directory below it, deepest first (the order rmdir
    needs); empty if C{top} does not exist.
    """
    if not os.path.isdir(top):
        return []
    return [directory for directory, _, _ in os.walk(top, topdown=False)]


def pids_below(tops: Iterable[str]) -> list[int]:
    """
    Every pid in the cgroups C{tops} and their descendants, sorted; a cgroup
    that vanishes meanwhile counts as empty.
    """
    found: set[int] = set()
    for top in tops:
        for directory in walk_up(top):
            try:
                found.update(read_pids(os.path.join(directory, "cgroup.procs")))
            except FileNotFoundError:
                pass
    return sorted(found)


def make_each(calls: HostCalls, directories: Iterable[str]) -> None:
    """
    Make each cgroup directory, in order, unless it is already there.

    @raise CgroupError: naming the first that could not be made.
    """
    for directory in directories:
        try:
            calls.mkdir(directory)
        except FileExistsError:
            pass
        except OSError as e:
            raise CgroupError(f"cannot make cgroup {directory}: {e.strerror}") from e


def remove_empty(calls: HostCalls, directories: Iterable[str]) -> None:
    """
    Remove each empty cgroup directory, in order, unless it is already gone
    (L{remove_directories} is for ones that may hold processes).

    @raise CgroupError: naming the first that could not be removed.
    """
    for directory in directories:
        try:
            calls.rmdir(directory)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CgroupError(f"cannot remove cgroup {directory}: {e.strerror}") from e


def _removed_at_once(calls: HostCalls, tops: list[str]) -> bool:
    """
    Whether one rmdir(2) of each of C{tops} removed them all: the common
    case of a job whose processes are gone and that made no cgroups of its
    own, which then costs no walk of its directories and no read of its
    pids (a stop of hundreds of jobs pays it for each).  The kernel refuses
    (EBUSY) while a process or a child cgroup is in one, so nothing that
    lives is ever left without its cgroup; any refusal leaves the rest to
    the careful way (L{remove_directories}).
    """
    for top in tops:
        try:
            calls.rmdir(top)
        except FileNotFoundError:
            pass
        except OSError:
            return False
    return True


def remove_directories(
    calls: HostCalls,
    tops: Iterable[str],
    populated: Callable[[], list[int]],
    kill: Callable[[], None],
    description: str,
) -> None:
    """
    Remove cgroup directories C{tops} and everything below them, killing
    their processes first.

    rmdir(2) of a cgroup fails with EBUSY while a process is in it (zombies
    do not count) or while it has child cgroups; this kills and retries for
    at most L{REMOVE_TIMEOUT} seconds.

    @param populated: returns the pids still inside.
    @param kill: kills them.
    @raise CgroupError: still busy after the timeout, or another error.
    """
    tops = list(tops)
    if _removed_at_once(calls, tops):
        return
    deadline = calls.monotonic() + REMOVE_TIMEOUT
    while True:
        if populated():
            kill()
        busy: OSError | None = None
        for top in tops:
            for directory in walk_up(top):
                try:
                    calls.rmdir(directory)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise CgroupError(f"cannot remove cgroup {directory}: {e.strerror}") from e
                    busy = e
                    break
        if busy is None:
            return
        if calls.monotonic() >= deadline:
            raise CgroupError(
                f"cgroup {description} still holds processes {populated()} "
                f"after {REMOVE_TIMEOUT:g} s of SIGKILL; left in place"
            ) from busy
        calls.sleep(POLL_INTERVAL)


def write_limit(
    calls: HostCalls, driver: str, limit: str, path: str, value: str, *, required: bool = True
) -> bool:
    """
    Write one limit's control file.

    @param driver: C{"v1"} or C{"v2"}, for the message.
    @param limit: the L{Limits} field it enforces, for the message.
    @param required: whether a missing file (the kernel lacks the feature)
        makes the limit unenforceable.
    @return: whether it was written (C{False}: missing, and not required).
    @raise RequestError: L{ErrorCode.UNSUPPORTED_LIMIT}, the file is
        missing and C{required}.
    @raise CgroupError: the kernel refused the value.
    """
    try:
        calls.write(path, value)
    except OSError as e:
        if e.errno in UNSUPPORTED:
            if not required:
                return False
            raise RequestError(
                f"cannot enforce {limit} on this host: cgroup {driver} has no {os.path.basename(path)} ({e.strerror})",
                ErrorCode.UNSUPPORTED_LIMIT,
            ) from e
        raise CgroupError(f"cannot set {limit}: writing {value!r} to {path}: {e.strerror}") from e
    return True
