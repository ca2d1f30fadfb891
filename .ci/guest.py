#!/usr/bin/env python3
"""
Boot a pure cgroup v2 Linux guest under qemu and run the privileged test
suites inside it, as root, with C{CI=true}.

    python3 .ci/guest.py [--timeout SECONDS] [--accel auto|kvm|tcg] [--junit PATH] [pytest args...]
    python3 .ci/guest.py --table JUNIT...    (the figures of runs, side by side)

(C{python3 dev.py guest ...} makes the checkout's .venv first and then runs
this.)  Without pytest arguments the guest runs L{GUEST_SUITE}.  The exit
status is pytest's inside the guest; 124 if the guest ran past the timeout,
3 if it could not be built or booted.

What the guest is:

  - Debian's generic amd64 kernel (C{linux-image-<version>-amd64}, the one
    the C{linux-image-amd64} metapackage points at; the C{-cloud} flavour has
    no 9p), fetched with C{apt-get download} and unpacked with C{dpkg-deb -x}.
    There is no systemd in the guest and nothing but cgroup2 is mounted, so
    it is pure v2 with every controller the kernel has (cpuset cpu io memory
    hugetlb pids rdma misc on 6.1); the tests' processes start in the root
    cgroup, and the tests that need a delegated, non-root placement make
    one (see C{tests/e2e/test_e2e_limits_isolation.py}).
  - A busybox (C{busybox-static}) initramfs, written here as a newc archive,
    whose C{/init} loads the virtio, 9p, overlay and ext4 modules, mounts the
    host's C{/} read-only over 9p with a tmpfs overlay on top, chroots into
    it and runs the job script it finds on the results export.  So the guest
    runs the checkout's own .venv and Python, and writes go to guest memory.
  - A fresh ext4 disk (a sparse raw file, made with C{mkfs.ext4}) as
    C{/dev/vda}, mounted on C{/srv}: the real block device the io limit
    tests throttle.
  - A writable 9p export of a host directory, C{/jobworker-results} in the
    guest: the job script, pytest's exit status and its junit XML.
  - The serial console is this command's output, live.

Acceleration: KVM where C{/dev/kvm} opens and a guest boots under it within
L{KVM_PROBE_SECONDS}; otherwise software emulation (TCG, two vCPU threads).
Some hosts' KVM (nested, paravirtual) accepts a VM and never runs it: the
first boot is watched for the init's first line, and a KVM that hangs is
remembered per host kernel and qemu version, so later runs go straight to
TCG.

Everything comes from Debian packages: qemu-system-x86, busybox-static,
e2fsprogs, installed with apt-get when missing (as root, no prompt).  The
kernel and the initramfs are cached in C{/var/cache/jobworker-guest} (root)
or C{$XDG_CACHE_HOME/jobworker-guest}, each keyed by what built it (kernel
package and version; the init script, busybox and modules).  The disk is
made fresh for every run (a second at most), so no run sees another's files.

Standard library only: it runs before the .venv exists.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The privileged suites the guest runs when no pytest arguments are given:
# paths relative to the checkout, or pytest node ids.  Add a file here when
# it has tests that need root, cgroups or namespaces; each of them must say
# which cgroup layout it ran on ([v1] / [v2] in its ids or output).
GUEST_SUITE = (
    "tests/host/test_cgroups_enforcement.py",
    "tests/e2e/test_e2e_limits_isolation.py",
    # The helper joining a job cgroup and its limit holding from the first
    # instruction.  The helper's namespace tests do not depend on the
    # cgroup layout (the host runs them) and would cost over a minute here.
    "tests/host/test_isolate.py::test_command_runs_in_the_joined_cgroup",
    "tests/host/test_isolate.py::test_cgroup_limit_applies_from_the_start",
    # The service's shutdown and restart, which kill and clean up job
    # cgroups (the isolated mode: the others run without cgroups).
    "tests/e2e/test_e2e_lifecycle.py::test_sigterm_stops_running_jobs_and_the_server_exits[isolated]",
    "tests/e2e/test_e2e_lifecycle.py::test_the_processes_of_a_lost_job_are_gone_after_restart[isolated]",
    # (Not the test of two servers on one host: their subtrees are told
    # apart by their state directories' names, whatever the layout; three
    # server starts, 25 s under emulation.)
    # Jobs that end while no server runs (issue 16): the supervisor reads
    # the OOM kill and the usage from the job's cgroup by itself, and
    # removes it.  Two server starts, ~40 s under emulation; the other
    # live-restore tests are about the supervisor more than the cgroup
    # layout (the host runs them) and would cost minutes here.
    "tests/e2e/test_e2e_live_restore.py::test_jobs_that_end_while_no_server_runs_have_their_true_final_state",
)

# Tests of the files above that the guest leaves out: they do not depend on
# the cgroup layout (the host suite runs them), and each starts a server of
# its own, 15-25 s under emulation.
GUEST_DESELECT = (
    # Caps are policy, checked before any cgroup is made.
    "tests/e2e/test_e2e_limits_isolation.py::test_caps_bind_users_not_admins",
    # --cgroups none: no cgroup at all.
    "tests/e2e/test_e2e_limits_isolation.py::test_unenforceable_limit_is_an_error",
    # Namespaces, users and start errors: no cgroup is read or written
    # beyond a job's plain start, which every test here makes.  Eleven runs
    # of jobcli, each a Python start-up of seconds under emulation (CI
    # had grown past its 15 minutes).
    "tests/e2e/test_e2e_limits_isolation.py::test_pid_namespace",
    "tests/e2e/test_e2e_limits_isolation.py::test_mounts_do_not_reach_the_host",
    "tests/e2e/test_e2e_limits_isolation.py::test_network_is_loopback_only",
    "tests/e2e/test_e2e_limits_isolation.py::test_job_user",
    "tests/e2e/test_e2e_limits_isolation.py::test_start_errors_are_synchronous",
)

# Debian packages the guest is built from, by a command each provides.
PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "mkfs.ext4": "e2fsprogs",
}
BUSYBOX = "/bin/busybox"
# The metapackage that names the current generic amd64 kernel.
KERNEL_METAPACKAGE = "linux-image-amd64"

# Modules /init loads, in an order that satisfies their dependencies (the
# rest of each one's C{depends=} is resolved from the package).  crc32c:
# ext4 asks for it through the crypto API, not a module dependency.
GUEST_MODULES = ("crc32c_generic", "virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "overlay", "ext4")

# Seconds.  A stock kernel under KVM prints /init's first line within 2 s;
# a hung one never does.  5 s tolerates a loaded host; a misjudged one
# only costs the emulation's speed.
KVM_PROBE_SECONDS = 5
# Seconds, the whole guest run by default.  It bounds a hung guest, not a
# slow one: the suite takes 4-5 minutes on an idle 2-core host and has taken
# 12.5 with a second emulated guest and other tests beside it.
DEFAULT_TIMEOUT = 900
# apt and dpkg on a slow mirror (seconds).
APT_TIMEOUT = 600
# Another apt on the machine holds its lock for a while: wait for it
# (seconds) rather than fail.
APT_WAIT = ("-o", "DPkg::Lock::Timeout=300")
GUEST_MEMORY_MIB = 3072
DISK_MIB = 1024
# The largest 9p message qemu 7.2 takes (bytes): fewer round trips for
# Python's imports over the share.
MSIZE = 512000

INIT_MARKER = "jobworker-guest: init"
RESULTS_IN_GUEST = "/jobworker-results"


def say(message: str) -> None:
    print(f"guest: {message}", flush=True)


class GuestError(Exception):
    """
    The guest could not be built or booted (not a test failure).
    """


# -- the host's tools ------------------------------------------------------------


def run_checked(command: list[str], *, timeout: float, cwd: str | None = None) -> str:
    try:
        result = subprocess.run(
            command,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    except subprocess.TimeoutExpired:
        raise GuestError(f"{shlex.join(command)} took more than {timeout:g} s") from None
    except FileNotFoundError:
        raise GuestError(f"{command[0]} is not installed") from None
    if result.returncode != 0:
        raise GuestError(f"{shlex.join(command)} exited {result.returncode}:\n{result.stdout[-4000:]}")
    return result.stdout


class Apt:
    """
    apt-get and apt-cache, with C{apt-get update} run at most once, and only
    when something is missing.
    """

    def __init__(self) -> None:
        self.updated = False

    def update(self) -> None:
        if self.updated:
            return
        say("apt-get update")
        run_checked(["apt-get", *APT_WAIT, "update", "-q"], timeout=APT_TIMEOUT)
        self.updated = True

    def install(self, packages: list[str]) -> None:
        if os.geteuid() != 0:
            raise GuestError(f"missing packages {packages}; install them (as root: apt-get install {' '.join(packages)})")
        self.update()
        say(f"apt-get install {' '.join(packages)}")
        run_checked(
            ["apt-get", *APT_WAIT, "install", "-y", "-q", "--no-install-recommends", *packages], timeout=APT_TIMEOUT
        )


def busybox_is_static() -> bool:
    """
    Whether C{/bin/busybox} needs no dynamic loader (the busybox-static
    package; the plain busybox package cannot run in an initramfs).
    """
    try:
        with open(BUSYBOX, "rb") as handle:
            header = handle.read(64)
            if header[:4] != b"\x7fELF" or header[4] != 2:
                return False
            phoff = int.from_bytes(header[32:40], "little")
            phentsize = int.from_bytes(header[54:56], "little")
            phnum = int.from_bytes(header[56:58], "little")
            handle.seek(phoff)
            table = handle.read(phentsize * phnum)
    except OSError:
        return False
    # PT_INTERP (3) names the dynamic loader.
    return all(int.from_bytes(table[i : i + 4], "little") != 3 for i in range(0, len(table), phentsize))


def ensure_tools(apt: Apt) -> None:
    missing = sorted({package for command, package in PACKAGES.items() if shutil.which(command) is None})
    if not busybox_is_static():
        missing.append("busybox-static")
    if missing:
        apt.install(missing)


def cache_directory() -> str:
    if os.geteuid() == 0:
        base = "/var/cache/jobworker-guest"
    else:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jobworker-guest")
    os.makedirs(base, exist_ok=True)
    return base


# -- the kernel --------------------------------------------------------------------


def current_kernel_package(apt: Apt) -> tuple[str, str]:
    """
    The generic amd64 kernel package the metapackage depends on, and its
    version, e.g. C{("linux-image-6.1.0-57-amd64", "6.1.192-3")}.
    """
    for attempt in range(2):
        try:
            shown = run_checked(["apt-cache", "show", "--no-all-versions", KERNEL_METAPACKAGE], timeout=60)
            match = re.search(r"^Depends:.*?\b(linux-image-[0-9][^ ,]*-amd64)\b", shown, re.M)
            if match is None:
                raise GuestError(f"{KERNEL_METAPACKAGE} names no linux-image-*-amd64 package:\n{shown}")
            package = match.group(1)
            version = re.search(r"\(= ([^)]+)\)", shown.split(package, 1)[1].splitlines()[0])
            if version is None:
                shown = run_checked(["apt-cache", "show", "--no-all-versions", package], timeout=60)
                version = re.search(r"^Version: (\S+)", shown, re.M)
            assert version is not None, f"apt-cache show {package} names no version"
            return package, version.group(1)
        except GuestError:
            if attempt or apt.updated or os.geteuid() != 0:
                raise
            apt.update()
    raise AssertionError("unreachable")


def ensure_kernel(apt: Apt, cache: str) -> dict[str, str]:
    """
    The kernel and the modules L{GUEST_MODULES} needs, unpacked in the cache.

    @return: C{{"key", "vmlinuz", "modules", "release"}}.
    """
    try:
        package, version = current_kernel_package(apt)
    except GuestError as e:
        cached = sorted(name for name in os.listdir(cache) if name.startswith("kernel-"))
        if not cached:
            raise
        say(f"cannot ask apt for the kernel ({str(e).splitlines()[0]}); using the cached {cached[-1]}")
        return _kernel_at(os.path.join(cache, cached[-1]))
    directory = os.path.join(cache, f"kernel-{package}_{version}")
    if os.path.exists(os.path.join(directory, "done")):
        os.utime(directory)
        return _kernel_at(directory)
    say(f"fetching {package} {version}")
    work = tempfile.mkdtemp(prefix=".fetch-", dir=cache)
    try:
        # The sandbox user _apt cannot write to a root-only directory.
        os.chmod(work, 0o755)
        run_checked(["apt-get", "download", "-q", f"{package}={version}"], cwd=work, timeout=APT_TIMEOUT)
        (deb,) = [name for name in os.listdir(work) if name.endswith(".deb")]
        unpacked = os.path.join(work, "x")
        run_checked(["dpkg-deb", "-x", os.path.join(work, deb), unpacked], timeout=APT_TIMEOUT)
        (release,) = os.listdir(os.path.join(unpacked, "lib", "modules"))
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(os.path.join(directory, "modules"))
        shutil.copy(os.path.join(unpacked, "boot", f"vmlinuz-{release}"), os.path.join(directory, "vmlinuz"))
        tree = os.path.join(unpacked, "lib", "modules", release, "kernel")
        order = module_order(tree, GUEST_MODULES)
        for name, path in order:
            shutil.copy(path, os.path.join(directory, "modules", f"{name}.ko"))
        with open(os.path.join(directory, "modules.list"), "w") as handle:
            handle.write("".join(f"{name}.ko\n" for name, _ in order))
        with open(os.path.join(directory, "release"), "w") as handle:
            handle.write(release)
        with open(os.path.join(directory, "done"), "w") as handle:
            handle.write(f"{package} {version}\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prune(cache, "kernel-", keep=os.path.basename(directory))
    return _kernel_at(directory)


def _kernel_at(directory: str) -> dict[str, str]:
    with open(os.path.join(directory, "release")) as handle:
        release = handle.read().strip()
    return {
        "key": os.path.basename(directory),
        "vmlinuz": os.path.join(directory, "vmlinuz"),
        "modules": os.path.join(directory, "modules"),
        "modules_list": os.path.join(directory, "modules.list"),
        "release": release,
    }


def _modinfo_depends(path: str) -> list[str]:
    with open(path, "rb") as handle:
        data = handle.read()
    match = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if match is None or not match.group(1):
        return []
    return match.group(1).decode().split(",")


def module_order(tree: str, wanted: tuple[str, ...]) -> list[tuple[str, str]]:
    """
    C{wanted} and the modules they depend on (C{depends=} in each module's
    modinfo), dependencies first.

    @param tree: the package's C{lib/modules/<release>/kernel}.
    @return: C{(name, path)} pairs.
    """
    index = {}
    for directory, _, names in os.walk(tree):
        for name in names:
            if name.endswith(".ko"):
                index[name[:-3].replace("-", "_")] = os.path.join(directory, name)
    order: list[tuple[str, str]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        if key not in index:
            raise GuestError(f"the kernel package has no module {name} (is it built in? then drop it from GUEST_MODULES)")
        for dependency in _modinfo_depends(index[key]):
            visit(dependency)
        order.append((key, index[key]))

    for name in wanted:
        visit(name)
    return order


# -- the initramfs -----------------------------------------------------------------

# /init, run by the kernel as pid 1 from the initramfs.  Failing anywhere
# powers the guest off; the host then finds no exit status and says so.
INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /host /results /rw /newroot
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "@MARKER@ $(uname -r)"
die() { echo "jobworker-guest: $*" >&2; poweroff -f; sleep 10; }
for module in $(cat /modules.list); do
    insmod /modules/$module || die "insmod $module failed"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=@MSIZE@ host /host || die "cannot mount the host's / over 9p"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=@MSIZE@ results /results || die "cannot mount the results export"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot || die "cannot mount the overlay"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
# Pure v2: cgroup2 and nothing else.
mount -t cgroup2 -o nsdelegate cgroup2 $R/sys/fs/cgroup || die "cannot mount cgroup2"
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=0755 tmpfs $R/run
# The disk for io limits, on /srv: not /tmp or /var/tmp, which every job
# has a private tmpfs of.
mount -t ext4 /dev/vda $R/srv || die "cannot mount /dev/vda"
chmod 1777 $R/srv
mkdir -p $R@RESULTS@
mount --bind /results $R@RESULTS@
ip link set lo up
hostname jobworker-guest
chroot $R /bin/sh @RESULTS@/job.sh
echo "jobworker-guest: job script exited $?"
sync
umount $R@RESULTS@ /results
poweroff -f
sleep 10
"""


