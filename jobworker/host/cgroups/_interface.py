"""
What the job manager sees of a cgroup driver, whichever version is below.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from jobworker.errors import ErrorCode, JobworkerError, RequestError
from jobworker.limits import Limits

__all__ = [
    "CgroupDriver",
    "CgroupError",
    "JobCgroup",
    "Usage",
    "LIMIT_CONTROLLERS",
    "check_supported",
    "job_directory_name",
    "JOB_DIRECTORY_PREFIX",
    "SERVICE_LEAF",
]

# Which controller enforces each field of Limits; timeout_ms is the job
# manager's own business.
LIMIT_CONTROLLERS = {
    "cpu_millicores": "cpu",
    "memory_bytes": "memory",
    "io_read_bps": "io",
    "io_write_bps": "io",
    "pids": "pids",
}

# Every job cgroup is <base>/job-<id>; cleanup_stale() removes exactly the
# directories with this prefix, so nothing else under the base is touched.
JOB_DIRECTORY_PREFIX = "job-"
# v2 only: the leaf the service process moves into (see v2.py).
SERVICE_LEAF = "service"

# A job id becomes a directory name: one path component, not "." or "..",
# short enough for NAME_MAX (255) with the prefix.
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class CgroupError(JobworkerError):
    """
    The host's cgroups did not do what they must (a directory that cannot
    be made or removed, a process that will not die).  Not the client's
    fault: answered as an internal error.
    """

    code = ErrorCode.INTERNAL


@dataclass(frozen=True)
class Usage:
    """
    What a job consumed, read from its cgroup.  Fields a driver cannot
    measure on this host stay 0 (see L{CgroupDriver.usage_supported}).

    @ivar cpu_usec: CPU time, user and system, microseconds.
    @ivar memory_peak_bytes: the most memory charged at once, bytes.  v2:
        C{memory.peak} (kernel >= 5.19), else the largest C{memory.current}
        seen by L{JobCgroup.usage} calls; v1: C{memory.max_usage_in_bytes}.
    @ivar io_read_bytes: bytes read from block devices, all devices.
    @ivar io_write_bytes: bytes written to block devices, all devices.  v1
        counts only I/O issued by the job itself (direct and synchronous),
        not the writeback of its dirty pages.
    @ivar pids_peak: the most tasks alive at once.  C{pids.peak} where the
        kernel has it (recent kernels, both versions), else the largest
        C{pids.current} seen by L{JobCgroup.usage} calls, which misses
        short peaks between calls.
    @ivar oom_killed: the kernel's OOM killer killed a process of the job.
        v2: C{memory.events} C{oom_kill}; v1: C{memory.oom_control}
        C{oom_kill} (kernel >= 4.13), and before that C{memory.failcnt > 0},
        which only says the limit was hit (reclaim may have coped): combine
        it with the job's exit by SIGKILL.
    """

    cpu_usec: int = 0
    memory_peak_bytes: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    pids_peak: int = 0
    oom_killed: bool = False


class JobCgroup(Protocol):
    """
    The cgroup(s) of one job.  Every method blocks for a bounded time (at
    most a few seconds, polling), so a Twisted caller runs them in a thread.
    """

    path_description: str
    procs_files: tuple[str, ...]

    def usage(self) -> Usage:
        """
        Read the job's usage.  Never raises because the cgroup is gone: it
        then returns the last usage read.
        """

    def pids(self) -> list[int]:
        """
        Every process in the job's cgroup and its descendants, as pids of
        the service's pid namespace, sorted.  Empty once removed.
        """

    def kill(self) -> None:
        """
        SIGKILL every process of the job, including those that left its
        process group and session; returns when none is left, or after a
        few seconds (a process stuck in the kernel) without raising.
        """

    def remove(self) -> None:
        """
        Kill what is left, wait (at most a few seconds) until the cgroup is
        empty, then remove every directory made for the job.  Idempotent.

        @raise CgroupError: a process would not die in time; the
            directories are left for a later call or L{CgroupDriver.cleanup_stale}.
        """


class CgroupDriver(Protocol):
    """
    One cgroup version's way of making job cgroups, under a base directory
    inside the service's own cgroup.
    """

    name: str
    controllers: frozenset[str]
    base_description: str

    def prepare(self) -> None:
        """
        Make the base directory (or directories) and enable the controllers
        there; call once at start-up, before L{cleanup_stale} and
        L{create}.  Idempotent.  v2 also moves the service process out of
        its cgroup into a leaf, which the kernel requires before child
        cgroups can get controllers (see v2.py).

        @raise CgroupError: the service's cgroup cannot be used.
        """

    def release(self) -> None:
        """
        Undo L{prepare}, once every job is gone: remove the (empty) base
        directories; v2 also disables the controllers prepare() enabled and
        moves the service back into its own cgroup.  Optional at shut-down;
        for embedders and tests that must leave the host as they found it.

        @raise CgroupError: a base directory is not empty, or the service
            cannot move back.
        """

    def create(self, job_id: str, limits: Limits) -> JobCgroup:
        """
        Make the cgroup(s) of a job and apply C{limits} (a 0 field is not
        applied).  On any failure, whatever was made is removed.

        @param job_id: 1 to 128 of C{A-Z a-z 0-9 _ . -}, not starting with
            a dot or dash; the directory is C{job-<job_id>}.
        @raise RequestError: with L{ErrorCode.UNSUPPORTED_LIMIT}, naming the
            limit, when a requested limit cannot be enforced on this host.
        @raise CgroupError: the host refused otherwise.
        @raise ValueError: C{job_id} is not a valid name.
        """

    def cleanup_stale(self, keep: frozenset[str] = frozenset()) -> list[str]:
        """
        Kill and remove every job cgroup under the base (left by a server
        that crashed) but those named in C{keep} (jobs still supervised,
        which the server takes back).

        @return: the directory names removed, sorted.
        @raise CgroupError: some could not be removed (every one was tried).
        """

    def attach(self, job_id: str) -> JobCgroup | None:
        """
        The existing cgroup of job C{job_id} (of an earlier server), or None.
        """

    def usage_supported(self) -> frozenset[str]:
        """
        The names of the L{Usage} fields this driver measures on this host.
        """

    def prime_moves(self) -> None:
        """
        Move the service into the cgroup it is in already: a move that
        changes nothing but takes the kernel's lock for moves.  The first
        move after a quiet spell waits for an RCU grace period (~10 ms
        here) while one within a grace period of another does not; a
        server that calls this (on a thread) as a start begins spares the
        move of the job's command, milliseconds later, most of that wait.

        @raise OSError: the move was refused (nothing changes either way).
        """


def job_directory_name(job_id: str) -> str:
    """
    The directory name of job C{job_id}.

    @raise ValueError: C{job_id} could escape its directory or is too long.
    """
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(
            f"job id {job_id!r} is not 1 to 128 of A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    return JOB_DIRECTORY_PREFIX + job_id


def check_supported(limits: Limits, controllers: frozenset[str], driver: str, io_devices: Sequence[object]) -> None:
    """
    Refuse C{limits} if a non-zero limit needs a controller not in
    C{controllers}, or an io limit has no block device (C{io_devices}) to
    throttle.

    @raise RequestError: L{ErrorCode.UNSUPPORTED_LIMIT}, naming every such
        limit and its controller.
    """
    missing = [
        f"{name} (needs the {controller} controller)"
        for name, controller in LIMIT_CONTROLLERS.items()
        if getattr(limits, name) and controller not in controllers
    ]
    if missing:
        raise RequestError(
            f"cannot enforce {', '.join(missing)} on this host (cgroup {driver}; "
            f"available: {', '.join(sorted(controllers)) or 'none'})",
            ErrorCode.UNSUPPORTED_LIMIT,
        )
    if (limits.io_read_bps or limits.io_write_bps) and not io_devices:
        raise RequestError(
            "cannot enforce an io limit on this host: it has no block device to throttle",
            ErrorCode.UNSUPPORTED_LIMIT,
        )


def usage_fields(controllers: frozenset[str], *, cpu: bool) -> frozenset[str]:
    """
    The L{Usage} fields a driver measures: C{cpu_usec} where C{cpu} says the
    CPU time can be read, the others by the controller (of C{controllers})
    that counts them.
    """
    supported = {"cpu_usec"} if cpu else set()
    if "memory" in controllers:
        supported |= {"memory_peak_bytes", "oom_killed"}
    if "io" in controllers:
        supported |= {"io_read_bytes", "io_write_bytes"}
    if "pids" in controllers:
        supported.add("pids_peak")
    return frozenset(supported)


def stale_job_names(base: str) -> set[str]:
    """
    The job directories in C{base} (none if C{base} does not exist).
    """
    try:
        entries = os.listdir(base)
    except FileNotFoundError:
        return set()
    return {n for n in entries if n.startswith(JOB_DIRECTORY_PREFIX) and os.path.isdir(os.path.join(base, n))}


def remove_each(names: Iterable[str], job: Callable[[str], JobCgroup]) -> list[str]:
    """
    Remove the job cgroup of every name, going on past failures.

    @return: the names removed.
    @raise CgroupError: naming every cgroup that could not be removed,
        after trying them all.
    """
    removed = []
    failures = []
    for name in sorted(names):
        try:
            job(name).remove()
        except CgroupError as e:
            failures.append(e.message)
        else:
            removed.append(name)
    if failures:
        raise CgroupError("; ".join(failures))
    return removed
