"""
Tenants cannot touch each other (issue 11), tried the way a hostile tenant
would: through the kernel's shared state that neither a mount, PID, IPC nor
network namespace encloses (keyrings), through what an earlier job of the
same uid left behind, and through the host-side state of the uid claims.
For real, as root; these fail on CI when they cannot run.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from jobworker.protocol import messages as m
from tests.e2e.test_e2e_tenants import marker, own_uid_range, run, start, status, stop, wait_output
from tests.support import need, need_root, start_server

# The job side of the keyring checks: put a key in every keyring a process
# of the job's uid can reach (its session keyring, its uid's user and
# user-session keyrings, its uid's persistent keyring), or look for one.
KEYS = r"""
import ctypes, os, platform, sys
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}[platform.machine()]
SYS_ADD_KEY = {"x86_64": 248, "aarch64": 217}[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long
def keyctl(*args):
    return libc.syscall(L(SYS_KEYCTL), *[L(a) if isinstance(a, int) else a for a in args])
SESSION, USER, USER_SESSION = -3, -4, -5
def persistent():
    return keyctl(22, -1, SESSION)  # KEYCTL_GET_PERSISTENT, linked into @s
rings = {"session": SESSION, "user": USER, "user-session": USER_SESSION}
mode, what = sys.argv[1], sys.argv[2]
if mode == "put":
    rings["persistent"] = persistent()
    for name, ring in rings.items():
        data = f"{what}-{name}".encode()
        key = libc.syscall(L(SYS_ADD_KEY), b"user", b"jw-probe", data, ctypes.c_size_t(len(data)), L(ring))
        print("put", name, key > 0)
    sys.stdout.flush()
    if len(sys.argv) > 3:
        os.execvp(sys.argv[3], sys.argv[3:])
else:
    rings["persistent"] = persistent()
    for name, ring in rings.items():
        for description in ("jw-probe", what):
            key = keyctl(10, ring, b"user", description.encode(), 0)  # KEYCTL_SEARCH
            if key > 0:
                buffer = ctypes.create_string_buffer(256)
                size = keyctl(11, key, buffer, 256)  # KEYCTL_READ
                print("found", name, buffer.raw[: max(size, 0)].decode(errors="replace"))
    print("done")
"""

# Run before the server: give it a session keyring of its own holding a
# secret, as a service manager's session keyring may (systemd gives each
# service one), then become the server.
SERVER_KEYRING = r"""
import ctypes, os, platform, sys
SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}[platform.machine()]
SYS_ADD_KEY = {"x86_64": 248, "aarch64": 217}[platform.machine()]
libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long
assert libc.syscall(L(SYS_KEYCTL), L(1), b"jw-test-server") > 0  # KEYCTL_JOIN_SESSION_KEYRING
secret = sys.argv[1].encode()
assert libc.syscall(L(SYS_ADD_KEY), b"user", b"server-secret", secret, ctypes.c_size_t(len(secret)), L(-3)) > 0
os.execv(sys.argv[2], sys.argv[2:])
"""


def need_keyrings() -> None:
    import platform

    need(os.path.exists("/proc/keys"), "needs kernel keyrings (CONFIG_KEYS)")
    need(platform.machine() in ("x86_64", "aarch64"), "the probe knows keyctl(2)'s number on x86_64 and aarch64 only")


@pytest.fixture(scope="module")
def keyring_server(certs, tmp_path_factory):
    """
    A server with two uids to hand out, started in a session keyring of its
    own that holds a secret.
    """
    need_root()
    need_keyrings()
    first, last = own_uid_range(6, 2)
    secret = marker()
    running = start_server(
        certs,
        tmp_path_factory.mktemp("keyrings") / "state",
        "--job-uids",
        f"{first}-{last}",
        wrapper=[sys.executable, "-c", SERVER_KEYRING, secret],
    )
    running.secret = secret
    yield running
    running.stop()


def found_keys(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines and lines[-1] == "done", text
    return [line for line in lines if line.startswith("found")]


def test_jobs_share_no_keyring_with_each_other_or_the_server(keyring_server):
    server = keyring_server
    mark = marker()
    alice = start(server, ["python3", "-c", KEYS, "put", mark, "sleep", "1000"], "alice")
    try:
        put = wait_output(server, alice, 4)
        assert put == [f"put {ring} True" for ring in ("session", "user", "user-session", "persistent")], put
        # Bob's job, running at the same time as another uid, reaches
        # neither alice's keys nor the server's.
        final, out, err = run(server, ["python3", "-c", KEYS, "get", "server-secret"], "bob")
        assert final.state is m.JobState.EXITED, (final, err)
        assert final.uid != status(server, alice).uid
        assert found_keys(out.decode()) == [], out
    finally:
        stop(server, alice)


def test_a_later_job_with_the_same_uid_finds_no_keys_of_the_earlier_one(keyring_server):
    server = keyring_server
    mark = marker()
    final, out, err = run(server, ["python3", "-c", KEYS, "put", mark], "alice")
    assert final.state is m.JobState.EXITED and out.decode().count("True") == 4, (final, out, err)
    # Two uids: the next job after the other one gets alice's uid again.
    seen = {final.uid}
    for _ in range(3):
        later, out, err = run(server, ["python3", "-c", KEYS, "get", "server-secret"], "bob")
        assert later.state is m.JobState.EXITED, (later, err)
        assert found_keys(out.decode()) == [], out
        seen.add(later.uid)
        if later.uid == final.uid:
            break
    assert later.uid == final.uid, seen  # the test proved something


# Run by a hostile job: put a key in its uid's user and user-session
# keyrings, then take away every permission on the user-session keyring,
# which makes both unreachable to the uid for good (the kernel looks them
# up together), and which nothing, not even root, can put back.
POISON = KEYS.split("mode, what")[0] + r"""
add = lambda ring: libc.syscall(L(SYS_ADD_KEY), b"user", b"jw-probe", b"poison", ctypes.c_size_t(6), L(ring))
print("put", add(USER) > 0, add(USER_SESSION) > 0)
KEYCTL_SETPERM = 5
print("setperm", keyctl(KEYCTL_SETPERM, USER_SESSION, 0), keyctl(KEYCTL_SETPERM, USER, 0x3f3f0000))
"""


@pytest.fixture
def poisoned_uid(certs, tmp_path):
    """
    A server with one uid to hand out, drawn at random far above the uids
    other tests use: a poisoned user-session keyring stays (a few bytes of
    kernel memory, no use to anyone) until the host reboots.
    """
    import random

    need_root()
    need_keyrings()
    uid = random.randrange(2_000_000_000, 2_100_000_000)
    running = start_server(certs, tmp_path / "state", "--job-uids", str(uid))
    yield running, uid
    running.stop()


def test_a_job_that_poisons_its_uids_keyrings_does_not_stop_later_jobs_of_that_uid(poisoned_uid):
    server, uid = poisoned_uid
    final, out, err = run(server, ["python3", "-c", POISON], "alice")
    assert final.state is m.JobState.EXITED and final.uid == uid, (final, err)
    # Poisoned: not even the job's own uid may change them any more.
    assert out.decode().splitlines() == ["put True True", "setperm 0 -1"], out
    # The next job with that uid starts all the same, and finds no key.
    later, out, err = run(server, ["python3", "-c", KEYS, "get", "jw-probe"], "bob")
    assert later.state is m.JobState.EXITED and later.uid == uid, (later, err)
    assert found_keys(out.decode()) == [], out


# -- the uid claims on the host ------------------------------------------------------


UID_LOCKS = Path("/run/jobworker/uids")


def test_no_uid_lock_file_is_left_after_a_crash_and_a_restart(certs, tmp_path):
    need_root()
    first, last = own_uid_range(7, 2)
    state = tmp_path / "state"
    server = start_server(certs, state, "--job-uids", f"{first}-{last}")
    try:
        job = start(server, ["sleep", "1000"], "alice")
        lock = UID_LOCKS / str(status(server, job).uid)
        assert lock.exists()
        server.process.kill()
        server.process.wait()
        # (Nothing cleans up in a crash; but any server starting on the
        # host now, another test's, may already sweep the file away.)
        server = start_server(certs, state, "--job-uids", f"{first}-{last}")
        # It listens before its start-up is done; an answer means it is.
        # The job is taken back, and its claim with it.
        assert status(server, job).state is m.JobState.RUNNING
        assert lock.exists(), "the claim of a job taken back was swept"
        stop(server, job)
        assert not lock.exists(), "the claim of a stopped job is left in /run"
        job = start(server, ["sleep", "1000"], "bob")
        assert (UID_LOCKS / str(status(server, job).uid)).exists()
        server.stop()
        assert [uid for uid in (first, last) if (UID_LOCKS / str(uid)).exists()] == []
    finally:
        server.stop()


# -- user namespaces ------------------------------------------------------------------


# The job side: make a user namespace with a mount namespace, become "root"
# there, and try to undo the covers over the hidden paths and the read-only
# host.  Prints "STEP RESULT" lines (an errno name or "ok"), and what could
# be read through a bind of the hidden paths' parent.
USERNS = r"""
import ctypes, errno, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def result(code):
    return "ok" if code == 0 else errno.errorcode[ctypes.get_errno()]
