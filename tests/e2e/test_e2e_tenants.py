"""
Tenants cannot touch each other (issue 11), through the whole service, for
real, as root: private /tmp, /var/tmp and /dev/shm; a uid per job; the
job's own /sys; the server's state and key out of reach; caps by default;
nothing left behind.  These fail on CI when they cannot run.

Nothing here depends on the cgroup layout (v1 or v2): the memory limit is
observed through the job's final state, the rest through what a job can do.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from jobworker.errors import ErrorCode, RequestError
from jobworker.limits import Limits, host_caps
from jobworker.protocol import messages as m
from tests.support import need, need_root, start_server

SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")


# A place for test directories outside /tmp, which a job has its own of.
OUTSIDE_TMP = "/srv" if os.path.isdir("/srv") else "/var/lib"


def marker() -> str:
    return f"jw-{uuid.uuid4().hex[:12]}"


def own_uid_range(slot: int, size: int) -> tuple[int, int]:
    """
    A uid range of C{size} (at most 100) for the test server in C{slot},
    outside the default range and unlike those of other test processes, so
    that no two servers of concurrent test runs hand out the same uid.
    Above 65535: 32-bit uids are ordinary on Linux.
    """
    assert 0 < size <= 100
    first = 200_000 + (os.getpid() % 5000) * 1000 + slot * 100
    return first, first + size - 1


def start(server, argv: list[str], identity: str = "admin", **options) -> uuid.UUID:
    with closing(server.client(identity)) as client:
        return client.start(argv, **options)


def status(server, job_id: uuid.UUID) -> m.JobStatus:
    with closing(server.client("admin")) as client:
        return client.status(job_id)


def wait(server, job_id: uuid.UUID) -> m.JobStatus:
    with closing(server.client("admin")) as client:
        return client.wait(job_id)


def stop(server, job_id: uuid.UUID) -> m.JobStatus:
    with closing(server.client("admin")) as client:
        client.stop(job_id, grace_ms=0, force=True)
        return client.wait(job_id)


def output(server, job_id: uuid.UUID) -> tuple[bytes, bytes]:
    """
    The job's stdout and stderr so far.
    """
    parts = {1: b"", 2: b""}
    with closing(server.client("admin")) as client:
        for message in client.follow(job_id, follow=False):
            if isinstance(message, m.Output):
                parts[message.fd] += message.data
    return parts[1], parts[2]


def run(server, argv: list[str], identity: str = "admin", **options) -> tuple[m.JobStatus, bytes, bytes]:
    job_id = start(server, argv, identity, **options)
    final = wait(server, job_id)
    out, err = output(server, job_id)
    return final, out, err


def wait_output(server, job_id: uuid.UUID, lines: int, timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        out, err = output(server, job_id)
        found = out.decode().splitlines()
        if len(found) >= lines:
            return found
        if time.monotonic() > deadline or status(server, job_id).state.is_final:
            raise AssertionError(f"job {job_id} printed {out!r} {err!r}, not {lines} lines")
        time.sleep(0.05)


def host_pids_with(argument: str) -> list[int]:
    """
    Live processes on the host with C{argument} in their command line.
    """
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if argument.encode() in handle.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found


def host_mounts() -> list[tuple[str, str]]:
    """
    (mount point, filesystem type) of every mount of the test's namespace.
    """
    with open("/proc/self/mountinfo") as handle:
        rows = [line.split(" - ")[0].split()[4:5] + line.split(" - ")[1].split()[:1] for line in handle]
    return [(point, fstype) for point, fstype in rows]


def shmem_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Shmem in /proc/meminfo")


@pytest.fixture(scope="module")
def tenants(certs, tmp_path_factory):
    """
    A server with its own uid range and 16 MiB scratch mounts.
    """
    need_root()
    need(os.path.exists("/proc/self/ns/ipc"), "needs IPC namespaces")
    first, last = own_uid_range(0, 100)
    running = start_server(
        certs, tmp_path_factory.mktemp("tenants") / "state", "--job-uids", f"{first}-{last}", "--tmp-size", "16M"
    )
    yield running
    running.stop()


# -- private scratch space, a uid each, no signals ------------------------------


PROBE = r"""
import errno, os, sys
pid, name = int(sys.argv[1]), sys.argv[2]
seen = [d for d in ("/tmp", "/var/tmp", "/dev/shm") if os.path.exists(os.path.join(d, name))]
print("seen", ",".join(seen) or "-")
print("uid", os.getuid())
for signum in (0, 9):
    try:
        os.kill(pid, signum)
        print(f"kill{signum}", "ok")
    except OSError as e:
        print(f"kill{signum}", errno.errorcode[e.errno])
