"""
Limits and isolation through the whole service: jobcli -> server -> cgroup
driver -> isolation helper -> the job.  Real, as root; these fail on CI when
they cannot run.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time

import pytest

from tests.support import need, need_root, start_server


# A place for test directories outside /tmp, which a job has its own of.
OUTSIDE_TMP = "/srv" if os.path.isdir("/srv") else "/var/lib"


def _driver():
    from jobworker.cgroups import detect

    return detect()


@pytest.fixture(scope="module")
def driver():
    need_root()
    found = _driver()
    need(found is not None, "no usable cgroup hierarchy")
    print(f"cgroup driver: {found.name}, controllers: {sorted(found.controllers)}")
    return found


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
    wall = final["ended_at"] - final["started_at"]
    share = final["usage"]["cpu_usec"] / 1e6 / wall
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
    assert ok <= 19 and failed >= 40, (ok, failed)
    assert server.alive()


def test_stop_kills_the_whole_job_and_removes_its_cgroup(server, driver):
    marker = "1000.31337"
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
    marker = "1000.2718"
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