def read(path):
    try:
        if os.path.isdir(path):
            return "list " + ",".join(sorted(os.listdir(path)))
        with open(path, "rb") as handle:
            return f"read {len(handle.read())}"
    except OSError as e:
        return errno.errorcode[e.errno]
state, key, parent = sys.argv[1:4]
uid, gid = os.getuid(), os.getgid()
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) != 0:
    print("unshare", errno.errorcode[ctypes.get_errno()])
    sys.exit()
for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
    with open(f"/proc/self/{name}", "w") as handle:
        handle.write(text)
print("unshare ok")
MNT_DETACH, MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 2, 1, 32, 4096, 0x4000
print("umount-state", result(libc.umount2(state.encode(), MNT_DETACH)))
print("umount-key", result(libc.umount2(key.encode(), MNT_DETACH)))
print("remount-state-rw", result(libc.mount(None, state.encode(), None, MS_REMOUNT | MS_BIND, None)))
print("remount-root-rw", result(libc.mount(None, b"/", None, MS_REMOUNT | MS_BIND, None)))
os.mkdir("/tmp/view")
print("bind-parent", result(libc.mount(parent.encode(), b"/tmp/view", None, MS_BIND, None)))
print("rbind-parent", result(libc.mount(parent.encode(), b"/tmp/view", None, MS_BIND | MS_REC, None)))
view = "/tmp/view/"
print("state", read(state), "via-view", read(view + os.path.relpath(state, parent)))
print("key", read(key), "via-view", read(view + os.path.relpath(key, parent)))
"""


@pytest.fixture(scope="module")
def exposed_outside_tmp(certs):
    """
    A server whose state dir and key lie outside /tmp, loosened to be
    world-readable once it runs.
    """
    import shutil
    import tempfile

    need_root()
    outside = "/srv" if os.path.isdir("/srv") else "/var/lib"
    root = Path(tempfile.mkdtemp(prefix="jobworker-test-", dir=outside))
    try:
        os.chmod(root, 0o755)
        shutil.copytree(certs, root / "certs")
        first, last = own_uid_range(8, 10)
        running = start_server(root / "certs", root / "state", "--job-uids", f"{first}-{last}")
        try:
            for directory, _, files in os.walk(root):
                os.chmod(directory, 0o755)
                for name in files:
                    os.chmod(os.path.join(directory, name), 0o644)
            yield running, root
        finally:
            running.stop()
    finally:
        shutil.rmtree(root)


def test_a_user_namespace_undoes_no_cover_and_no_read_only_mount(exposed_outside_tmp):
    server, root = exposed_outside_tmp
    state, key = root / "state", root / "certs" / "server.key"
    final, out, err = run(server, ["python3", "-c", USERNS, str(state), str(key), str(root)], "bob")
    assert final.state is m.JobState.EXITED, (final, out, err)
    lines = dict(line.split(" ", 1) for line in out.decode().splitlines())
    if lines.get("unshare") != "ok":
        # The host allows no unprivileged user namespaces: nothing to undo.
        assert lines["unshare"] in ("EPERM", "ENOSPC", "EUSERS"), lines
        return
    assert lines["umount-state"] == "EINVAL", lines  # a locked mount
    assert lines["umount-key"] in ("EINVAL", "EACCES"), lines
    assert lines["remount-state-rw"] == lines["remount-root-rw"] == "EPERM", lines
    assert lines["bind-parent"] == "EINVAL", lines  # it would reveal what the covers hide
    assert lines["rbind-parent"] == "ok", lines  # with the covers, so harmless
    assert lines["state"] == "EACCES via-view EACCES", lines
    assert lines["key"] == "EACCES via-view EACCES", lines


# -- what two live jobs share ------------------------------------------------------------


HOLD = r"""
import ctypes, socket, sys, time
name = sys.argv[1]
listener = socket.socket(socket.AF_UNIX)
listener.bind("\0" + name)
listener.listen()
libc = ctypes.CDLL(None, use_errno=True)
IPC_CREAT, IPC_PRIVATE = 0o1000, 0
print("shm", libc.shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0o666) >= 0)
print("sem", libc.semget(0x4A57, 1, IPC_CREAT | 0o666) >= 0)
print("ready", flush=True)
time.sleep(1000)
"""

PEEK = r"""
import errno, socket, sys
name = sys.argv[1]
client = socket.socket(socket.AF_UNIX)
try:
    client.connect("\0" + name)
    print("abstract connected")