"""


def as_uid(uid: int, action) -> object:
    """
    Run C{action()} in a child process on the host running as C{uid} (no
    namespaces): what a job's uid may do, whatever its namespaces.
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = action()
        except BaseException as exc:
            result = f"error {exc!r}"
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        data = reader.read()
    os.waitpid(child, 0)
    return json.loads(data)


def try_kill(pid: int) -> str:
    try:
        os.kill(pid, signal.SIGKILL)
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]  # type: ignore[index]  # kill(2) failed: errno is set


def try_ptrace(pid: int) -> str:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PTRACE_ATTACH, PTRACE_DETACH = 16, 17
    if libc.ptrace(PTRACE_ATTACH, pid, None, None) == 0:
        libc.ptrace(PTRACE_DETACH, pid, None, None)
        return "ok"
    return errno.errorcode[ctypes.get_errno()]


def try_read(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            handle.read()
        return "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]  # type: ignore[index]  # kill(2) failed: errno is set


def test_two_owners_jobs_cannot_see_or_signal_each_other(tenants):
    name = marker()
    sleeper = f"1000.{int(name[3:9], 16)}"
    writer = (
        f"for d in /tmp /var/tmp /dev/shm; do echo secret > $d/{name} || exit 1; done; "
        f"ls /tmp/{name} /var/tmp/{name} /dev/shm/{name} | wc -l; id -u; exec sleep {sleeper}"
    )
    alice = start(tenants, ["sh", "-c", writer], "alice")
    try:
        count, alice_uid = wait_output(tenants, alice, 2)
        assert count.strip() == "3"  # she sees her own three files
        assert status(tenants, alice).uid == int(alice_uid)
        pids = host_pids_with(sleeper)
        assert len(pids) == 1, pids
        alice_pid = pids[0]
        # Nor does the host see them.
        for directory in SCRATCH:
            assert not os.path.exists(os.path.join(directory, name))

        final, out, err = run(tenants, ["python3", "-c", PROBE, str(alice_pid), name], "bob")
        assert final.state is m.JobState.EXITED, (final, err)
        lines = dict(line.split(" ", 1) for line in out.decode().splitlines())
        assert lines["seen"] == "-"
        bob_uid = int(lines["uid"])
        assert final.uid == bob_uid
        assert bob_uid != int(alice_uid)
        first, last = own_uid_range(0, 100)
        assert first <= bob_uid <= last and first <= int(alice_uid) <= last
        # Given alice's host pid, bob's job cannot signal her job.
        assert lines["kill0"] in ("EPERM", "ESRCH")
        assert lines["kill9"] in ("EPERM", "ESRCH")
        # Nor could bob's uid outside any namespace: no signal, no /proc
        # file that ptrace rules guard, to her job or the server.
        assert as_uid(bob_uid, lambda: try_kill(alice_pid)) == "EPERM"
        assert as_uid(bob_uid, lambda: try_read(f"/proc/{alice_pid}/environ")) == "EACCES"
        assert as_uid(bob_uid, lambda: try_ptrace(alice_pid)) == "EPERM"
        assert as_uid(bob_uid, lambda: try_kill(tenants.process.pid)) == "EPERM"
        assert as_uid(bob_uid, lambda: try_ptrace(tenants.process.pid)) == "EPERM"
        # The test can tell: alice's own uid may trace her process.
        assert as_uid(int(alice_uid), lambda: try_read(f"/proc/{alice_pid}/environ")) == "ok"
        assert status(tenants, alice).state is m.JobState.RUNNING
    finally:
        stop(tenants, alice)


def test_status_shows_the_uid(tenants):
    final, out, _ = run(tenants, ["id", "-u"], "alice")
    assert final.uid == int(out)
    shown = tenants.jobcli("status", str(final.job_id), identity="alice", check=True).stdout.decode()
    assert f"uid: {int(out)}" in " ".join(shown.split()), shown
    as_json = json.loads(tenants.jobcli("status", "--json", str(final.job_id), identity="alice", check=True).stdout)
    assert as_json["uid"] == int(out) and as_json["user"] == ""


def test_scratch_is_a_sized_tmpfs_of_mode_1777(tenants):
    script = (
        "import os\n"
        "for d in ('/tmp', '/var/tmp', '/dev/shm'):\n"
        "    s = os.statvfs(d)\n"
        "    print(d, oct(os.stat(d).st_mode & 0o7777), s.f_blocks * s.f_frsize)\n"
    )
    final, out, err = run(tenants, ["python3", "-c", script], "alice")
    assert final.state is m.JobState.EXITED, err
    rows = [line.split() for line in out.decode().splitlines()]
    assert rows == [[directory, "0o1777", str(16 << 20)] for directory in SCRATCH]


FILL = r"""
import errno, sys
path, total = sys.argv[1], int(sys.argv[2])
written = 0
try:
    with open(path, "wb") as f:
        while written < total:
            written += f.write(b"x" * (1 << 20))
            f.flush()
    print("wrote", written)
except OSError as e:
    print(errno.errorcode[e.errno], written)
"""


def test_a_full_tmp_is_enospc_for_that_job_only(tenants):
    name = marker()
    other = start(tenants, ["sh", "-c", f"echo ok > /tmp/{name} && echo ready && exec sleep 1000"], "bob")
    try:
        wait_output(tenants, other, 1)
        fill = f"python3 -c '{FILL}' /tmp/fill {64 << 20}; python3 -c '{FILL}' /dev/shm/more {1 << 20}"
        final, out, err = run(tenants, ["sh", "-c", fill], "alice")
        assert final.state is m.JobState.EXITED, (final, err)
        (word, written), (shm_word, _) = [line.split() for line in out.decode().splitlines()]
        assert word == "ENOSPC"
        assert 8 << 20 < int(written) <= 16 << 20
        # The size bounds the three together: /dev/shm is full too.
        assert shm_word == "ENOSPC"
        # The server and the other job are untouched.
        assert tenants.alive()
        assert status(tenants, other).state is m.JobState.RUNNING
        final, out, _ = run(tenants, ["sh", "-c", f"cat /tmp/{name} 2>&1; df -k /tmp | tail -1"], "bob")
        assert b"No such file" in out  # a new job of bob's has a fresh /tmp too
        assert not os.path.exists("/tmp/fill") or os.path.getsize("/tmp/fill") < (8 << 20)
    finally:
        stop(tenants, other)


@pytest.fixture(scope="module")
def tenants_big_shm(certs, tmp_path_factory):
    """
    A server whose scratch mounts are larger than the memory limit the test
    sets, so that the memory limit, not the size, stops the writer.
    """
    need_root()
    from jobworker.host.cgroups import detect

    driver = detect()
    need(driver is not None and "memory" in driver.controllers, "needs the memory controller")
    first, last = own_uid_range(1, 10)
    running = start_server(
        certs, tmp_path_factory.mktemp("bigshm") / "state", "--job-uids", f"{first}-{last}", "--tmp-size", "256M"
    )
    yield running
    running.stop()


def test_dev_shm_pages_count_against_the_memory_limit(tenants_big_shm):
    server = tenants_big_shm
    job_id = start(server, ["python3", "-c", FILL, "/dev/shm/fill", str(100 << 20)], "alice", limits=Limits(memory_bytes=64 << 20))
    final = wait(server, job_id)
    assert final.state is m.JobState.OOM, (final, output(server, job_id))
    # The same write fits without the limit: the limit, not the size, did it.
    final, out, _ = run(server, ["python3", "-c", FILL, "/dev/shm/fill", str(100 << 20)], "alice")
    assert final.state is m.JobState.EXITED and out.split()[0] == b"wrote", out
    assert server.alive()


def test_scratch_pages_are_freed_when_the_job_ends(tenants_big_shm):
    server = tenants_big_shm
    before = shmem_bytes()
    job_id = start(server, ["sh", "-c", "head -c 150M /dev/zero > /dev/shm/hold && echo held && exec sleep 1000"], "alice")
    try:
        wait_output(server, job_id, 1)
        during = shmem_bytes()
        assert during - before > 120 << 20, (before, during)
    finally:
        stop(server, job_id)
    deadline = time.monotonic() + 10
    while shmem_bytes() > during - (120 << 20) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert shmem_bytes() <= during - (120 << 20), (before, during, shmem_bytes())


# -- /sys -------------------------------------------------------------------------


def test_sys_class_net_lists_only_lo(tenants):
    final, out, err = run(
        tenants, ["sh", "-c", "ls /sys/class/net; touch /sys/x 2>&1; grep ' /sys ' /proc/self/mounts"], "alice"
    )
    lines = out.decode().splitlines()
    assert lines[0] == "lo", (out, err)
    assert lines[1].endswith("Read-only file system"), lines
    fields = lines[2].split()
    assert fields[2] == "sysfs" and fields[3].split(",")[0] == "ro", lines
    # A job on the host's network sees the host's interfaces.
    host = sorted(os.listdir("/sys/class/net"))
    final, out, _ = run(tenants, ["ls", "/sys/class/net"], "admin", network=m.Network.HOST)
    assert sorted(out.decode().split()) == host


# -- the server's secrets ---------------------------------------------------------


SNOOP = r"""
import os, sys
for path in sys.argv[1:]:
    try:
        if os.path.isdir(path):
            print(path, "list", sorted(os.listdir(path)))
        else:
            with open(path, "rb") as f:
                print(path, "read", len(f.read()))
    except OSError as e:
        print(path, "error", e.strerror)
"""


@pytest.fixture(scope="module")
def exposed(certs):
    """
    A server whose state dir and key lie outside /tmp (where a job's own
    /tmp would hide them anyway), to be made world-readable on purpose.
    """
    need_root()
    root = Path(tempfile.mkdtemp(prefix="jobworker-test-", dir=OUTSIDE_TMP))
    try:
        os.chmod(root, 0o755)
        keys = root / "certs"
        shutil.copytree(certs, keys)
        first, last = own_uid_range(2, 20)
        running = start_server(keys, root / "state", "--job-uids", f"{first}-{last}")
        try:
            yield running, root
        finally:
            running.stop()
    finally:
        shutil.rmtree(root)


def test_state_dir_and_key_are_out_of_reach_even_world_readable(exposed):
    server, root = exposed
    secret = marker()
    run(server, ["echo", secret], "alice")
    state = root / "state"
    key = root / "certs" / "server.key"
    # Loosen everything, as a careless operator might.
    for directory in (root / "certs", *[Path(d) for d, _, _ in os.walk(state)]):
        os.chmod(directory, 0o755)
        for item in directory.iterdir():
            if item.is_file():
                os.chmod(item, 0o644)
    spools = [p for p in state.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert spools, "the secret is not in the state dir: the test would prove nothing"
    # From the host, the key and the spool are readable by anyone now.
    assert as_uid(65534, lambda: try_read(str(key))) == "ok"
    assert as_uid(65534, lambda: try_read(str(spools[0]))) == "ok"
    targets = [str(state), str(spools[0]), str(key), str(root / "certs"), str(root / "certs" / "ca.key")]
    for identity, options in (("bob", {}), ("admin", {"user": "nobody"}), ("admin", {"user": "root"})):
        final, out, err = run(server, ["python3", "-c", SNOOP, *targets], identity, **options)
        assert final.state is m.JobState.EXITED, (final, err)
        text = out.decode()
        assert secret not in text
        lines = dict(line.split(" ", 1) for line in text.splitlines())
        if options.get("user") == "root":
            # Root passes every permission check, and finds nothing: empty
            # directories, no key.
            assert lines[str(state)] == "list []", text
            assert lines[str(key)] in ("read 0", "error No such file or directory"), text
        else:
            assert lines[str(state)] == "error Permission denied", text
            assert lines[str(key)] == "error Permission denied", text
        assert lines[str(spools[0])] in ("error No such file or directory", "error Permission denied"), text
        assert lines[str(root / "certs" / "ca.key")] in ("error No such file or directory", "error Permission denied"), text
        # The key's directory goes too: a development PKI keeps the CA's key
        # and the clients' keys beside the server's.
        assert lines[str(root / "certs")] in ("list []", "error Permission denied"), text
    assert server.alive()


# -- caps -------------------------------------------------------------------------


def start_error(server, identity: str, **limit_fields) -> RequestError | None:
    try:
        job_id = start(server, ["true"], identity, limits=Limits(**limit_fields))
    except RequestError as exc:
        return exc
    wait(server, job_id)
    return None


def test_default_caps_bind_users_not_admins(tenants):
    caps = host_caps(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), len(os.sched_getaffinity(0)))
    over = {
        "memory_bytes": (caps.memory_bytes + (1 << 20), "memory"),
        "cpu_millicores": (caps.cpu_millicores + 1, "cpu"),
        "pids": (caps.pids + 1, "pids"),
    }
    for name, (value, label) in over.items():
        refused = start_error(tenants, "alice", **{name: value})
        assert refused is not None and refused.code == ErrorCode.INVALID_LIMITS, (name, refused)
        assert f"{label} " in refused.message and "above the cap of" in refused.message, refused.message
        assert start_error(tenants, "admin", **{name: value}) is None, name
    # At the cap is fine, and unset memory and CPU are capped for a user.
    assert start_error(tenants, "alice", memory_bytes=caps.memory_bytes) is None
    final, _, _ = run(tenants, ["true"], "alice")
    assert final.limits.memory_bytes == caps.memory_bytes
    assert final.limits.cpu_millicores == caps.cpu_millicores
    assert final.limits.pids == 1024  # the default pids limit, below its cap
    final, _, _ = run(tenants, ["true"], "admin")
    assert final.limits.memory_bytes == 0 and final.limits.cpu_millicores == 0


# -- the uid range ---------------------------------------------------------------


def pids_running_as(uid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as handle:
                    for line in handle:
                        if line.startswith("Uid:") and str(uid) in line.split()[1:]:
                            found.append(int(entry))
            except OSError:
                pass
    return found


def test_uid_range_exhausted_is_a_clear_start_failure(certs, tmp_path):
    need_root()
    first, last = own_uid_range(3, 2)
    state = tmp_path / "state"
    server = start_server(certs, state, "--job-uids", f"{first}-{last}")
    try:
        a = start(server, ["sleep", "1000"], "alice")
        b = start(server, ["sleep", "1000"], "bob")
        assert {status(server, a).uid, status(server, b).uid} == {first, last}
        files_before = sorted(str(p) for p in state.rglob("*"))
        with pytest.raises(RequestError) as refused:
            start(server, ["true"], "alice")
        assert refused.value.code == ErrorCode.START_FAILED
        assert "no free uid" in refused.value.message and f"{first}-{last}" in refused.value.message
        # Nothing half-made: no record, no spool, no job.
        assert sorted(str(p) for p in state.rglob("*")) == files_before
        with closing(server.client("admin")) as client:
            assert len(client.list()) == 2
        # A uid comes back once its job is gone: stopped...
        freed = status(server, a).uid
        stop(server, a)
        c = start(server, ["sleep", "1000"], "alice")
        assert status(server, c).uid == freed
        # ...after a clean shutdown (both jobs stopped)...
        server.stop()
        server = start_server(certs, state, "--job-uids", f"{first}-{last}")
        jobs = [start(server, ["sleep", "1000"], who) for who in ("alice", "bob")]
        assert {status(server, j).uid for j in jobs} == {first, last}
        # ...and after a crash: the next server takes the jobs back, with
        # their uids (still theirs: no third job gets one)...
        server.process.kill()
        server.process.wait()
        server = start_server(certs, state, "--job-uids", f"{first}-{last}")
        assert all(status(server, j).state is m.JobState.RUNNING for j in jobs)
        with pytest.raises(RequestError) as refused:
            start(server, ["true"], "alice")
        assert "no free uid" in refused.value.message
        # ...until they are stopped: their processes gone, their uids free.
        for job in jobs:
            stop(server, job)
        assert pids_running_as(first) == pids_running_as(last) == []
        jobs = [start(server, ["sleep", "1000"], who) for who in ("alice", "bob")]
        assert {status(server, j).uid for j in jobs} == {first, last}
    finally:
        server.stop()


def test_a_uid_with_a_live_process_is_not_reused(certs, tmp_path):
    """
    A process that runs as a uid of the range when the server starts (a job
    of an earlier server that survived it, or anyone's) keeps that uid out
    of use until it ends.
    """
    need_root()
    first, _ = own_uid_range(4, 2)
    squatter = subprocess.Popen(["sleep", "1000"], user=first, group=first, extra_groups=[])
    server = None
    try:
        server = start_server(certs, tmp_path / "state", "--job-uids", f"{first}-{first + 1}")
        a = start(server, ["sleep", "1000"], "alice")
        assert status(server, a).uid == first + 1
        with pytest.raises(RequestError) as refused:
            start(server, ["true"], "bob")
        assert "1 by processes still alive" in refused.value.message, refused.value.message
        squatter.kill()
        squatter.wait()
        b = start(server, ["sleep", "1000"], "bob")
        assert status(server, b).uid == first
    finally:
        if squatter.poll() is None:
            squatter.kill()
            squatter.wait()
        if server is not None:
            server.stop()


def test_two_servers_with_one_range_never_share_a_uid(certs, tmp_path):
    need_root()
    first, last = own_uid_range(5, 2)
    servers = []
    try:
        for name in ("one", "two"):
            servers.append(start_server(certs, tmp_path / name / "state", "--job-uids", f"{first}-{last}"))
        one, two = servers
        a = start(one, ["sleep", "1000"], "alice")
        b = start(two, ["sleep", "1000"], "bob")
        assert {status(one, a).uid, status(two, b).uid} == {first, last}
        for server in servers:
            with pytest.raises(RequestError) as refused:
                start(server, ["true"], "alice")
            assert "no free uid" in refused.value.message
        # A uid the other server gave back is free again.
        stop(one, a)
        c = start(two, ["sleep", "1000"], "alice")
        assert status(two, c).uid == status(one, a).uid
    finally:
        for server in servers:
            server.stop()


def test_job_user_option_runs_every_job_as_that_user(certs, tmp_path):
    need_root()
    nobody = pwd.getpwnam("nobody")
    server = start_server(certs, tmp_path / "state", "--job-user", "nobody")
    try:
        final, out, _ = run(server, ["sh", "-c", "id -u; id -G"], "alice")
        assert out.decode().split() == [str(nobody.pw_uid), str(nobody.pw_gid)]
        assert final.user == "nobody" and final.uid == nobody.pw_uid
        final, out, _ = run(server, ["id", "-u"], "admin", user="root")
        assert out == b"0\n" and final.uid == 0
    finally:
        server.stop()


# -- nothing left behind ------------------------------------------------------------


def test_no_mount_reaches_the_host(tenants):
    before = host_mounts()
    jobs = [start(tenants, ["sh", "-c", "echo x > /tmp/x; sleep 0.3"], who) for who in ("alice", "bob", "admin")]
    for job_id in jobs:
        assert wait(tenants, job_id).state is m.JobState.EXITED
    after = host_mounts()
    watched = {*SCRATCH, "/sys", str(tenants.state_dir), str(tenants.certs / "server.key")}
    assert [mount for mount in after if mount[0] in watched] == [mount for mount in before if mount[0] in watched]
