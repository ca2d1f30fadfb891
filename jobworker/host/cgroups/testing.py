"""
A fake cgroup host for tests that cannot, or should not, touch the real one.

L{FakeCgroupHost} lays out, under a temporary directory, what L{detect}
reads (C{proc/self/cgroup}, C{proc/self/mountinfo}, C{sys/block}, the
cgroup trees under C{sys/fs/cgroup}) with plain files, and plays the
kernel's part in every call a driver makes through L{HostCalls}: making a
cgroup fills it with the control files its controllers would have, writing
C{cgroup.procs} moves a process, C{cgroup.subtree_control} follows v2's
rules (a controller must be offered; no processes in a cgroup whose
children get controllers), SIGKILL removes a process from every cgroup,
rmdir refuses a cgroup with processes or children, and time passes only
when a driver sleeps.  The real drivers run on it unchanged.

Processes are only numbers here: L{FakeCgroupHost.spawn} invents one in a
job's cgroups, L{FakeCgroupHost.unkillable} names those that ignore
SIGKILL (as a task stuck in the kernel would).

    host = FakeCgroupHost.pure_v2(tmp_path)
    driver = host.detect()
    driver.prepare()
    job = driver.create("1", Limits(memory_bytes=64 << 20))
    pid = host.spawn(job.procs_files)
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from jobworker.host.cgroups import CgroupDriver, HostCalls, detect
from jobworker.host.cgroups._procfs import escape_mount_field

__all__ = ["FakeCgroupHost"]

_V2_CONTROLLER_FILES = {
    "cpu": {"cpu.max": "max 100000\n", "cpu.weight": "100\n"},
    "memory": {
        "memory.max": "max\n",
        "memory.swap.max": "max\n",
        "memory.current": "0\n",
        "memory.peak": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
    },
    "io": {"io.max": "", "io.stat": ""},
    "pids": {"pids.max": "max\n", "pids.current": "0\n", "pids.peak": "0\n"},
}

_V1_CONTROLLER_FILES = {
    "cpu": {
        "cpu.cfs_period_us": "100000\n",
        "cpu.cfs_quota_us": "-1\n",
        "cpu.shares": "1024\n",
        "cpu.stat": "nr_periods 0\nnr_throttled 0\nthrottled_time 0\n",
    },
    "cpuacct": {"cpuacct.usage": "0\n"},
    "memory": {
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.memsw.limit_in_bytes": "9223372036854771712\n",
        "memory.max_usage_in_bytes": "0\n",
        "memory.usage_in_bytes": "0\n",
        "memory.failcnt": "0\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    },
    "blkio": {
        "blkio.throttle.read_bps_device": "",
        "blkio.throttle.write_bps_device": "",
        "blkio.throttle.io_service_bytes": "Total 0\n",
        "blkio.throttle.io_service_bytes_recursive": "Total 0\n",
    },
    "pids": {"pids.max": "max\n", "pids.current": "0\n", "pids.peak": "0\n"},
    "freezer": {
        "freezer.state": "THAWED\n",
        "freezer.self_freezing": "0\n",
        "freezer.parent_freezing": "0\n",
    },
}

# Control files whose writes the kernel merges per device instead of
# replacing the whole content.
_PER_DEVICE = frozenset({"io.max", "blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device"})


@dataclass
class _Hierarchy:
    mount_point: str
    version: int
    controllers: tuple[str, ...]


def _error(code: int, path: str) -> OSError:
    return OSError(code, os.strerror(code), path)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class FakeCgroupHost:
    """
    A host with fake cgroup filesystems under C{directory}.

    @ivar calls: the L{HostCalls} to hand to a driver (L{detect} does).
    @ivar proc_self_cgroup: path of the fake C{/proc/self/cgroup}.
    @ivar mountinfo: path of the fake C{/proc/self/mountinfo}.
    @ivar root: the fake C{/sys/fs/cgroup}.
    @ivar sys_block: the fake C{/sys/block}.
    @ivar service_pid: the pid C{getpid()} returns.
    @ivar alive: pids that exist.
    @ivar unkillable: pids that survive SIGKILL.
    @ivar signals: every C{(pid, signal)} sent, in order.
    @ivar writes: every control-file write C{(path, text)}, in order.
    @ivar failures: control-file name to the errno its writes fail with.
    @ivar now: the fake monotonic clock, seconds.
    """

    def __init__(
        self, directory: str | os.PathLike[str], *, service_pid: int = 4242, cgroup_kill: bool = True
    ) -> None:
        self.directory = os.fspath(directory)
        self.root = os.path.join(self.directory, "sys", "fs", "cgroup")
        self.proc_self_cgroup = os.path.join(self.directory, "proc", "self", "cgroup")
        self.mountinfo = os.path.join(self.directory, "proc", "self", "mountinfo")
        self.sys_block = os.path.join(self.directory, "sys", "block")
        for path in (self.root, os.path.dirname(self.proc_self_cgroup), self.sys_block):
            os.makedirs(path, exist_ok=True)
        self.service_pid = service_pid
        self.cgroup_kill = cgroup_kill
        self.alive = {service_pid}
        self.unkillable: set[int] = set()
        self.signals: list[tuple[int, int]] = []
        self.writes: list[tuple[str, str]] = []
        self.failures: dict[str, int] = {}
        self.now = 0.0
        self._next_pid = 10_000
        self._hierarchies: list[_Hierarchy] = []
        self._memberships: list[str] = []
        self._mount_lines = [
            "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw",
            "23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw",
        ]
        self.calls = HostCalls(
            mkdir=self.mkdir,
            rmdir=self.rmdir,
            write=self.write,
            kill=self.kill,
            sleep=self.sleep,
            monotonic=lambda: self.now,
            getpid=lambda: self.service_pid,
        )
        self._flush()

    # -- layouts -----------------------------------------------------------

    @classmethod
    def pure_v2(
        cls,
        directory: str | os.PathLike[str],
        *,
        own: str = "/system.slice/jobworker.service",
        controllers: Iterable[str] = ("cpu", "io", "memory", "pids"),
        devices: Iterable[tuple[str, int, int]] = (("vda", 254, 0),),
        **kwargs: object,
    ) -> FakeCgroupHost:
        """
        A pure cgroup v2 host (systemd's default today): the service in
        C{own}, every ancestor enabling C{controllers} for its children.
        """
        host = cls(directory, **kwargs)  # type: ignore[arg-type]  # kwargs are the caller's, for cls
        host.mount_v2("", controllers, own=own)
        for name, major, minor in devices:
            host.add_block_device(name, major, minor)
        return host

    @classmethod
    def hybrid(
        cls,
        directory: str | os.PathLike[str],
        *,
        v1: Mapping[str, str] | None = None,
        unified_own: str = "/",
        devices: Iterable[tuple[str, int, int]] = (("vda", 254, 0),),
        **kwargs: object,
    ) -> FakeCgroupHost:
        """
        A hybrid host: v1 hierarchies (C{v1}: the comma-joined controllers
        of each, which is also its directory name, to the service's cgroup
        there) and a cgroup2 mount at C{unified} with no controller.  By
        default cpu and cpuacct share a hierarchy and the service sits in a
        non-root memory cgroup.
        """
        host = cls(directory, **kwargs)  # type: ignore[arg-type]  # kwargs are the caller's, for cls
        if v1 is None:
            v1 = {
                "cpu,cpuacct": "/",
                "memory": "/process_api/4d86",
                "blkio": "/",
                "pids": "/",
                "freezer": "/",
                "name=systemd": "/",
            }
        for name, own in v1.items():
            directory_name = name[len("name=") :] if name.startswith("name=") else name
            host.mount_v1(directory_name, tuple(name.split(",")), own=own)
        host.mount_v2("unified", (), own=unified_own)
        for name, major, minor in devices:
            host.add_block_device(name, major, minor)
        return host

    def mount_v2(self, name: str, controllers: Iterable[str], *, own: str, mount_root: str = "/") -> str:
        """
        Mount a cgroup2 filesystem at C{<root>/<name>} whose root offers
        C{controllers}, and put the service in cgroup C{own}.

        @return: the service's cgroup directory.
        """
        controllers = tuple(controllers)
        mount_point = os.path.join(self.root, name) if name else self.root
        os.makedirs(mount_point, exist_ok=True)
        self._hierarchies.append(_Hierarchy(mount_point, 2, controllers))
        _write(os.path.join(mount_point, "cgroup.controllers"), " ".join(controllers) + "\n")
        for file in ("cgroup.subtree_control", "cgroup.procs"):
            _write(os.path.join(mount_point, file), "")
        _write(os.path.join(mount_point, "cpu.stat"), "usage_usec 0\nuser_usec 0\nsystem_usec 0\n")
        self._mount(mount_root, mount_point, "cgroup2", "rw,nsdelegate")
        self._memberships.append(f"0::{own}")
        directory = self._make_own(mount_point, mount_root, own, enable=controllers)
        self._flush()
        return directory

    def mount_v1(self, name: str, controllers: tuple[str, ...], *, own: str, mount_root: str = "/") -> str:
        """
        Mount a v1 hierarchy of C{controllers} at C{<root>/<name>} and put
        the service in its cgroup C{own}.

        @return: the service's cgroup directory.
        """
        mount_point = os.path.join(self.root, name)
        os.makedirs(mount_point)
        self._hierarchies.append(_Hierarchy(mount_point, 1, controllers))
        for file, text in self._v1_files(controllers).items():
            _write(os.path.join(mount_point, file), text)
        hierarchy_id = len(self._memberships) + 1
        self._mount(mount_root, mount_point, "cgroup", "rw," + ",".join(controllers))
        self._memberships.insert(0, f"{hierarchy_id}:{','.join(controllers)}:{own}")
        directory = self._make_own(mount_point, mount_root, own, enable=())
        self._flush()
        return directory

    def _mount(self, root: str, mount_point: str, fs_type: str, super_options: str) -> None:
        number = 30 + len(self._mount_lines)
        self._mount_lines.append(
            f"{number} 22 0:{number} {escape_mount_field(root)} {escape_mount_field(mount_point)} "
            f"rw,nosuid,nodev,noexec,relatime shared:{number} - {fs_type} {fs_type} {super_options}"
        )

    def _make_own(self, mount_point: str, mount_root: str, own: str, *, enable: Iterable[str]) -> str:
        relative = own[len(mount_root.rstrip("/")) :].strip("/")
        directory = mount_point
        for part in [p for p in relative.split("/") if p]:
            self._enable(directory, enable)
            directory = os.path.join(directory, part)
            if not os.path.isdir(directory):
                self.mkdir(directory)
        self._move(self.service_pid, directory)
        return directory

    def _enable(self, directory: str, controllers: Iterable[str]) -> None:
        for controller in controllers:
            self.write(os.path.join(directory, "cgroup.subtree_control"), f"+{controller}")
        self.writes.clear()

    def add_block_device(
        self, name: str, major: int, minor: int, *, size: int = 2**29, hidden: bool = False
    ) -> None:
        """
        Add C{/sys/block/<name>}, C{size} sectors.
        """
        entry = os.path.join(self.sys_block, name)
        os.makedirs(entry)
        _write(os.path.join(entry, "dev"), f"{major}:{minor}\n")
        _write(os.path.join(entry, "size"), f"{size}\n")
        _write(os.path.join(entry, "hidden"), "1\n" if hidden else "0\n")

    def _flush(self) -> None:
        _write(self.proc_self_cgroup, "".join(line + "\n" for line in self._memberships))
        _write(self.mountinfo, "".join(line + "\n" for line in self._mount_lines))

    def detect(self, **kwargs: object) -> CgroupDriver | None:
        """
        L{detect} on this host.
        """
        return detect(
            proc_self_cgroup=self.proc_self_cgroup,
            mounts=self.mountinfo,
            root=self.root,
            sys_block=self.sys_block,
            calls=self.calls,
            **kwargs,  # type: ignore[arg-type]  # the caller's, for detect()
        )

    # -- processes ---------------------------------------------------------

    def spawn(self, procs_files: Iterable[str]) -> int:
        """
        Start a fake process in the cgroups of C{procs_files}, as a job's
        helper does.

        @return: its pid.
        """
        self._next_pid += 1
        pid = self._next_pid
        self.alive.add(pid)
        for procs in procs_files:
            self._move(pid, os.path.dirname(procs))
        return pid

    def members(self, directory: str) -> list[int]:
        """
        The pids in cgroup C{directory} itself.
        """
        return [int(p) for p in _read(os.path.join(directory, "cgroup.procs")).split()]

    # -- the kernel --------------------------------------------------------

    def _hierarchy(self, path: str) -> _Hierarchy:
        found = [
            h for h in self._hierarchies if path == h.mount_point or path.startswith(h.mount_point + "/")
        ]
        if not found:
            raise _error(errno.ENOENT, path)
        return max(found, key=lambda h: len(h.mount_point))

    def _cgroups(self, hierarchy: _Hierarchy) -> list[str]:
        nested = [
            h.mount_point for h in self._hierarchies if h.mount_point.startswith(hierarchy.mount_point + "/")
        ]
        return [
            directory
            for directory, _, _ in os.walk(hierarchy.mount_point)
            if not any(directory == n or directory.startswith(n + "/") for n in nested)
        ]

    def _v1_files(self, controllers: Iterable[str]) -> dict[str, str]:
        files = {"cgroup.procs": "", "tasks": "", "notify_on_release": "0\n", "cgroup.clone_children": "0\n"}
        for controller in controllers:
            files.update(_V1_CONTROLLER_FILES.get(controller, {}))
        return files

    def _v2_files(self, controllers: Iterable[str]) -> dict[str, str]:
        controllers = list(controllers)
        files = {
            "cgroup.procs": "",
            "cgroup.controllers": " ".join(controllers) + "\n",
            "cgroup.subtree_control": "",
            "cgroup.events": "populated 0\nfrozen 0\n",
            "cgroup.freeze": "0\n",
            "cgroup.type": "domain\n",
            "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n",
        }
        if self.cgroup_kill:
            files["cgroup.kill"] = ""
        for controller in controllers:
            files.update(_V2_CONTROLLER_FILES.get(controller, {}))
        return files

    def mkdir(self, path: str) -> None:
        hierarchy = self._hierarchy(path)
        os.mkdir(path)
        if hierarchy.version == 1:
            files = self._v1_files(hierarchy.controllers)
        else:
            parent = os.path.dirname(path)
            files = self._v2_files(_read(os.path.join(parent, "cgroup.subtree_control")).split())
        for file, text in files.items():
            _write(os.path.join(path, file), text)

    def rmdir(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if any(entry.is_dir() for entry in os.scandir(path)) or self.members(path):
            raise _error(errno.EBUSY, path)
        shutil.rmtree(path)

    def write(self, path: str, text: str) -> None:
        self.writes.append((path, text))
        name = os.path.basename(path)
        if name in self.failures:
            raise _error(self.failures[name], path)
        if not os.path.isfile(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        directory = os.path.dirname(path)
        if name == "cgroup.procs":
            pid = int(text.strip()) or self.service_pid
            if pid not in self.alive:
                raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH), path)
            hierarchy = self._hierarchy(directory)
            if (
                hierarchy.version == 2
                and directory != hierarchy.mount_point
                and _read(os.path.join(directory, "cgroup.subtree_control")).split()
            ):
                raise _error(errno.EBUSY, path)
            self._move(pid, directory)
        elif name == "cgroup.subtree_control":
            self._subtree_control(directory, text)
        elif name == "cgroup.kill":
            for cgroup in [d for d, _, _ in os.walk(directory)]:
                for pid in self.members(cgroup):
                    self.kill(pid, signal.SIGKILL)
        elif name == "cgroup.freeze":
            # Freezing is instant here; the kernel reports it in cgroup.events.
            frozen = text.strip()
            _write(path, frozen + "\n")
            events = os.path.join(directory, "cgroup.events")
            lines = [
                f"frozen {frozen}" if line.startswith("frozen ") else line
                for line in _read(events).splitlines()
            ]
            _write(events, "".join(line + "\n" for line in lines))
        elif name in _PER_DEVICE:
            rules = {line.split()[0]: line for line in _read(path).splitlines() if line.strip()}
            device = text.split()[0]
            rules[device] = text.strip()
            _write(path, "".join(line + "\n" for line in rules.values()))
        else:
            _write(path, text.strip() + "\n")

    def _subtree_control(self, directory: str, text: str) -> None:
        path = os.path.join(directory, "cgroup.subtree_control")
        offered = _read(os.path.join(directory, "cgroup.controllers")).split()
        enabled = _read(path).split()
        hierarchy = self._hierarchy(directory)
        children = [entry.path for entry in os.scandir(directory) if entry.is_dir()]
        for token in text.split():
            sign, controller = token[0], token[1:]
            if sign not in "+-" or controller not in offered:
                raise _error(errno.ENOENT if sign in "+-" else errno.EINVAL, path)
            if sign == "+" and controller not in enabled:
                if directory != hierarchy.mount_point and self.members(directory):
                    raise _error(errno.EBUSY, path)
                enabled.append(controller)
            elif sign == "-" and controller in enabled:
                if any(
                    controller in _read(os.path.join(c, "cgroup.subtree_control")).split() for c in children
                ):
                    raise _error(errno.EBUSY, path)
                enabled.remove(controller)
        _write(path, " ".join(enabled) + "\n" if enabled else "")
        for child in children:
            _write(os.path.join(child, "cgroup.controllers"), " ".join(enabled) + "\n")
            for controller, files in _V2_CONTROLLER_FILES.items():
                for file, initial in files.items():
                    file_path = os.path.join(child, file)
                    if controller in enabled and not os.path.exists(file_path):
                        _write(file_path, initial)
                    elif controller not in enabled and os.path.exists(file_path):
                        os.unlink(file_path)

    def _move(self, pid: int, directory: str) -> None:
        hierarchy = self._hierarchy(directory)
        for cgroup in self._cgroups(hierarchy):
            members = self.members(cgroup)
            if pid in members:
                members.remove(pid)
                _write(os.path.join(cgroup, "cgroup.procs"), "".join(f"{p}\n" for p in members))
        _write(
            os.path.join(directory, "cgroup.procs"),
            _read(os.path.join(directory, "cgroup.procs")) + f"{pid}\n",
        )

    def kill(self, pid: int, sig: int) -> None:
        if pid not in self.alive:
            raise ProcessLookupError(errno.ESRCH, os.strerror(errno.ESRCH))
        self.signals.append((pid, sig))
        if sig != signal.SIGKILL or pid in self.unkillable:
            return
        self.alive.discard(pid)
        for hierarchy in self._hierarchies:
            for cgroup in self._cgroups(hierarchy):
                members = self.members(cgroup)
                if pid in members:
                    members.remove(pid)
                    _write(os.path.join(cgroup, "cgroup.procs"), "".join(f"{p}\n" for p in members))

    def sleep(self, seconds: float) -> None:
        self.now += seconds