except OSError as e:
    print("abstract", errno.errorcode[e.errno])
for kind in ("shm", "sem", "msg"):
    with open(f"/proc/sysvipc/{kind}") as table:
        print(kind, len(table.read().splitlines()) - 1)
status = dict(line.split(":\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\t" in line)
print("caps", status["CapEff"].strip(), status["CapPrm"].strip(), "nnp", status["NoNewPrivs"].strip())
"""


def test_two_live_jobs_share_no_abstract_socket_or_ipc_and_hold_no_capability(keyring_server):
    server = keyring_server
    name = marker()
    alice = start(server, ["python3", "-c", HOLD, name], "alice")
    try:
        assert wait_output(server, alice, 3) == ["shm True", "sem True", "ready"]
        final, out, err = run(server, ["python3", "-c", PEEK, name], "bob")
        assert final.state is m.JobState.EXITED, (final, err)
        lines = out.decode().splitlines()
        assert lines[0] == "abstract ECONNREFUSED", lines
        assert lines[1:4] == ["shm 0", "sem 0", "msg 0"], lines
        assert lines[4] == "caps 0000000000000000 0000000000000000 nnp 1", lines
    finally:
        stop(server, alice)


# -- after a crash -------------------------------------------------------------------------


def test_a_job_taken_back_after_a_crash_frees_its_scratch_pages_when_it_ends(certs, tmp_path):
    """
    A job outlives a crash of the server (its supervisor does), scratch and
    all; when the next server stops it, its tmpfs goes with it at once.
    """
    from tests.e2e.test_e2e_tenants import host_pids_with, shmem_bytes

    need_root()
    first, last = own_uid_range(9, 2)
    state = tmp_path / "state"
    options = ("--job-uids", f"{first}-{last}", "--tmp-size", "256M")
    server = start_server(certs, state, *options)
    sleeper = f"1000.{os.getpid()}"
    try:
        before = shmem_bytes()
        job = start(server, ["sh", "-c", f"head -c 150M /dev/zero > /dev/shm/hold && echo held && exec sleep {sleeper}"], "alice")
        wait_output(server, job, 1)
        during = shmem_bytes()
        assert during - before > 120 << 20, (before, during)
        assert len(host_pids_with(sleeper)) == 1
        server.process.kill()
        server.process.wait()
        assert len(host_pids_with(sleeper)) == 1, "the job died with the server"
        server = start_server(certs, state, *options)
        stop(server, job)
        deadline = time.monotonic() + 10
        while (host_pids_with(sleeper) or shmem_bytes() > during - (120 << 20)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert host_pids_with(sleeper) == []
        assert shmem_bytes() <= during - (120 << 20), (before, during, shmem_bytes())
    finally:
        server.stop()
