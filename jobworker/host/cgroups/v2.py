"""
The cgroup v2 (unified hierarchy) driver.

Layout, below the cgroup the service was started in (C{<own>}, from the
C{0::/path} line of C{/proc/self/cgroup})::

    <own>/                     subtree_control: +cpu +memory +io +pids
        <prefix>/              the base; subtree_control: +cpu +memory +io +pids
            service/           the service process, moved here by prepare()
            job-<id>/          one per job: cpu.max, memory.max, io.max, pids.max

Why the service moves: cgroup v2's "no internal process" rule.  A cgroup
(other than the root) that holds processes cannot enable controllers for
its children, and one whose children have controllers cannot take
processes.  The service starts in C{<own>} (systemd puts it there; with
C{Delegate=yes} the subtree is the service's to manage), so before it can
write C{+memory} into C{<own>/cgroup.subtree_control} it has to leave
C{<own>}: L{CgroupV2Driver.prepare} makes C{<own>/<prefix>/service} and
writes the service's pid into its C{cgroup.procs}, which moves the whole
process with all its threads.  Children the service forks later (each
job's isolation helper) start there and move themselves into their job's
cgroup before exec.  Only the service's own pid is moved: any other process
in C{<own>} is not ours to move, and then prepare() fails and says so.

If the service finds itself already in C{<own>/<prefix>/service} (it was
restarted in place), L{jobworker.host.cgroups.detect} takes the grandparent as
C{<own>}, so the layout does not nest again.

Controllers are enabled one by one, each only if C{cgroup.controllers}
lists it, so a host without, say, the io controller still gets the others;
the driver's C{controllers} then says what a job can be limited by.

Limits:

  - cpu: C{cpu.max} = C{"<quota> <period>"}, quota = millicores * 100 µs per
    100 000 µs period (see L{cpu_bandwidth} for under 10 millicores).
  - memory: C{memory.max} = bytes, and C{memory.swap.max} = 0 where the
    file exists (without swap accounting it does not, and the job's memory
    can then be swapped out past the limit).
  - io: C{io.max} = C{"MAJ:MIN rbps=N wbps=N"} for each device of
    L{jobworker.host.cgroups._devices}.  With the memory and io controllers both
    on, v2 charges page-cache writeback to the job that dirtied the pages,
    so buffered writes are throttled too (on ext4, xfs and btrfs).
  - pids: C{pids.max}.

Killing: C{cgroup.kill} (kernel >= 5.14) SIGKILLs every process in the
subtree at once, wherever it went in process groups and sessions.  On an
older kernel the cgroup is frozen (C{cgroup.freeze}, >= 5.2), so nothing in
it can fork while its pids are read and killed, then thawed; v2 lets a
frozen process die of SIGKILL.

Why it is one module of over 400 lines: it is one driver, the v2 job and
the driver that makes it, which share the hierarchy's rules above (the
service's own cgroup, subtree_control, freezing and killing).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from jobworker.errors import ErrorCode, RequestError
from jobworker.host.cgroups._devices import BlockDevice
from jobworker.host.cgroups._host import (
    FREEZE_TIMEOUT,
    KILL_TIMEOUT,
    UNSUPPORTED,
    HostCalls,
    kill_each,
    make_each,
    optional_int,
    optional_keyed,
    pids_below,
    poll,
    read_keyed,
    read_pids,
    read_text,
    remove_directories,
    remove_empty,
    write_limit,
)
from jobworker.host.cgroups._interface import (
    SERVICE_LEAF,
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

__all__ = ["CgroupV2Driver", "CgroupV2Job"]

# The controllers a job can be limited by, in the order they are enabled.
LIMIT_CONTROLLERS = ("cpu", "memory", "io", "pids")


def _split_file(path: str) -> set[str]:
    try:
        return set(read_text(path).split())
    except FileNotFoundError:
        return set()


def _io_totals(path: str) -> tuple[int, int]:
    """
    Sum C{rbytes} and C{wbytes} over the devices of an C{io.stat} file.
    """
    read = written = 0
    try:
        text = read_text(path)
    except OSError:
        return 0, 0
    for line in text.splitlines():
        for item in line.split()[1:]:
            key, _, value = item.partition("=")
            if not value.isdigit():
                continue
            if key == "rbytes":
                read += int(value)
            elif key == "wbytes":
                written += int(value)
    return read, written


class CgroupV2Job:
    """
    One job's cgroup, C{<base>/job-<id>}.

    @ivar path: the job's cgroup directory.
    @ivar controller_dirs: controller name to the directory whose files
        describe it (all C{path} on v2), for tests and diagnostics.
    """

    def __init__(self, path: str, calls: HostCalls, *, use_cgroup_kill: bool = True) -> None:
        self.path = path
        self.path_description = path
        self.procs_files: tuple[str, ...] = (os.path.join(path, "cgroup.procs"),)
        self.controller_dirs = {name: path for name in LIMIT_CONTROLLERS + ("freezer",)}
        self._calls = calls
        self._use_cgroup_kill = use_cgroup_kill
        self._last = Usage()
        self._memory_seen = 0
        self._pids_seen = 0

    def __repr__(self) -> str:
        return f"<CgroupV2Job {self.path}>"

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def usage(self) -> Usage:
        # A file missing because its controller is off reads as 0; a file
        # missing because the job's directory went away mid-read must not
        # turn into a 0, hence the directory check after all the reads.
        cpu = optional_keyed(self._file("cpu.stat")).get("usage_usec", 0)
        memory_peak = optional_int(self._file("memory.peak"))
        if memory_peak is None:
            current = optional_int(self._file("memory.current")) or 0
            self._memory_seen = max(self._memory_seen, current)
            memory_peak = self._memory_seen
        pids_peak = optional_int(self._file("pids.peak"))
        if pids_peak is None:
            current = optional_int(self._file("pids.current")) or 0
            self._pids_seen = max(self._pids_seen, current)
            pids_peak = self._pids_seen
        io_read, io_written = _io_totals(self._file("io.stat"))
        oom_kills = optional_keyed(self._file("memory.events")).get("oom_kill", 0)
        if not os.path.isdir(self.path):
            return self._last
        self._last = Usage(
            cpu_usec=cpu,
            memory_peak_bytes=memory_peak,
            io_read_bytes=io_read,
            io_write_bytes=io_written,
            pids_peak=pids_peak,
            oom_killed=oom_kills > 0,
        )
        return self._last

    def pids(self) -> list[int]:
        return pids_below([self.path])

    def kill(self) -> None:
        kill_file = self._file("cgroup.kill")
        if self._use_cgroup_kill and os.path.exists(kill_file):
            try:
                self._calls.write(kill_file, "1")
            except FileNotFoundError:
                return
            except OSError as e:
                raise CgroupError(f"cannot kill cgroup {self.path}: {e.strerror}") from e
            poll(self._calls, lambda: not self.pids(), KILL_TIMEOUT)
            return
        self._freeze_and_kill()

    def _freeze_and_kill(self) -> None:
        calls = self._calls
        deadline = calls.monotonic() + KILL_TIMEOUT
        can_freeze = os.path.exists(self._file("cgroup.freeze"))
        while self.pids():
            # Frozen, nothing in the cgroup can fork between reading the
            # pids and killing them, so one round normally kills all.
            if can_freeze:
                self._set_frozen(True)
            kill_each(calls, self.pids())
            if can_freeze:
                self._set_frozen(False)
            remaining = deadline - calls.monotonic()
            if remaining <= 0 or poll(calls, lambda: not self.pids(), min(0.5, remaining)):
                return

    def _set_frozen(self, frozen: bool) -> None:
        try:
            self._calls.write(self._file("cgroup.freeze"), "1" if frozen else "0")
        except FileNotFoundError:
            return
        except OSError as e:
            raise CgroupError(f"cannot {'freeze' if frozen else 'thaw'} cgroup {self.path}: {e.strerror}") from e
        if frozen:
            # Freezing is asynchronous; cgroup.events says when it is done.
            # A task stuck in the kernel can delay it: go on after a while,
            # the kills still land.
            poll(self._calls, self._frozen, FREEZE_TIMEOUT)

    def _frozen(self) -> bool:
        try:
            return read_keyed(self._file("cgroup.events")).get("frozen") == 1
        except FileNotFoundError:
            return True

    def remove(self) -> None:
        remove_directories(self._calls, [self.path], self.pids, self.kill, self.path)


class CgroupV2Driver:
    """
    Job cgroups on the unified hierarchy, under C{<own>/<prefix>}.

    @ivar own: the service's cgroup directory.
    @ivar base: C{<own>/<prefix>}, the parent of every job cgroup.
    @ivar service_leaf: where L{prepare} moves the service process.
    @ivar io_devices: the devices I/O limits are applied to.
    @ivar controllers: those of cpu, memory, io, pids that jobs can be
        limited by, and C{"freezer"} if cgroups can be frozen.  Before
        L{prepare}, what C{<own>} offers; after, what is enabled.
    """

    name = "v2"

    def __init__(
        self,
        own: str,
        *,
        prefix: str = "jobworker",
        devices: Iterable[BlockDevice] = (),
        calls: HostCalls | None = None,
        use_cgroup_kill: bool = True,
    ) -> None:
        """
        @param use_cgroup_kill: use C{cgroup.kill} where the kernel has it;
            C{False} forces the freeze-and-kill fallback (for testing it on
            a kernel that has both).
        """
        self.own = own
        self.base = os.path.join(own, prefix)
        self.service_leaf = os.path.join(self.base, SERVICE_LEAF)
        self.base_description = self.base
        self.io_devices = tuple(devices)
        self._calls = calls or HostCalls()
        self._use_cgroup_kill = use_cgroup_kill
        # (directory, controller) enabled by prepare(), undone by release().
        self._enabled: list[tuple[str, str]] = []
        offered = _split_file(os.path.join(own, "cgroup.controllers"))
        self.controllers = frozenset(c for c in LIMIT_CONTROLLERS if c in offered) | self._freezer(own)

    def __repr__(self) -> str:
        return f"<CgroupV2Driver {self.base} {sorted(self.controllers)}>"

    @staticmethod
    def _freezer(directory: str) -> frozenset[str]:
        # The root cgroup has no cgroup.freeze even where the kernel can
        # freeze: look at the service's cgroup, or the base once it exists.
        return (
            frozenset({"freezer"})
            if os.path.exists(os.path.join(directory, "cgroup.freeze"))
            else frozenset()
        )

    def prepare(self) -> None:
        calls = self._calls
        make_each(calls, (self.base, self.service_leaf))
        pid = calls.getpid()
        try:
            calls.write(os.path.join(self.service_leaf, "cgroup.procs"), str(pid))
        except OSError as e:
            raise CgroupError(
                f"cannot move the service (pid {pid}) into cgroup {self.service_leaf}: {e.strerror}"
            ) from e
        self._enable(self.own)
        self._enable(self.base)
        enabled = _split_file(os.path.join(self.base, "cgroup.subtree_control"))
        self.controllers = frozenset(c for c in LIMIT_CONTROLLERS if c in enabled) | self._freezer(self.base)

    def _enable(self, directory: str) -> None:
        offered = _split_file(os.path.join(directory, "cgroup.controllers"))
        enabled = _split_file(os.path.join(directory, "cgroup.subtree_control"))
        control = os.path.join(directory, "cgroup.subtree_control")
        for controller in LIMIT_CONTROLLERS:
            if controller not in offered or controller in enabled:
                continue
            # One controller per write: a write naming several fails whole
            # if one of them fails.
            try:
                self._calls.write(control, f"+{controller}")
            except OSError as e:
                if e.errno == errno.EBUSY:
                    others = [
                        p
                        for p in read_pids(os.path.join(directory, "cgroup.procs"))
                        if p != self._calls.getpid()
                    ]
                    raise CgroupError(
                        f"cannot enable the {controller} controller below {directory}: processes "
                        f"{others} are in it, and cgroup v2 gives no controller to the children of a "
                        f"cgroup with processes; start the service in a cgroup of its own "
                        f"(systemd: a service with Delegate=yes)"
                    ) from e
                if e.errno in UNSUPPORTED:
                    continue
                raise CgroupError(
                    f"cannot enable the {controller} controller below {directory}: {e.strerror}"
                ) from e
            self._enabled.append((directory, controller))

    def release(self) -> None:
        calls = self._calls
        # Innermost first: a controller cannot be disabled in a cgroup
        # while its children still enable it.
        for directory, controller in reversed(self._enabled):
            try:
                calls.write(os.path.join(directory, "cgroup.subtree_control"), f"-{controller}")
            except OSError as e:
                if e.errno not in UNSUPPORTED:
                    raise CgroupError(
                        f"cannot disable the {controller} controller below {directory}: {e.strerror}"
                    ) from e
        self._enabled.clear()
        try:
            calls.write(os.path.join(self.own, "cgroup.procs"), str(calls.getpid()))
        except OSError as e:
            raise CgroupError(f"cannot move the service back into cgroup {self.own}: {e.strerror}") from e
        remove_empty(calls, (self.service_leaf, self.base))

    def create(self, job_id: str, limits: Limits) -> CgroupV2Job:
        name = job_directory_name(job_id)
        check_supported(limits, self.controllers, self.name, self.io_devices)
        path = os.path.join(self.base, name)
        try:
            self._calls.mkdir(path)
        except OSError as e:
            raise CgroupError(f"cannot make cgroup {path}: {e.strerror}") from e
        job = CgroupV2Job(path, self._calls, use_cgroup_kill=self._use_cgroup_kill)
        try:
            self._apply(path, limits)
        except BaseException:
            try:
                job.remove()
            except CgroupError:
                # Nothing can have joined a cgroup made a moment ago; if it
                # still cannot go, cleanup_stale() takes it at the next start.
                pass
            raise
        return job

    def _apply(self, path: str, limits: Limits) -> None:
        join = os.path.join
        if limits.pids:
            write_limit(self._calls, "v2", "pids", join(path, "pids.max"), str(limits.pids))
        if limits.memory_bytes:
            write_limit(self._calls, "v2", "memory_bytes", join(path, "memory.max"), str(limits.memory_bytes))
            write_limit(self._calls, "v2", "memory_bytes", join(path, "memory.swap.max"), "0", required=False)
        if limits.cpu_millicores:
            quota, period = cpu_bandwidth(limits.cpu_millicores)
            write_limit(self._calls, "v2", "cpu_millicores", join(path, "cpu.max"), f"{quota} {period}")
        if limits.io_read_bps or limits.io_write_bps:
            rates = []
            if limits.io_read_bps:
                rates.append(f"rbps={limits.io_read_bps}")
            if limits.io_write_bps:
                rates.append(f"wbps={limits.io_write_bps}")
            written = 0
            for device in self.io_devices:
                # A device unplugged since start-up (ENODEV) is no reason
                # to refuse the job; every device gone is.
                written += write_limit(
                    self._calls,
                    "v2",
                    "io",
                    join(path, "io.max"),
                    " ".join([device.number, *rates]),
                    required=False,
                )
            if not written:
                raise RequestError(
                    "cannot enforce an io limit on this host: no block device took the limit",
                    ErrorCode.UNSUPPORTED_LIMIT,
                )

    def _job(self, name: str) -> CgroupV2Job:
        return CgroupV2Job(os.path.join(self.base, name), self._calls, use_cgroup_kill=self._use_cgroup_kill)

    def cleanup_stale(self, keep: frozenset[str] = frozenset()) -> list[str]:
        return remove_each(stale_job_names(self.base) - keep, self._job)

    def attach(self, job_id: str) -> CgroupV2Job | None:
        name = job_directory_name(job_id)
        return self._job(name) if os.path.isdir(os.path.join(self.base, name)) else None

    def prime_moves(self) -> None:
        self._calls.write(os.path.join(self.service_leaf, "cgroup.procs"), str(self._calls.getpid()))

    def usage_supported(self) -> frozenset[str]:
        # cpu.stat's usage_usec is core cgroup v2, there without the cpu
        # controller.
        return usage_fields(self.controllers, cpu=True)