def init_script() -> str:
    return (
        INIT.replace("@MARKER@", INIT_MARKER).replace("@MSIZE@", str(MSIZE)).replace("@RESULTS@", RESULTS_IN_GUEST)
    )


def _newc_entry(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0), ino: int = 0) -> bytes:
    encoded = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0]
    header = b"070701" + b"".join(b"%08X" % field for field in fields)
    entry = header + encoded
    entry += b"\0" * (-len(entry) % 4)
    entry += data + b"\0" * (-len(data) % 4)
    return entry


def newc_archive(files: list[tuple[str, int, bytes]], devices: list[tuple[str, int, int]]) -> bytes:
    """
    A cpio archive in the kernel's initramfs format ("newc").

    @param files: C{(name, mode, data)}; a mode with C{S_IFDIR} is a directory.
    @param devices: C{(name, major, minor)} character devices.
    """
    parts = []
    ino = 1
    for name, mode, data in files:
        parts.append(_newc_entry(name, mode, data, ino=ino))
        ino += 1
    for name, major, minor in devices:
        parts.append(_newc_entry(name, 0o020600, rdev=(major, minor), ino=ino))
        ino += 1
    parts.append(_newc_entry("TRAILER!!!", 0))
    return b"".join(parts)


def ensure_initramfs(kernel: dict[str, str], cache: str) -> str:
    with open(BUSYBOX, "rb") as handle:
        busybox = handle.read()
    with open(kernel["modules_list"]) as handle:
        modules = handle.read().split()
    script = init_script().encode()
    digest = hashlib.sha256(script + hashlib.sha256(busybox).digest() + kernel["key"].encode())
    digest.update(" ".join(modules).encode())
    path = os.path.join(cache, f"initramfs-{digest.hexdigest()[:16]}.cpio.gz")
    if os.path.exists(path):
        os.utime(path)
        return path
    say(f"building {path}")
    directory = 0o040755
    files = [(name, directory, b"") for name in ("bin", "dev", "modules")]
    files.append(("init", 0o100755, script))
    files.append(("bin/busybox", 0o100755, busybox))
    files.append(("modules.list", 0o100644, "".join(f"{m}\n" for m in modules).encode()))
    for module in modules:
        with open(os.path.join(kernel["modules"], module), "rb") as handle:
            files.append((f"modules/{module}", 0o100644, handle.read()))
    # The kernel opens /dev/console for /init's output before devtmpfs is
    # mounted.
    archive = newc_archive(files, [("dev/console", 5, 1)])
    # Written aside and renamed: two runs building at once never read half
    # an archive.
    fd, temporary = tempfile.mkstemp(prefix=".initramfs-", dir=cache)
    with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as handle:
        handle.write(archive)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)
    prune(cache, "initramfs-", keep=os.path.basename(path))
    return path


