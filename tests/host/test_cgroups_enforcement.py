"""
The cgroup drivers on the real kernel, as root: each test runs a process
in a job cgroup and measures what the kernel did to it (CPU share, an OOM
kill, bytes per second, refused forks, no survivor), not what files say.

The test ids name the driver: C{[v1]} or C{[v2]} is the one L{detect} picks
on this host, and runs every test.  On a hybrid host, C{[v2-hybrid]} runs the
v2 driver on the controller-less unified mount for what needs no controller
(kill, remove, cleanup); wherever v2 is mounted, C{[v2-freeze-kill]} runs the
v2 driver with its pre-5.14 kill path (freeze, kill each, thaw).  Run with
C{-s} to see the measurements.

Processes join the job the way the isolation helper does: the child writes
its pid into every C{procs_files} entry before exec.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import time

import pytest

from jobworker.host.cgroups import CgroupDriver, CgroupV2Driver, JobCgroup, detect
from jobworker.host.cgroups._host import read_keyed
from jobworker.limits import Limits
from tests.support import backing_disk, need, need_root

# Per test run, so two runs on one machine never clean up each other's jobs.
PREFIX = f"jobworker-test-{os.getpid()}"


def _layouts() -> tuple[list[str], list[str]]:
    """
    The driver layouts this host offers: those that enforce limits, and
    all of them.
    """
    try:
        detected = detect(prefix=PREFIX)
        v2 = detect(prefix=PREFIX, version="v2")
    except Exception:
        return ["none"], ["none"]
    if detected is None:
        return ["none"], ["none"]
    everything = [detected.name]
    if detected.name == "v1" and v2 is not None:
        everything.append("v2-hybrid")
    if v2 is not None:
        everything.append("v2-freeze-kill")
    return [detected.name], everything


LIMIT_LAYOUTS, ALL_LAYOUTS = _layouts()


def make_driver(layout: str) -> CgroupDriver:
    need_root()
    need(layout != "none", "no usable cgroup hierarchy on this host")
    if layout in ("v1", "v2"):
        driver = detect(prefix=PREFIX)
    else:
        driver = detect(prefix=PREFIX, version="v2")
        if layout == "v2-freeze-kill":
            assert isinstance(driver, CgroupV2Driver)
            driver = CgroupV2Driver(
                driver.own, prefix=PREFIX, devices=driver.io_devices, use_cgroup_kill=False
            )
    assert driver is not None
    driver.prepare()
    # For figure(): the layout is the test id's, which says more than the
    # driver's name ("v2-freeze-kill").
    driver.test_layout = layout
    print(f"\n[{layout}] {driver!r}")
    return driver


def figure(driver: CgroupDriver, text: str) -> None:
    """
    Print one measurement as a C{figure:} line, tagged with the layout
    (C{.ci/guest.py} and C{.ci/run} quote these lines at the end).
    """
    print(f"figure: [{driver.test_layout}] driver {text}")


def _prepared(layout: str):
    driver = make_driver(layout)
    try:
        yield driver
    finally:
        driver.cleanup_stale()
        driver.release()


@pytest.fixture(params=LIMIT_LAYOUTS)
def driver(request: pytest.FixtureRequest):
    """
    The driver this host would use, for the tests of limits.
    """
    yield from _prepared(request.param)


@pytest.fixture(params=ALL_LAYOUTS)
def any_driver(request: pytest.FixtureRequest):
    """
    Every driver this host can run, for the tests that need no controller.
    """
    yield from _prepared(request.param)


def start(cgroup: JobCgroup, argv: list[str], **kwargs) -> subprocess.Popen:
    """
    Start C{argv} inside C{cgroup}, joined before exec.
    """
    files = cgroup.procs_files

    def join() -> None:
        pid = str(os.getpid()).encode()
        for path in files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)

    return subprocess.Popen(argv, preexec_fn=join, **kwargs)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def alive(pid: int) -> bool:
    """
    Whether C{pid} runs (a zombie waiting for its parent does not).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def directories(cgroup: JobCgroup) -> list[str]:
    return [os.path.dirname(path) for path in cgroup.procs_files]


def pressure(cgroup: JobCgroup, resource: str) -> str:
    """
    For a figure: the time the job's tasks stalled on C{resource} ("some"
    in C{<resource>.pressure}, cgroup v2's PSI), or nothing where there is
    no such file (v1).
    """
    directory = next(iter(cgroup.controller_dirs.values()))
    try:
        with open(os.path.join(directory, f"{resource}.pressure")) as f:
            some = f.readline().split()
    except OSError:
        return ""
    total = int(dict(item.split("=") for item in some[1:])["total"])
    return f"; PSI {resource} some {total / 1e6:.2f} s"


