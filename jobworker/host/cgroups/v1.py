"""
The cgroup v1 driver: one directory per job in each controller hierarchy.

v1 mounts each controller (or a group of them, such as C{cpu,cpuacct}) as
a hierarchy of its own, and a process belongs to one cgroup in each.  The
service's cgroup can differ from one hierarchy to the next (here, for
example, C{memory:/process_api/4d86...} but C{cpu:/}), so for each
hierarchy used the job directory is::

    <mount point>/<service's cgroup there>/<prefix>/job-<id>

with mount points read from C{/proc/self/mountinfo} and the service's
cgroups from C{/proc/self/cgroup} (see L{jobworker.host.cgroups.detect}).  A
combined hierarchy gets one directory, and one C{cgroup.procs} entry in
C{procs_files}.

Hierarchies used: cpu (limit), cpuacct (CPU time), memory, blkio (called
"io" in C{controllers}), pids, and freezer (to kill without a race).  Jobs
stay in the service's cgroups of every other hierarchy (cpuset, devices,
name=systemd...), which they inherit at fork; cpuset in particular is left
alone because a new cpuset cgroup takes no process until its cpus and mems
are set.

v1 has no rule against processes in inner cgroups, so unlike v2 the
service stays where it is and L{CgroupV1Driver.prepare} only makes the base
directories.

Limits:

  - cpu: C{cpu.cfs_period_us} = 100 000 and C{cpu.cfs_quota_us} =
    millicores * 100 (see L{cpu_bandwidth} for under 10 millicores).
  - memory: C{memory.limit_in_bytes}, and C{memory.memsw.limit_in_bytes}
    (memory plus swap) to the same value so the job cannot swap, where the
    file exists: it does not when swap accounting is off
    (C{swapaccount=0}), and then the job's memory can be swapped out past
    the limit.
  - io: C{blkio.throttle.read_bps_device} and C{write_bps_device},
    C{"MAJ:MIN N"}, for each device of L{jobworker.host.cgroups._devices}.  v1
    throttles only I/O the job's own tasks submit: reads, and direct or
    synchronous writes.  Ordinary buffered writes land in the page cache
    and reach the disk later from the kernel's flusher threads, which are
    not in the job's cgroup, so they are not throttled (nor counted in
    L{Usage.io_write_bytes}); only v2 charges writeback to the job.
  - pids: C{pids.max}.

Killing: freeze (C{freezer.state} = FROZEN, so nothing can fork while the
pids are read), SIGKILL each process, thaw (a frozen v1 task only acts on
the SIGKILL once thawed), and again until C{cgroup.procs} is empty.
Without the freezer hierarchy, the kill rounds run unfrozen: a process
forking fast can then take several rounds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from jobworker.errors import ErrorCode, RequestError
from jobworker.host.cgroups._devices import BlockDevice
from jobworker.host.cgroups._host import (
    FREEZE_TIMEOUT,
    KILL_TIMEOUT,
    HostCalls,
    kill_each,
    make_each,
    optional_int,
    optional_keyed,
    pids_below,
    poll,
    read_text,
    remove_directories,
    remove_empty,
    write_limit,
)
from jobworker.host.cgroups._interface import (
    CgroupError,
    Usage,
    check_supported,
    job_directory_name,
    remove_each,
    stale_job_names,
    usage_fields,
)
from jobworker.host.cgroups._limits import cpu_bandwidth
from jobworker.limits import Limits

__all__ = ["CgroupV1Driver", "CgroupV1Job", "V1_CONTROLLERS"]

# The v1 controllers a job joins, by their v1 names.
V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer")
# The name the driver reports a v1 controller under (the v2 name).
_REPORTED = {"cpu": "cpu", "memory": "memory", "blkio": "io", "pids": "pids", "freezer": "freezer"}


def _io_totals(path: str) -> tuple[int, int] | None:
    """
    Sum the C{Read} and C{Write} bytes over the devices of a
    C{blkio.throttle.io_service_bytes} file; C{None} if it cannot be read.
    """
    try:
        text = read_text(path)
    except OSError:
        return None
    read = written = 0
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 3 or not fields[2].isdigit():
            continue
        if fields[1] == "Read":
            read += int(fields[2])
        elif fields[1] == "Write":
            written += int(fields[2])
    return read, written


class CgroupV1Job:
    """
    One job's cgroups: C{job-<id>} in each hierarchy the driver uses.

    @ivar directories: v1 controller name to the job's directory in the
        hierarchy that has it (a combined hierarchy appears once per name).
    @ivar controller_dirs: the same under the driver's reported names
        (C{"io"} for blkio), for tests and diagnostics.
    """

    def __init__(self, directories: Mapping[str, str], calls: HostCalls) -> None:
        self.directories = dict(directories)
        self.controller_dirs = {_REPORTED.get(c, c): d for c, d in self.directories.items()}
        self._tops = sorted(set(self.directories.values()))
        self.procs_files = tuple(os.path.join(d, "cgroup.procs") for d in self._tops)
        self.path_description = " ".join(self._tops)
        self._calls = calls
        self._last = Usage()
        self._pids_seen = 0

    def __repr__(self) -> str:
        return f"<CgroupV1Job {self.path_description}>"

    def control_file(self, controller: str, name: str) -> str | None:
        """
        The path of file C{name} of v1 C{controller}, C{None} if the job
        has no directory in that controller's hierarchy.
        """
        directory = self.directories.get(controller)
        return None if directory is None else os.path.join(directory, name)

    def usage(self) -> Usage:
        def number(controller: str, name: str) -> int | None:
            path = self.control_file(controller, name)
            return None if path is None else optional_int(path)

        def keyed(controller: str, name: str) -> dict[str, int]:
            path = self.control_file(controller, name)
            return {} if path is None else optional_keyed(path)

        cpu_nsec = number("cpuacct", "cpuacct.usage") or 0
        memory_peak = number("memory", "memory.max_usage_in_bytes") or 0
        oom_control = keyed("memory", "memory.oom_control")
        if "oom_kill" in oom_control:
            oom_killed = oom_control["oom_kill"] > 0
        else:
            # Kernels before 4.13 do not count OOM kills; the limit having
            # been hit is the nearest sign (see Usage.oom_killed).
            oom_killed = (number("memory", "memory.failcnt") or 0) > 0
        pids_peak = number("pids", "pids.peak")
        if pids_peak is None:
            self._pids_seen = max(self._pids_seen, number("pids", "pids.current") or 0)
            pids_peak = self._pids_seen
        io = None
        for name in ("blkio.throttle.io_service_bytes_recursive", "blkio.throttle.io_service_bytes"):
            path = self.control_file("blkio", name)
            if path is not None and (io := _io_totals(path)) is not None:
                break
        io_read, io_written = io or (0, 0)
        # A file that was unreadable because the job's directories went
        # away mid-read must not turn into a 0.
        if not all(os.path.isdir(d) for d in self._tops):
            return self._last
        self._last = Usage(
            cpu_usec=cpu_nsec // 1000,
            memory_peak_bytes=memory_peak,
            io_read_bytes=io_read,
            io_write_bytes=io_written,
            pids_peak=pids_peak,
            oom_killed=oom_killed,
        )
        return self._last

    def pids(self) -> list[int]:
        # A process could have moved itself out of the job in one
        # hierarchy (a root job can write cgroup.procs), so all count.
        return pids_below(self._tops)

    def kill(self) -> None:
        calls = self._calls
        state = self.control_file("freezer", "freezer.state")
        can_freeze = state is not None and os.path.exists(state)
        deadline = calls.monotonic() + KILL_TIMEOUT
        while self.pids():
            if can_freeze:
                self._set_state("FROZEN")
            kill_each(calls, self.pids())
            if can_freeze:
                self._set_state("THAWED")
            remaining = deadline - calls.monotonic()
            if remaining <= 0 or poll(calls, lambda: not self.pids(), min(0.5, remaining)):
                return

    def _set_state(self, state: str) -> None:
        path = self.control_file("freezer", "freezer.state")
        assert path is not None
        try:
            self._calls.write(path, state)
        except FileNotFoundError:
            return
        except OSError as e:
            raise CgroupError(f"cannot set {path} to {state}: {e.strerror}") from e
        if state == "FROZEN":
            # FREEZING until every task has stopped; a task stuck in the
            # kernel can hold that up, and the kills land anyway.
            poll(self._calls, lambda: self._frozen(path), FREEZE_TIMEOUT)

    @staticmethod
    def _frozen(path: str) -> bool:
        try:
            return read_text(path).strip() == "FROZEN"
        except OSError:
            return True

    def remove(self) -> None:
        remove_directories(self._calls, self._tops, self.pids, self.kill, self.path_description)


class CgroupV1Driver:
    """
    Job cgroups on the v1 hierarchies, each under C{<own>/<prefix>}.

    @ivar own: the service's cgroup directory in each hierarchy used, to
        the v1 controllers (of L{V1_CONTROLLERS}) bound to that hierarchy.
    @ivar bases: the same, for C{<own>/<prefix>}.
    @ivar io_devices: the devices I/O limits are applied to.
    @ivar controllers: of cpu, memory, io, pids, freezer, those mounted.
    """

    name = "v1"

    def __init__(
        self,
        own: Mapping[str, Iterable[str]],
        *,
        prefix: str = "jobworker",
        devices: Iterable[BlockDevice] = (),
        calls: HostCalls | None = None,
    ) -> None:
        self.own = {directory: frozenset(names) for directory, names in own.items()}
        self.bases = {os.path.join(directory, prefix): names for directory, names in self.own.items()}
        # v1 controller name -> base directory of its hierarchy.
        self._base_of = {name: base for base, names in self.bases.items() for name in names}
        self.io_devices = tuple(devices)
        self._calls = calls or HostCalls()
        self.controllers = frozenset(_REPORTED[c] for c in self._base_of if c in _REPORTED)
        self.base_description = " ".join(
            f"{','.join(sorted(names))}:{base}" for base, names in sorted(self.bases.items())
        )

    def __repr__(self) -> str:
        return f"<CgroupV1Driver {self.base_description}>"

    def prepare(self) -> None:
        make_each(self._calls, self.bases)

    def release(self) -> None:
        remove_empty(self._calls, self.bases)

    def _job(self, name: str) -> CgroupV1Job:
        return CgroupV1Job({c: os.path.join(base, name) for c, base in self._base_of.items()}, self._calls)

    def create(self, job_id: str, limits: Limits) -> CgroupV1Job:
        name = job_directory_name(job_id)
        check_supported(limits, self.controllers, self.name, self.io_devices)
        job = self._job(name)
        made = []
        try:
            for base in sorted(self.bases):
                path = os.path.join(base, name)
                try:
                    self._calls.mkdir(path)
                except OSError as e:
                    raise CgroupError(f"cannot make cgroup {path}: {e.strerror}") from e
                made.append(path)
            self._apply(job, limits)
        except BaseException:
            try:
                CgroupV1Job({c: d for c, d in job.directories.items() if d in made}, self._calls).remove()
            except CgroupError:
                # Nothing can have joined cgroups made a moment ago; if they
                # still cannot go, cleanup_stale() takes them at the next start.
                pass
            raise
        return job

    def _apply(self, job: CgroupV1Job, limits: Limits) -> None:
        def set_limit(limit: str, controller: str, name: str, value: str, *, required: bool = True) -> bool:
            path = job.control_file(controller, name)
            assert path is not None, controller
            return write_limit(self._calls, "v1", limit, path, value, required=required)

        if limits.pids:
            set_limit("pids", "pids", "pids.max", str(limits.pids))
        if limits.memory_bytes:
            set_limit("memory_bytes", "memory", "memory.limit_in_bytes", str(limits.memory_bytes))
            # After limit_in_bytes: memsw may never be below it.
            set_limit(
                "memory_bytes",
                "memory",
                "memory.memsw.limit_in_bytes",
                str(limits.memory_bytes),
                required=False,
            )
        if limits.cpu_millicores:
            quota, period = cpu_bandwidth(limits.cpu_millicores)
            set_limit("cpu_millicores", "cpu", "cpu.cfs_period_us", str(period))
            set_limit("cpu_millicores", "cpu", "cpu.cfs_quota_us", str(quota))
        for limit, name, rate in (
            ("io_read_bps", "blkio.throttle.read_bps_device", limits.io_read_bps),
            ("io_write_bps", "blkio.throttle.write_bps_device", limits.io_write_bps),
        ):
            if not rate:
                continue
            # A device unplugged since start-up (ENODEV) is no reason to
            # refuse the job; every device gone is.
            written = sum(
                set_limit(limit, "blkio", name, f"{device.number} {rate}", required=False)
                for device in self.io_devices
            )
            if not written:
                raise RequestError(
                    f"cannot enforce {limit} on this host: no block device took the limit",
                    ErrorCode.UNSUPPORTED_LIMIT,
                )

    def cleanup_stale(self, keep: frozenset[str] = frozenset()) -> list[str]:
        names: set[str] = set()
        for base in self.bases:
            names |= stale_job_names(base)
        return remove_each(names - keep, self._job)

    def attach(self, job_id: str) -> CgroupV1Job | None:
        name = job_directory_name(job_id)
        if not any(os.path.isdir(os.path.join(base, name)) for base in self.bases):
            return None
        return self._job(name)

    def prime_moves(self) -> None:
        # The lock is the kernel's, for every hierarchy: one will do.
        self._calls.write(os.path.join(min(self.own), "cgroup.procs"), str(self._calls.getpid()))

    def usage_supported(self) -> frozenset[str]:
        return usage_fields(self.controllers, cpu="cpuacct" in self._base_of)