# Seconds: a cache entry no run has used for this long is removed.  Not at
# once: another checkout (another branch's init script) may be booting it.
PRUNE_AGE = 86400


def prune(cache: str, prefix: str, keep: str) -> None:
    """
    Remove the cache's other entries named C{prefix*} unused for
    L{PRUNE_AGE}: built from an older kernel or init script, they would
    only take space.
    """
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        if name.startswith(prefix) and name != keep and time.time() - os.stat(path).st_mtime > PRUNE_AGE:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


def make_disk(path: str) -> None:
    with open(path, "wb") as handle:
        handle.truncate(DISK_MIB << 20)
    run_checked(["mkfs.ext4", "-q", "-F", "-L", "jobworker-io", path], timeout=120)


# -- booting -------------------------------------------------------------------------


def qemu_version() -> str:
    return run_checked(["qemu-system-x86_64", "--version"], timeout=30).splitlines()[0]


def kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def kvm_verdict_path(cache: str) -> str:
    key = hashlib.sha256(f"{os.uname().release} {qemu_version()}".encode()).hexdigest()[:16]
    return os.path.join(cache, f"kvm-{key}.hangs")


def qemu_command(accel: str, kernel: dict[str, str], initramfs: str, disk: str, results: str) -> list[str]:
    command = ["qemu-system-x86_64", "-nodefaults", "-no-reboot", "-display", "none", "-serial", "stdio"]
    if accel == "kvm":
        command += ["-accel", "kvm"]
    else:
        command += ["-accel", "tcg,thread=multi"]
    command += ["-smp", "2", "-m", str(GUEST_MEMORY_MIB)]
    command += ["-kernel", kernel["vmlinuz"], "-initrd", initramfs]
    # loglevel=4: warnings (OOM kills among them) reach the console, the
    # boot chatter does not.
    command += ["-append", "console=ttyS0 loglevel=4 panic=-1 rdinit=/init"]
    command += ["-drive", f"file={disk},if=virtio,format=raw,cache=unsafe"]
    command += ["-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"]
    command += ["-virtfs", f"local,path={results},mount_tag=results,security_model=none"]
    return command


