"""
Per-job cgroups: resource limits, usage, and killing a whole job.

A host adapter: standard library only, no reactor, no subprocess.  Every
call blocks for a bounded time (at most a few seconds, when a process is
slow to die); a Twisted caller runs them in a thread.

How the service uses it::

    driver = detect()                 # None: no usable cgroups on this host
    driver.prepare()                  # once, at start-up (v2: moves the service)
    driver.cleanup_stale()            # jobs left by a crashed server
    cgroup = driver.create(job_id, limits)   # RequestError(UNSUPPORTED_LIMIT)
    # the job's helper writes its own pid into every one of
    # cgroup.procs_files before it execs the command
    cgroup.usage(); cgroup.pids()
    cgroup.kill(); cgroup.remove()

Every job cgroup lives below the cgroup the service was started in, in a
directory named after the prefix (C{<own cgroup>/jobworker/job-<id>}),
never outside that subtree: the service only touches what it was delegated.

L{detect} reads C{/proc/self/mountinfo} and C{/proc/self/cgroup} and picks:

  - L{CgroupV2Driver} on a unified (pure v2) host, see L{jobworker.host.cgroups.v2};
  - L{CgroupV1Driver} on a v1 or hybrid host, see L{jobworker.host.cgroups.v1}.
    A hybrid host (systemd's default before v2) mounts the v1 hierarchies
    and also a cgroup2 filesystem at C{/sys/fs/cgroup/unified} that holds
    no controller; v2 there could group and kill processes but limit
    nothing.

It takes the one that can enforce more of cpu, memory, io and pids, v2 on
a tie.  L{jobworker.host.cgroups.testing} imitates both on plain files.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterable

from jobworker.host.cgroups._devices import BlockDevice, throttled_block_devices
from jobworker.host.cgroups._host import HostCalls
from jobworker.host.cgroups._interface import (
    SERVICE_LEAF,
    CgroupDriver,
    CgroupError,
    JobCgroup,
    Usage,
    job_directory_name,
)
from jobworker.host.cgroups._procfs import Membership, Mount, cgroup_directory, parse_mountinfo, parse_proc_cgroup
from jobworker.host.cgroups.v1 import V1_CONTROLLERS, CgroupV1Driver, CgroupV1Job
from jobworker.host.cgroups.v2 import CgroupV2Driver, CgroupV2Job

__all__ = [
    "BlockDevice",
    "CgroupDriver",
    "CgroupError",
    "CgroupV1Driver",
    "CgroupV1Job",
    "CgroupV2Driver",
    "CgroupV2Job",
    "HostCalls",
    "JobCgroup",
    "Usage",
    "detect",
    "job_directory_name",
]

_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LIMIT_CONTROLLERS = frozenset({"cpu", "memory", "io", "pids"})


def _read_proc(path: str) -> str:
    # surrogateescape: a cgroup or mount path may be any bytes, and must
    # come back out unchanged when handed to os functions.
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def _within(path: str, root: str) -> bool:
    path = posixpath.normpath(path)
    root = posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def _detect_v2(
    memberships: list[Membership],
    mounts: list[Mount],
    prefix: str,
    devices: Iterable[BlockDevice],
    calls: HostCalls | None,
) -> CgroupV2Driver | None:
    member = next((m for m in memberships if m.hierarchy_id == 0 and not m.controllers), None)
    if member is None:
        return None
    path = member.path
    parts = path.rstrip("/").split("/")
    if parts[-2:] == [prefix, SERVICE_LEAF]:
        # Already in the leaf a previous prepare() made: the service's
        # cgroup proper is two levels up.
        path = "/".join(parts[:-2]) or "/"
    for mount in mounts:
        if mount.fs_type != "cgroup2":
            continue
        directory = cgroup_directory(mount, path)
        if directory is not None and os.path.isdir(directory):
            return CgroupV2Driver(directory, prefix=prefix, devices=devices, calls=calls)
    return None


def _detect_v1(
    memberships: list[Membership],
    mounts: list[Mount],
    prefix: str,
    devices: Iterable[BlockDevice],
    calls: HostCalls | None,
) -> CgroupV1Driver | None:
    own: dict[str, set[str]] = {}
    for controller in V1_CONTROLLERS:
        member = next((m for m in memberships if m.hierarchy_id != 0 and controller in m.controllers), None)
        if member is None:
            continue
        for mount in mounts:
            if mount.fs_type != "cgroup" or controller not in mount.super_options:
                continue
            directory = cgroup_directory(mount, member.path)
            if directory is not None and os.path.isdir(directory):
                own.setdefault(directory, set()).add(controller)
                break
    if not any(names - {"cpuacct"} for names in own.values()):
        return None
    return CgroupV1Driver(own, prefix=prefix, devices=devices, calls=calls)


def detect(
    *,
    proc_self_cgroup: str = "/proc/self/cgroup",
    mounts: str = "/proc/self/mountinfo",
    root: str = "/sys/fs/cgroup",
    prefix: str = "jobworker",
    sys_block: str = "/sys/block",
    version: str | None = None,
    calls: HostCalls | None = None,
) -> CgroupDriver | None:
    """
    Find the cgroups this process can make job cgroups in.  Reads files
    only; changes nothing (that is L{CgroupDriver.prepare}).

    @param proc_self_cgroup: the service's cgroup membership file.
    @param mounts: the service's mountinfo file.
    @param root: only cgroup filesystems mounted at or below this directory
        count (not, say, one mounted inside a container's root elsewhere).
        Read-only mounts never count.
    @param prefix: the name of the directory that holds the job cgroups in
        the service's cgroup; at most 64 of C{A-Z a-z 0-9 _ . -}.
    @param sys_block: where the block devices for io limits are listed.
    @param version: C{"v1"} or C{"v2"} to take that driver or nothing;
        C{None} to choose (see the module docstring).
    @param calls: the kernel calls the driver makes (a fake in tests).
    @return: the driver, or C{None} if no cgroup hierarchy is usable (or
        none of the requested version).
    @raise CgroupError: the membership or mount file is malformed.
    """
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"cgroup prefix {prefix!r} is not 1 to 64 of A-Z a-z 0-9 _ . - starting with a letter or digit"
        )
    if version not in (None, "v1", "v2"):
        raise ValueError(f"cgroup version {version!r} is not 'v1' or 'v2'")
    try:
        memberships = parse_proc_cgroup(_read_proc(proc_self_cgroup))
        mount_list = parse_mountinfo(_read_proc(mounts))
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise CgroupError(f"cannot tell where this process's cgroups are: {e}") from e
    usable = [
        m
        for m in mount_list
        if m.fs_type in ("cgroup", "cgroup2") and not m.read_only and _within(m.mount_point, root)
    ]
    devices = throttled_block_devices(sys_block)
    v2 = _detect_v2(memberships, usable, prefix, devices, calls) if version != "v1" else None
    v1 = _detect_v1(memberships, usable, prefix, devices, calls) if version != "v2" else None
    if v2 is None or v1 is None:
        return v2 or v1
    if len(v2.controllers & _LIMIT_CONTROLLERS) >= len(v1.controllers & _LIMIT_CONTROLLERS):
        return v2
    return v1