def test_cpu_limit(driver):
    need("cpu" in driver.controllers, f"no cpu controller ({driver.name})")
    need("cpu_usec" in driver.usage_supported(), f"no CPU accounting ({driver.name})")
    cgroup = driver.create("cpu", Limits(cpu_millicores=200))
    began = time.monotonic()
    process = start(
        cgroup, python("import time\nend = time.monotonic() + 3\nwhile time.monotonic() < end:\n    pass")
    )
    assert process.wait(timeout=30) == 0
    wall = time.monotonic() - began
    usage = cgroup.usage()
    stat = read_keyed(os.path.join(cgroup.controller_dirs["cpu"], "cpu.stat"))
    throttled_usec = stat.get("throttled_usec", stat.get("throttled_time", 0) // 1000)
    share = usage.cpu_usec / 1e6 / wall
    figure(
        driver,
        f"cpu 200 millicores: {usage.cpu_usec / 1e6:.3f} s CPU in {wall:.3f} s = {share:.3f} of a core; "
        f"throttled {stat['nr_throttled']} of {stat['nr_periods']} periods, {throttled_usec / 1e6:.3f} s"
        f"{pressure(cgroup, 'cpu')}",
    )
    assert 0.1 <= share <= 0.3
    assert stat["nr_throttled"] > 0 and throttled_usec > 0
    cgroup.remove()


def test_memory_limit_oom_kills(driver):
    need("memory" in driver.controllers, f"no memory controller ({driver.name})")
    cgroup = driver.create("memory", Limits(memory_bytes=64 << 20))
    # bytes * n writes every page, so each MiB is really charged.
    code = "chunks = []\nfor _ in range(512):\n    chunks.append(b'x' * (1 << 20))\nprint('survived 512 MiB')"
    process = start(cgroup, python(code), stdout=subprocess.PIPE, text=True)
    out, _ = process.communicate(timeout=30)
    usage = cgroup.usage()
    figure(
        driver,
        f"memory 64 MiB: exit {process.returncode}, peak {usage.memory_peak_bytes / 2**20:.1f} MiB, "
        f"oom_killed {usage.oom_killed}{pressure(cgroup, 'memory')}",
    )
    assert process.returncode == -9, out
    assert usage.oom_killed
    assert usage.memory_peak_bytes <= 64 << 20
    cgroup.remove()


def test_io_write_limit(driver):
    need("io" in driver.controllers, f"no io controller ({driver.name})")
    # /srv: the guest's virtio disk (.ci/guest.py); /var/tmp: on most hosts.
    candidates = ["/srv", "/var/tmp", os.path.dirname(os.path.abspath(__file__))]
    found = [(d, backing_disk(d)) for d in candidates if os.path.isdir(d)]
    found = [(d, disk) for d, disk in found if disk is not None]
    need(bool(found), f"none of {candidates} is on a block device")
    directory, disk = found[0]
    throttled = [device.name for device in driver.io_devices]
    # A disk the driver skips would make the limit a no-op for the job.
    assert disk in throttled, f"{directory} is on {disk}, which the driver does not throttle ({throttled})"
    cgroup = driver.create("io", Limits(io_write_bps=5 << 20))
    fd, target = tempfile.mkstemp(dir=directory, prefix="jobworker-io-test-")
    os.close(fd)
    try:
        began = time.monotonic()
        # Direct I/O: v1 cannot throttle buffered writes (see v1.py).
        process = start(
            cgroup,
            ["dd", "if=/dev/zero", f"of={target}", "bs=1M", "count=20", "oflag=direct"],
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = process.communicate(timeout=60)
        elapsed = time.monotonic() - began
    finally:
        os.unlink(target)
    usage = cgroup.usage()
    figure(
        driver,
        f"io write 5 MiB/s on {disk}: 20 MiB direct in {elapsed:.2f} s = {20 / elapsed:.2f} MiB/s; "
        f"usage says {usage.io_write_bytes / 2**20:.1f} MiB written{pressure(cgroup, 'io')}",
    )
    assert process.returncode == 0, err
    assert 2.5 <= elapsed <= 7
    assert usage.io_write_bytes >= 20 << 20
    cgroup.remove()


def test_pids_limit(driver):
    need("pids" in driver.controllers, f"no pids controller ({driver.name})")
    cgroup = driver.create("pids", Limits(pids=20))
    code = """
import os, time
alive = 0
refused = []
for _ in range(100):
    try:
        pid = os.fork()
    except OSError as e:
        refused.append(e.errno)
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    alive += 1
print(alive, len(refused), ",".join(sorted(set(map(str, refused)))), flush=True)
time.sleep(60)
"""
    process = start(cgroup, python(code), stdout=subprocess.PIPE, text=True)
    try:
        children, refused, errnos = process.stdout.readline().split()
        inside = cgroup.pids()
        usage = cgroup.usage()
    finally:
        cgroup.kill()
        process.wait(timeout=10)
    figure(
        driver,
        f"pids 20: {children} children forked, {refused} forks refused (errno {errnos}), {len(inside)} processes in the cgroup, peak {usage.pids_peak}"
    )
    assert int(refused) > 0 and errnos == str(errno.EAGAIN)
    assert int(children) + 1 <= 20
    assert len(inside) <= 20 and usage.pids_peak <= 20
    # The limit is the job's: this process can still start more than 20.
    others = [subprocess.Popen(["sleep", "10"]) for _ in range(25)]
    for other in others:
        other.kill()
        other.wait()
    cgroup.remove()


# A job that daemonizes: the double fork and setsid() take the daemon out
# of the job's process group and session, and both ignore SIGTERM.  Each
# says who it is in one write(2), in whatever order they get there.
DAEMON = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.write(1, b"daemon %d\\n" % os.getpid())
        time.sleep(120)
    os._exit(0)
os.wait()
os.write(1, b"parent %d\\n" % os.getpid())
time.sleep(120)
"""


def start_daemon(cgroup: JobCgroup) -> tuple[subprocess.Popen, int, int]:
    """
    Start L{DAEMON} in C{cgroup}.

    @return: the process, the daemon's pid, the parent's pid.
    """
    process = start(cgroup, python(DAEMON), stdout=subprocess.PIPE, text=True, start_new_session=True)
    said = dict(process.stdout.readline().split() for _ in range(2))
    return process, int(said["daemon"]), int(said["parent"])


def test_prime_moves_leaves_the_service_where_it_was(any_driver):
    """
    The kernel takes the move of the service into its own cgroup (see
    CgroupDriver.prime_moves) and changes nothing.
    """
    before = open("/proc/self/cgroup").read()
    any_driver.prime_moves()
    assert open("/proc/self/cgroup").read() == before


def test_kill_reaches_a_daemon(any_driver):
    cgroup = any_driver.create("kill", Limits())
    process, daemon, parent = start_daemon(cgroup)
    assert os.getsid(daemon) != os.getsid(parent), "the daemon did not leave the session"
    assert sorted(cgroup.pids()) == sorted([daemon, parent])
    # What a job manager without cgroups would try: both ignore it.
    os.killpg(parent, 15)
    time.sleep(0.1)
    assert alive(daemon) and alive(parent)
    began = time.monotonic()
    cgroup.kill()
    killed = time.monotonic() - began
    cgroup.remove()
    process.wait(timeout=5)
    # The daemon's parent is init, which reaps it in its own time.
    deadline = time.monotonic() + 5
    while alive(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    figure(any_driver, f"kill: daemon {daemon} and parent {parent} gone, kill() took {killed * 1000:.1f} ms")
    assert not alive(daemon) and not alive(parent)
    assert not any(os.path.exists(d) for d in directories(cgroup))


def test_remove_leaves_nothing(any_driver):
    cgroup = any_driver.create("remove", Limits())
    first = start(cgroup, ["sleep", "60"])
    # A nested cgroup with a process of its own: remove() must go down.
    nested = [os.path.join(d, "inner") for d in directories(cgroup)]
    for directory in nested:
        os.mkdir(directory)
    second = start(cgroup, ["sleep", "60"])
    for directory in nested:
        with open(os.path.join(directory, "cgroup.procs"), "w") as f:
            f.write(str(second.pid))
    assert sorted(cgroup.pids()) == sorted([first.pid, second.pid])
    cgroup.remove()
    assert first.wait(timeout=5) == -9 and second.wait(timeout=5) == -9
    assert not any(os.path.exists(d) for d in directories(cgroup))
    cgroup.remove()
    assert cgroup.pids() == []
    figure(
        any_driver,
        f"remove: 2 processes in a job cgroup and its nested child gone, no directory left in {len(directories(cgroup))} hierarchies"
    )


def test_cleanup_stale_after_a_crash(any_driver, request):
    cgroup = any_driver.create("stale", Limits())
    process, daemon, _ = start_daemon(cgroup)
    # The server that made it "crashed"; a new one starts.
    restarted = make_driver(request.node.callspec.params["any_driver"])
    removed = restarted.cleanup_stale()
    process.wait(timeout=5)
    deadline = time.monotonic() + 5
    while alive(daemon) and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"cleanup_stale: removed {removed}")
    assert removed == ["job-stale"]
    assert not alive(daemon) and process.returncode == -9
    assert not any(os.path.exists(d) for d in directories(cgroup))