class Boot:
    """
    One qemu process, its console copied to our stdout line by line.
    """

    def __init__(self, command: list[str]) -> None:
        self.started = threading.Event()
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._reader = threading.Thread(target=self._copy, daemon=True)
        self._reader.start()

    def _copy(self) -> None:
        # Chunks, not lines: pytest -q prints a dot per test with no newline.
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        marker = INIT_MARKER.encode()
        recent = b""
        while chunk := os.read(fd, 65536):
            if not self.started.is_set():
                recent = (recent + chunk)[-4 * len(marker) :]
                if marker in recent:
                    self.started.set()
            sys.stdout.buffer.write(chunk.replace(b"\r", b""))
            sys.stdout.flush()

    def booted(self, timeout: float) -> bool:
        """
        Wait until /init speaks (C{True}), qemu exits or C{timeout} seconds
        pass (C{False}).
        """
        deadline = time.monotonic() + timeout
        while not self.started.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                # Output already read may still hold the marker.
                self._reader.join(1)
                return self.started.is_set()
        return True

    def wait(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if self.process.returncode is not None:
                self._reader.join(5)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._reader.join(5)


def boot(accel: str, kernel: dict[str, str], initramfs: str, disk: str, results: str, cache: str, timeout: float) -> tuple[int | None, str]:
    """
    Boot the guest and wait for it to power off.

    @param accel: C{"auto"}, C{"kvm"} or C{"tcg"}.
    @return: qemu's exit status (C{None}: killed at the timeout), and the
        accelerator used.
    """
    deadline = time.monotonic() + timeout
    verdict = kvm_verdict_path(cache)
    fall_back = accel == "auto"
    if accel == "auto":
        if not kvm_usable():
            say("/dev/kvm cannot be opened: software emulation (TCG)")
            accel = "tcg"
        elif os.path.exists(verdict):
            say(f"KVM hung on this host before ({verdict}): software emulation (TCG)")
            accel = "tcg"
        else:
            accel = "kvm"
    say(f"booting with {accel}")
    began = time.monotonic()
    guest = Boot(qemu_command(accel, kernel, initramfs, disk, results))
    try:
        if accel == "kvm" and not guest.booted(KVM_PROBE_SECONDS):
            guest.kill()
            why = f"the guest did not reach /init {KVM_PROBE_SECONDS} s into a KVM boot (qemu exited {guest.process.returncode})"
            if not fall_back:
                raise GuestError(why)
            say(f"{why}: KVM does not work here; TCG instead")
            with open(verdict, "w") as handle:
                handle.write(f"{os.uname().release}\n{qemu_version()}\n")
            accel = "tcg"
            say("booting with tcg")
            began = time.monotonic()
            guest = Boot(qemu_command(accel, kernel, initramfs, disk, results))
        code = guest.wait(max(1.0, deadline - time.monotonic()))
    finally:
        # At the timeout, and when this command is interrupted or
        # terminated: no qemu outlives it.
        guest.kill()
    say(f"guest ran {time.monotonic() - began:.1f} s ({accel})")
    return code, accel


# -- the job inside -------------------------------------------------------------------


def job_script(pytest_args: list[str]) -> str:
    python = os.path.join(ROOT, ".venv", "bin", "python")
    results = RESULTS_IN_GUEST
    command = [python, "-m", "pytest", "-p", "no:cacheprovider", *pytest_args]
    command += ["--junitxml", f"{results}/junit.xml", "-o", "junit_logging=system-out"]
    return f"""set -u
export CI=true HOME=/root LANG=C.UTF-8 TERM=dumb
# jobcli in a fork of pytest, not a new interpreter (tests/support.py).
export JOBWORKER_TEST_JOBCLI=fork
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# A tmpfs on /tmp, unless that would hide the checkout (a clone in /tmp):
# then /tmp stays the overlay's (writable, in guest memory too) and
# temporary files go to a fresh directory on /run.
case {shlex.quote(ROOT + "/")} in
    /tmp/*) mkdir -p /run/tmp && chmod 1777 /run/tmp && export TMPDIR=/run/tmp ;;
    *) mount -t tmpfs -o mode=1777 tmpfs /tmp ;;
esac
cd {shlex.quote(ROOT)}
echo "guest kernel: $(uname -r)"
echo "guest cgroup.controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
echo "guest cgroup mounts: $(grep cgroup /proc/self/mounts | cut -d' ' -f1-3 | tr '\\n' ';')"
echo "guest io disk: $(grep ' /srv ' /proc/self/mounts | cut -d' ' -f1-3)"
began=$(date +%s)
{shlex.join(command)}
code=$?
echo "guest pytest exited $code in $(( $(date +%s) - began )) s"
echo $code > {results}/rc
"""


def figures(junit: str) -> list[str]:
    """
    The measurement lines (C{figure: [LAYOUT] WHAT: RESULT}) the tests
    printed, from a junit XML written with C{-o junit_logging=system-out}.
    """
    try:
        tree = ElementTree.parse(junit)
    except (OSError, ElementTree.ParseError):
        return []
    lines = []
    for case in tree.iter("testcase"):
        for out in case.iter("system-out"):
            for line in (out.text or "").splitlines():
                if line.startswith("figure:"):
                    lines.append(line)
    return lines


_FIGURE = re.compile(r"figure: \[(?P<layout>[^]]+)\] (?P<what>.+?): (?P<result>.*)")


def figure_table(junits: list[str]) -> str:
    """
    The figures of several runs (the host's, the guest's) side by side: one
    row per measurement, one column per cgroup layout.
    """
    rows: dict[str, dict[str, str]] = {}
    layouts: list[str] = []
    for junit in junits:
        for line in figures(junit):
            match = _FIGURE.fullmatch(line)
            if match is None:
                continue
            layout = match["layout"]
            if layout not in layouts:
                layouts.append(layout)
            rows.setdefault(match["what"], {})[layout] = match["result"]
    if not rows:
        return "(no figures)"
    out = ["| measure | " + " | ".join(layouts) + " |", "|---" * (len(layouts) + 1) + "|"]
    for what, results in rows.items():
        out.append(f"| {what} | " + " | ".join(results.get(layout, "") for layout in layouts) + " |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="guest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds for the whole guest run")
    parser.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (disk, junit XML)")
    parser.add_argument("--junit", metavar="PATH", help="copy the guest's junit XML here")
    parser.add_argument(
        "--table", nargs="+", metavar="JUNIT", help="only print the figures of these junit XML files side by side"
    )
    options, pytest_args = parser.parse_known_args(argv)
    if options.table:
        print(figure_table(options.table))
        return 0
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    if not pytest_args:
        # --durations: where the guest's time goes, for keeping CI short.
        pytest_args = ["-q", "--durations=30", *GUEST_SUITE]
        for node in GUEST_DESELECT:
            pytest_args += ["--deselect", node]
    if not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")):
        say("no .venv in the checkout: run `python3 dev.py guest` (it makes one)")
        return 3
    began = time.monotonic()
    # SIGTERM (a CI runner giving up) unwinds like Ctrl-C, so the finally
    # clauses kill qemu and remove the run's directory.
    signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))
    run_directory = tempfile.mkdtemp(prefix="jobworker-guest-")
    try:
        apt = Apt()
        ensure_tools(apt)
        cache = cache_directory()
        # One run at a time fills the cache; the others wait (bounded by
        # apt's timeouts in the run holding the lock).
        with open(os.path.join(cache, ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            kernel = ensure_kernel(apt, cache)
            initramfs = ensure_initramfs(kernel, cache)
        disk = os.path.join(run_directory, "disk.raw")
        make_disk(disk)
        results = os.path.join(run_directory, "results")
        os.mkdir(results)
        with open(os.path.join(results, "job.sh"), "w") as handle:
            handle.write(job_script(pytest_args))
        say(f"kernel {kernel['key']}, ready in {time.monotonic() - began:.1f} s")
        remaining = options.timeout - (time.monotonic() - began)
        code, accel = boot(options.accel, kernel, initramfs, disk, results, cache, remaining)
        if code is None:
            say(f"the guest ran past {options.timeout:g} s and was killed")
            return 124
        try:
            with open(os.path.join(results, "rc")) as handle:
                status = int(handle.read().strip())
        except (OSError, ValueError):
            say(f"qemu exited {code} and the guest left no pytest exit status")
            return 3
        junit = os.path.join(results, "junit.xml")
        if options.junit and os.path.exists(junit):
            shutil.copy(junit, options.junit)
        lines = figures(junit)
        if lines:
            say("measurements:")
            for line in lines:
                print(f"  {line}")
        say(f"pytest in the guest exited {status}; {time.monotonic() - began:.1f} s in all")
        return status
    except GuestError as e:
        say(f"cannot run the guest: {e}")
        return 3
    finally:
        if options.keep:
            say(f"kept {run_directory}")
        else:
            shutil.rmtree(run_directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
