"""
Limits and isolation through the whole service: jobcli -> server -> cgroup
driver -> isolation helper -> the job.  Real, as root; these fail on CI when
they cannot run.

The limit tests take the C{driver} fixture, whose id is the host's cgroup
layout: C{[v1]} (v1 or hybrid) or C{[v2]} (pure v2; C{.ci/guest.py} boots
one).  Each prints one C{figure:} line with what it measured, which
C{.ci/guest.py} and C{.ci/run} quote at the end of a run.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
import tempfile
import time

import pytest

from jobworker.limits import Limits
from tests.support import backing_disk, cgroup_layout, need, need_root, start_server

# A place for test directories outside /tmp, which a job has its own of.
# In the guest (.ci/guest.py), /srv is its virtio disk.
OUTSIDE_TMP = "/srv" if os.path.isdir("/srv") else "/var/lib"


@pytest.fixture(scope="module", params=[cgroup_layout()])
def driver(request):
    """
    The cgroup driver the server picks on this host (not prepared: the
    server does that), for its name and controllers.
    """
    from jobworker.host.cgroups import detect

    need_root()
    need(request.param != "none", "no usable cgroup hierarchy")
    found = detect()
    assert found is not None and found.name == request.param
    print(f"cgroup driver: {found.name}, controllers: {sorted(found.controllers)}")
    return found


def figure(driver, text: str) -> None:
    """
    Print one measurement, tagged with the layout it was made on.
    """
    print(f"figure: [{driver.name}] e2e {text}")


def status(server, job_id: str) -> dict:
    return json.loads(server.jobcli("status", "--json", job_id, check=True).stdout)


def start(server, *args: str, identity: str = "admin") -> str:
    result = server.jobcli("start", *args, identity=identity)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


def job_cgroup_dirs(job_id: str) -> list[str]:
    return glob.glob(f"/sys/fs/cgroup/**/job-{job_id}", recursive=True)


def test_memory_limit_ends_in_oom(server, driver):
    need("memory" in driver.controllers, "no memory controller")
    job_id = start(server, "--memory", "64M", "--", "python3", "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))")
    assert server.jobcli("wait", job_id).returncode == 128 + 9
    final = status(server, job_id)
    figure(driver, f"--memory 64M: state {final['state']}, peak {final['usage']['memory_peak_bytes'] / 2**20:.1f} MiB")
    assert final["state"] == "oom", final
    assert final["usage"]["memory_peak_bytes"] >= 60 << 20
    assert server.alive()
    assert server.jobcli("run", "--", "true").returncode == 0


def test_cpu_limit_throttles(server, driver):
    need("cpu" in driver.controllers, "no cpu controller")
    job_id = start(server, "--cpu", "0.2", "--timeout", "3s", "--", "sh", "-c", "while :; do :; done")
    server.jobcli("wait", job_id)
    final = status(server, job_id)
    assert final["state"] == "timeout"
    # From creation, not start: the job's cgroup, and its limit, hold the
    # isolation helper too while it sets up (under emulation, a good part
    # of a second), and its CPU time is in the usage.
    wall = final["ended_at"] - final["created_at"]
    share = final["usage"]["cpu_usec"] / 1e6 / wall
    figure(driver, f"--cpu 0.2: {share:.3f} of a core over {wall:.2f} s")
    assert 0.08 < share < 0.32, f"busy loop under --cpu 0.2 got {share:.2f} of a core"


def test_pids_limit_refuses_forks(server, driver):
    need("pids" in driver.controllers, "no pids controller")
    script = (
        "import os, time\n"
        "ok = failed = 0\n"
        "for _ in range(60):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(3); os._exit(0)\n"
        "        ok += 1\n"
        "    except OSError:\n"
        "        failed += 1\n"
        "print(ok, failed)\n"
    )
    result = server.jobcli("run", "--pids", "20", "--", "python3", "-c", script)
    assert result.returncode == 0, result.stderr
    ok, failed = map(int, result.stdout.split())
    figure(driver, f"--pids 20: {ok} forks, {failed} refused")
    assert ok <= 19 and failed >= 40, (ok, failed)
    assert server.alive()


# -- io ------------------------------------------------------------------------

IO_MIB = 20


@pytest.fixture
def io_file(driver):
    """
    A path for a job's file on a block device the server throttles, outside
    the job's private /tmp and /var/tmp (tmpfs): in a directory of
    L{OUTSIDE_TMP} that any job user may write, removed afterwards.
    """
    disk = backing_disk(OUTSIDE_TMP)
    need(disk is not None, f"{OUTSIDE_TMP} is on no block device")
    throttled = [device.name for device in driver.io_devices]
    assert disk in throttled, f"{OUTSIDE_TMP} is on {disk}, which the driver does not throttle ({throttled})"
    directory = tempfile.mkdtemp(prefix="jobworker-e2e-io-", dir=OUTSIDE_TMP)
    os.chmod(directory, 0o1777)
    try:
        yield os.path.join(directory, "data")
    finally:
        shutil.rmtree(directory)


# A job with a uid of its own sees the host's file system read-only; one run
# as a named user may write where that user may (the io file's directory).
WRITER = ["--user", "nobody"]


def run_dd(server, limit: list[str], operands: str) -> float:
    """
    Run C{dd OPERANDS} as a job under C{limit} (jobcli options) and return
    the seconds dd reports for the copy itself (not the job's start-up).
    """
    result = server.jobcli("run", *limit, "--", "sh", "-c", f"dd {operands} 2>&1", timeout=120)
    assert result.returncode == 0, (result.stdout, result.stderr)
    # "20971520 bytes (21 MB, 20 MiB) copied, 4.00154 s, 5.2 MB/s"
    report = result.stdout.decode().strip().splitlines()[-1]
    return float(report.split(" copied, ")[1].split(" s")[0])


def test_io_write_limit(server, driver, io_file):
    need("io" in driver.controllers, "no io controller")
    seconds = run_dd(server, [*WRITER, "--io-write-bps", "5M"], f"if=/dev/zero of={io_file} bs=1M count={IO_MIB} oflag=direct")
    figure(driver, f"--io-write-bps 5M: {IO_MIB} MiB direct in {seconds:.2f} s = {IO_MIB / seconds:.2f} MiB/s")
    assert 2.5 <= seconds <= 7


def test_io_read_limit(server, driver, io_file):
    need("io" in driver.controllers, "no io controller")
    with open(io_file, "wb") as handle:
        handle.write(os.urandom(IO_MIB << 20))
        os.fsync(handle.fileno())
    os.chmod(io_file, 0o644)
    seconds = run_dd(server, ["--io-read-bps", "5M"], f"if={io_file} of=/dev/null bs=1M iflag=direct")
    figure(driver, f"--io-read-bps 5M: {IO_MIB} MiB direct in {seconds:.2f} s = {IO_MIB / seconds:.2f} MiB/s")
    assert 2.5 <= seconds <= 7


BUFFERED_WRITE = """
import os, sys, time
began = time.monotonic()
with open(sys.argv[1], "wb") as handle:
    for _ in range(int(sys.argv[2])):
        handle.write(bytes(1 << 20))
written = time.monotonic()
os.sync()
print(f"{written - began:.3f} {time.monotonic() - began:.3f}")
"""


def test_io_write_limit_buffered(server, driver, io_file):
    """
    Buffered writes, left to the kernel's flusher threads (C{sync(2)}, not
    C{fsync}, which would write in the job's own context).  cgroup v2
    charges writeback to the cgroup that dirtied the pages, so C{io.max}
    holds for it too; v1 throttles only I/O a job issues itself, and its
    writeback runs outside every job, which this records without asserting.
    """
    need("io" in driver.controllers and "memory" in driver.controllers, "needs the io and memory controllers")
    result = server.jobcli(
        "run", *WRITER, "--io-write-bps", "5M", "--", "python3", "-c", BUFFERED_WRITE, io_file, str(IO_MIB), timeout=120
    )
    assert result.returncode == 0, result.stderr
    buffered, synced = map(float, result.stdout.split())
    figure(
        driver,
        f"--io-write-bps 5M buffered: {IO_MIB} MiB into the page cache in {buffered:.2f} s, "
        f"on disk after {synced:.2f} s = {IO_MIB / synced:.2f} MiB/s",
    )
    if driver.name == "v2":
        assert 2.5 <= synced <= 7


def test_stop_kills_the_whole_job_and_removes_its_cgroup(server, driver):
    marker = _unique_marker()
    script = f"trap '' TERM; (trap '' TERM; setsid sleep {marker} &) ; sleep {marker}"
    job_id = start(server, "--", "sh", "-c", script)
    deadline = time.monotonic() + 10
    while len(_processes_with(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_processes_with(marker)) == 2
    assert job_cgroup_dirs(job_id), "the running job has no cgroup"
    assert server.jobcli("stop", "--grace", "0.5", job_id).returncode == 0
    assert server.jobcli("wait", job_id).returncode == 128 + 9
    assert status(server, job_id)["state"] == "stopped"
    assert _processes_with(marker) == []
    deadline = time.monotonic() + 5
    while job_cgroup_dirs(job_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job_cgroup_dirs(job_id) == []
    figure(driver, "stop: setsid daemon ignoring TERM killed, 0 processes and 0 cgroup directories left")


def _unique_marker() -> str:
    """
    A C{sleep} argument no other test run on this host uses at the same
    time (test runs of other checkouts may run these tests beside us).
    """
    return f"1000.{os.getpid()}{secrets.randbelow(10**6):06d}"


def _processes_with(marker: str) -> list[int]:
    """
    The C{sleep MARKER} processes alive on the host.
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if handle.read().split(b"\0")[:2] == [b"sleep", marker.encode()]:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_usage_is_reported(server, driver):
    job_id = start(server, "--", "sh", "-c", "dd if=/dev/zero of=/dev/null bs=1M count=200 2>/dev/null; sleep 0.2")
    server.jobcli("wait", job_id)
    final = status(server, job_id)
    assert final["usage"]["cpu_usec"] > 0
    assert final["usage"]["memory_peak_bytes"] > 0
    assert final["usage"]["pids_peak"] >= 1


@pytest.fixture(scope="module")
def capped_server(certs, tmp_path_factory):
    need_root()
    running = start_server(certs, tmp_path_factory.mktemp("capped") / "state", "--max-memory", "100M", "--max-pids", "50")
    yield running
    running.stop()


def test_caps_bind_users_not_admins(capped_server, driver):
    refused = capped_server.jobcli("start", "--memory", "200M", "--", "true", identity="alice")
    assert refused.returncode == 1
    assert b"memory 200M is above the cap of 100M" in refused.stderr
    # Unset means the server default, which must itself respect the cap.
    allowed = capped_server.jobcli("run", "--memory", "50M", "--", "true", identity="alice")
    assert allowed.returncode == 0, allowed.stderr
    admin = capped_server.jobcli("run", "--memory", "200M", "--pids", "500", "--", "true", identity="admin")
    assert admin.returncode == 0, admin.stderr


@pytest.fixture(scope="module")
def no_cgroup_server(certs, tmp_path_factory):
    need_root()
    running = start_server(certs, tmp_path_factory.mktemp("nocg") / "state", "--cgroups", "none")
    yield running
    running.stop()


def test_unenforceable_limit_is_an_error(no_cgroup_server):
    result = no_cgroup_server.jobcli("start", "--memory", "64M", "--", "true")
    assert result.returncode == 1
    assert b"cannot enforce" in result.stderr
    assert no_cgroup_server.jobcli("run", "--", "true").returncode == 0


# -- isolation ------------------------------------------------------------------


def test_pid_namespace(server):
    need_root()
    result = server.jobcli("run", "--", "sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'")
    assert result.returncode == 0, result.stderr
    pid, count = map(int, result.stdout.split())
    assert pid < 10
    # init, sh, ls and grep at most.
    assert count <= 5


def test_mounts_do_not_reach_the_host(server):
    need_root()
    # Not under /tmp: a job has its own.
    target = tempfile.mkdtemp(prefix="jobworker-test-", dir=OUTSIDE_TMP)
    try:
        result = server.jobcli(
            "run", "--user", "root", "--", "sh", "-c", f"mount -t tmpfs jobworker-test-tmpfs {target} && grep -c jobworker-test-tmpfs /proc/self/mountinfo"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == b"1"
        with open("/proc/self/mountinfo") as handle:
            assert "jobworker-test-tmpfs" not in handle.read()
    finally:
        os.rmdir(target)


def test_network_is_loopback_only(server):
    need_root()
    probe = (
        "import socket, sys\n"
        "inside = socket.socket(); inside.bind(('127.0.0.1', 0)); inside.listen()\n"
        "socket.create_connection(inside.getsockname(), timeout=2).close()\n"
        "try:\n"
        f"    socket.create_connection(('127.0.0.1', {server.port}), timeout=2)\n"
        "    print('reached-host')\n"
        "except OSError as exc:\n"
        "    print('isolated', exc.errno)\n"
        "print(sorted(name for _, name in socket.if_nameindex()))\n"
    )
    result = server.jobcli("run", "--", "python3", "-c", probe)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("isolated")
    assert lines[1] == "['lo']"
    host = server.jobcli("run", "--network", "host", "--", "python3", "-c", probe)
    assert host.stdout.decode().splitlines()[0] == "reached-host"
    denied = server.jobcli("start", "--network", "host", "--", "true", identity="alice")
    assert denied.returncode == 1 and b"admin" in denied.stderr


def test_job_user(server):
    need_root()
    result = server.jobcli("run", "--", "sh", "-c", "id -u; id -g; id -G; grep NoNewPrivs /proc/self/status")
    assert result.returncode == 0, result.stderr
    uid, gid, groups, nnp = result.stdout.decode().splitlines()
    # A uid of its own, from the default range, its gid the same number,
    # no supplementary groups.
    assert 61184 <= int(uid) <= 65519
    assert gid == uid
    assert groups.split() == [uid]
    assert nnp.split() == ["NoNewPrivs:", "1"]
    assert server.jobcli("run", "--user", "root", "--", "id", "-u").stdout == b"0\n"
    denied = server.jobcli("start", "--user", "root", "--", "id", identity="alice")
    assert denied.returncode == 1


def test_background_grandchild_is_gone_when_the_job_ends(server):
    need_root()
    marker = _unique_marker()
    result = server.jobcli("run", "--", "sh", "-c", f"sleep {marker} & echo started")
    assert result.stdout == b"started\n"
    deadline = time.monotonic() + 5
    while _processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(marker) == []


def test_start_errors_are_synchronous(server):
    missing = server.jobcli("run", "--", "no-such-command-here")
    assert missing.returncode == 127
    assert b"No such file" in missing.stderr or b"not found" in missing.stderr
    assert b"Traceback" not in missing.stderr
    not_exec = server.jobcli("run", "--", "/etc/passwd")
    assert not_exec.returncode == 126
    bad_dir = server.jobcli("start", "--workdir", "/no/such/dir", "--", "true")
    assert bad_dir.returncode == 1 and b"/no/such/dir" in bad_dir.stderr


# -- delegation, as systemd does it ------------------------------------------------------


def _enable_controllers(directory: str) -> None:
    """
    Enable for C{directory}'s children every limit controller it has, as
    systemd does in the slice above a C{Delegate=yes} unit.
    """
    with open(os.path.join(directory, "cgroup.controllers")) as handle:
        offered = handle.read().split()
    for controller in ("cpu", "memory", "io", "pids"):
        if controller in offered:
            with open(os.path.join(directory, "cgroup.subtree_control"), "w") as handle:
                handle.write(f"+{controller}")


def _cgroup_dir_of(pid: int, unit_dirs: list[str]) -> list[str]:
    """
    The cgroup directories at or below C{unit_dirs} that hold C{pid}.
    """
    found = []
    for unit in unit_dirs:
        for directory, _, _ in os.walk(unit):
            with open(os.path.join(directory, "cgroup.procs")) as handle:
                if str(pid) in handle.read().split():
                    found.append(directory)
    return found


@pytest.fixture
def delegated_server(certs, tmp_path_factory, driver):
    """
    The server placed the way systemd places a unit with C{Delegate=yes}:
    in a cgroup of its own, C{<tests>/.../test.slice/jobworker.service},
    which is neither the root cgroup nor the tests' own.  On v2 the slice
    enables the controllers for the unit (as systemd does), and the server
    must move itself into a leaf before it can give its jobs any.

    @return: the server and the unit's cgroup directories (one on v2, one
        per hierarchy on v1).
    """
    from jobworker.host.cgroups import detect

    need_root()
    outer = detect(prefix=f"jobworker-test-slices-{os.getpid()}")
    outer.prepare()
    slice_cgroup = None
    try:
        slice_cgroup = outer.create("test.slice", Limits())
        slice_dirs = sorted({os.path.dirname(path) for path in slice_cgroup.procs_files})
        unit_dirs = [os.path.join(directory, "jobworker.service") for directory in slice_dirs]
        for directory in unit_dirs:
            os.mkdir(directory)
        if driver.name == "v2":
            (slice_dir,) = slice_dirs
            _enable_controllers(slice_dir)
        running = start_server(
            certs,
            tmp_path_factory.mktemp("delegated") / "state",
            cgroup_procs=[os.path.join(directory, "cgroup.procs") for directory in unit_dirs],
        )
        try:
            yield running, slice_dirs, unit_dirs
        finally:
            running.stop()
    finally:
        if slice_cgroup is not None:
            slice_cgroup.remove()
        outer.cleanup_stale()
        outer.release()


def test_limits_hold_in_a_delegated_subtree(delegated_server, driver, io_file):
    """
    The service in a delegated unit cgroup, not the root: it moves itself
    into a leaf (v2), makes its jobs below the unit and nowhere else, and
    cpu, memory, pids and io limits still hold there.
    """
    server, slice_dirs, unit_dirs = delegated_server
    # Once a job is answered, the service has started (twistd listens
    # before it starts the services, so accepting a connection is not
    # enough).
    cpu_job = start(server, "--cpu", "0.2", "--timeout", "3s", "--", "sh", "-c", "while :; do :; done")
    own = _cgroup_dir_of(server.process.pid, unit_dirs)
    assert own, f"the server left its unit {unit_dirs}"
    if driver.name == "v2":
        (unit,) = unit_dirs
        (leaf,) = own
        # The unit itself holds no process: the server moved to a leaf.
        assert leaf != unit and leaf.endswith("/service"), leaf
        with open(os.path.join(unit, "cgroup.procs")) as handle:
            assert handle.read() == ""
    job_dirs = job_cgroup_dirs(cpu_job)
    assert job_dirs and all(any(d.startswith(unit + "/") for unit in unit_dirs) for d in job_dirs), job_dirs
    memory_job = start(server, "--memory", "64M", "--", "python3", "-c", "b = []\nwhile True: b.append(bytearray(1 << 20))")
    forks = server.jobcli(
        "run", "--pids", "20", "--", "python3", "-c",
        "import os, time\nok = failed = 0\nfor _ in range(60):\n    try:\n        if os.fork() == 0:\n"
        "            time.sleep(3); os._exit(0)\n        ok += 1\n    except OSError:\n        failed += 1\nprint(ok, failed)\n",
    )
    assert forks.returncode == 0, forks.stderr
    ok, failed = map(int, forks.stdout.split())
    server.jobcli("wait", cpu_job)
    server.jobcli("wait", memory_job)
    cpu = status(server, cpu_job)
    share = cpu["usage"]["cpu_usec"] / 1e6 / (cpu["ended_at"] - cpu["created_at"])
    memory = status(server, memory_job)
    io = ""
    if "io" in driver.controllers:
        seconds = run_dd(server, [*WRITER, "--io-write-bps", "5M"], f"if=/dev/zero of={io_file} bs=1M count={IO_MIB} oflag=direct")
        io = f", io-write 5M {IO_MIB / seconds:.2f} MiB/s"
    figure(
        driver,
        "delegated: "
        f"server in {os.path.relpath(own[0], os.path.dirname(slice_dirs[0]))}; cpu 0.2 -> {share:.3f}, memory 64M -> {memory['state']} at {memory['usage']['memory_peak_bytes'] / 2**20:.1f} MiB, "
        f"pids 20 -> {ok} forks, {failed} refused{io}",
    )
    assert 0.08 < share < 0.32, share
    assert memory["state"] == "oom", memory
    assert ok <= 19 and failed >= 40, (ok, failed)
    if io:
        assert 2.5 <= seconds <= 7
    # Nothing beside the unit in the slice, no job cgroup left in the unit.
    for directory in slice_dirs:
        assert [e.name for e in os.scandir(directory) if e.is_dir()] == ["jobworker.service"]
    deadline = time.monotonic() + 5
    while (job_cgroup_dirs(cpu_job) or job_cgroup_dirs(memory_job)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job_cgroup_dirs(cpu_job) == job_cgroup_dirs(memory_job) == []
