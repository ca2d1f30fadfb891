"""
Tests for the isolation helper, run for real: each starts
C{python -I -S isolate.py CONFIG_JSON} the way the server does, with the
status pipe on fd 3, and checks what the job could and could not do.
"""

from __future__ import annotations

import errno
import json
import os
import pwd
import random
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobworker.host import isolate
from tests.support import cgroup_layout, need, need_root

PATH = "/usr/bin:/bin"
PYTHON = sys.executable

# Long enough for a loaded CI machine, short enough that a hang is a failure
# rather than a stuck suite (seconds).
TIMEOUT = 30


def need_namespaces() -> None:
    need_root()
    need(os.path.exists("/proc/self/ns/pid"), "needs PID namespaces")


# Both modes of the helper; only the isolated one needs privileges.
MODES = [
    pytest.param(True, id="isolated", marks=pytest.mark.privileged),
    pytest.param(False, id="direct"),
]


def config(argv: list[str], **options: object) -> dict[str, object]:
    return {"argv": argv, "env": {"PATH": PATH}, **options}


def shell(script: str, **options: object) -> dict[str, object]:
    return config(["sh", "-c", script], **options)


class HelperRun:
    """
    One run of the helper, with the job's stdout, stderr and status pipe.
    """

    def __init__(
        self,
        job: dict[str, object],
        helper: str = isolate.__file__,
        extra_groups: list[int] | None = None,
    ) -> None:
        status_read, status_write = os.pipe()

        def status_pipe_on_fd_3() -> None:
            # dup2 leaves the copy inheritable; fds the test holds are not.
            os.dup2(status_write, isolate.STATUS_FD)

        self.process = subprocess.Popen(
            [PYTHON, "-I", "-S", helper, json.dumps(job)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=status_pipe_on_fd_3,
            close_fds=False,
            extra_groups=extra_groups,
        )
        os.close(status_write)
        self._status_fd = status_read
        self._status = b""
        self._stdout = b""
        self.stdout = b""
        self.stderr = b""
        self.statuses: list[str] = []
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_line(self, fd: int, buffered: bytes) -> tuple[bytes, bytes]:
        deadline = time.monotonic() + TIMEOUT
        while b"\n" not in buffered:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise AssertionError(f"no line within {TIMEOUT}s: {buffered!r}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise AssertionError(f"EOF before a full line: {buffered!r}")
            buffered += chunk
        line, _, rest = buffered.partition(b"\n")
        return line, rest

    def next_status(self) -> str:
        line, self._status = self._read_line(self._status_fd, self._status)
        self.statuses.append(line.decode("ascii"))
        return self.statuses[-1]

    def next_stdout_line(self) -> bytes:
        fd = self.process.stdout.fileno()
        line, rest = self._read_line(fd, b"")
        # Whatever followed the line is kept for finish().
        self._stdout += line + b"\n" + rest
        return line

    def signal(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def finish(self) -> HelperRun:
        """
        Wait for the helper to exit and collect its output and status lines.
        """
        try:
            stdout, self.stderr = self.process.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            raise
        self.stdout = self._stdout + stdout
        self.returncode = self.process.returncode
        while select.select([self._status_fd], [], [], TIMEOUT)[0]:
            chunk = os.read(self._status_fd, 4096)
            if not chunk:
                break
            self._status += chunk
        else:
            raise AssertionError("the status pipe stayed open")
        os.close(self._status_fd)
        self._status_fd = -1
        self.statuses += [line.decode("ascii") for line in self._status.splitlines()]
        return self

    def stdout_lines(self) -> list[str]:
        return self.stdout.decode().splitlines()

    def __enter__(self) -> HelperRun:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # A test that failed half-way must not leave its job running; the
        # namespace dies with outer.
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()
        if self._status_fd >= 0:
            os.close(self._status_fd)
            self._status_fd = -1


def run(
    job: dict[str, object],
    helper: str = isolate.__file__,
    extra_groups: list[int] | None = None,
) -> HelperRun:
    with HelperRun(job, helper, extra_groups) as job_run:
        return job_run.finish()


def unique_sleep() -> list[str]:
    """
    A C{sleep} command line that no other process on the machine has.
    """
    return ["sleep", f"1000.{random.randrange(10**9):09d}"]


def processes_running(argv: list[str]) -> list[int]:
    """
    Live (not zombie) processes whose command line is exactly C{argv}.
    """
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read() == wanted:
                    found.append(int(entry))
        except OSError:
            pass
    return found


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {TIMEOUT}s: {what}")
        time.sleep(0.05)


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def session_fields(stat_line: str) -> tuple[int, int, int]:
    """
    (pid, process group, session) from a C{/proc/PID/stat} line.
    """
    pid = int(stat_line.split()[0])
    fields = stat_line.rpartition(")")[2].split()
    return pid, int(fields[2]), int(fields[3])


# -- namespaces ---------------------------------------------------------------


@pytest.mark.privileged
def test_isolated_command_sees_only_its_namespace() -> None:
    """
    The command is PID 2 under init and /proc lists only the job's processes.
    """
    need_namespaces()
    job = run(shell("echo $$; cat /proc/$$/stat; exec ls /proc"))
    assert job.statuses == ["started", "exit 0"]
    assert job.returncode == 0
    assert job.stderr == b""
    lines = job.stdout_lines()
    assert lines[0] == "2"
    # Its own session and process group, so it can be signalled as a group.
    assert session_fields(lines[1]) == (2, 2, 2)
    pids = sorted(int(name) for name in lines[2:] if name.isdigit())
    # init and the command (sh, then ls).
    assert pids == [1, 2]


def test_direct_command_replaces_the_helper() -> None:
    """
    Without isolation the server's child execs the command itself, in a
    session of its own, and fd 3 just closes.
    """
    job = run(shell("echo $$; cat /proc/$$/stat", isolate=False))
    assert job.statuses == []
    assert job.returncode == 0
    lines = job.stdout_lines()
    assert int(lines[0]) == job.pid
    assert session_fields(lines[1]) == (job.pid, job.pid, job.pid)


@pytest.mark.privileged
@pytest.mark.parametrize(
    "script, status, returncode",
    [
        ("exit 7", "exit 7", 7),
        ("kill -KILL $$", "signal 9", 128 + 9),
        ("exit 137", "exit 137", 137),
    ],
)
def test_final_status_of_the_command(script: str, status: str, returncode: int) -> None:
    """
    The status line tells an exit from a signal even when the helper's exit
    code cannot.
    """
    need_namespaces()
    job = run(shell(script))
    assert job.statuses == ["started", status]
    assert job.returncode == returncode


@pytest.fixture
def shared_mount(tmp_path: Path) -> Iterator[Path]:
    """
    A directory that is a shared mount point, so that a mount made under it
    in a namespace that did not make its mounts private shows up here.
    """
    need_root()
    base = tmp_path / "shared"
    (base / "inner").mkdir(parents=True)
    subprocess.run(["mount", "--bind", base, base], check=True)
    try:
        subprocess.run(["mount", "--make-shared", base], check=True)
        yield base
    finally:
        subprocess.run(["umount", "-R", base], check=True)


def host_mount_sources() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


@pytest.mark.privileged
def test_mounts_stay_inside_the_job(shared_mount: Path) -> None:
    """
    A tmpfs the job mounts, even on a shared mount point, never appears in
    the host's mount table.
    """
    need_namespaces()
    source = f"jobworker-test-{random.randrange(10**9)}"
    target = shared_mount / "inner"
    with HelperRun(
        shell(
            f"mount -t tmpfs {source} {target}"
            f" && grep -c {source} /proc/self/mountinfo"
            f" && exec {' '.join(unique_sleep())}"
        )
    ) as job:
        assert job.next_status() == "started"
        assert job.next_stdout_line() == b"1"
        assert source not in host_mount_sources()
        job.signal(signal.SIGTERM)
        job.finish()
    assert job.statuses[-1] == f"signal {signal.SIGTERM}"
    assert source not in host_mount_sources()


# -- network ------------------------------------------------------------------

PROBE_NETWORK = """
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
    print("host port reachable")
except ConnectionRefusedError:
    print("host port refused")
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
socket.create_connection(server.getsockname(), timeout=5).close()
print("loopback works")
with open("/proc/self/net/dev") as f:
    print("interfaces", sorted(l.split(":")[0].strip() for l in f if ":" in l))
"""


@pytest.fixture
def host_port() -> Iterator[int]:
    """
    A port listening on the host's loopback.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@pytest.mark.privileged
def test_network_none_has_its_own_working_loopback(host_port: int) -> None:
    need_namespaces()
    job = run(config([PYTHON, "-I", "-S", "-c", PROBE_NETWORK, str(host_port)]))
    assert job.stderr == b""
    assert job.stdout_lines() == [
        "host port refused",
        "loopback works",
        "interfaces ['lo']",
    ]
    assert job.statuses == ["started", "exit 0"]


@pytest.mark.privileged
def test_network_host_reaches_the_host(host_port: int) -> None:
    need_namespaces()
    job = run(
        config([PYTHON, "-I", "-S", "-c", PROBE_NETWORK, str(host_port)], network="host")
    )
    assert job.stderr == b""
    assert job.stdout_lines()[:2] == ["host port reachable", "loopback works"]
    assert job.statuses == ["started", "exit 0"]


# -- user ---------------------------------------------------------------------


@pytest.mark.privileged
@pytest.mark.parametrize("isolated", MODES)
@pytest.mark.parametrize("no_new_privs", [True, False])
def test_runs_as_the_given_user(isolated: bool, no_new_privs: bool) -> None:
    """
    The command gets the uid, the gid and no other group, and no_new_privs.
    """
    need_root()
    nobody = pwd.getpwnam("nobody")
    # Supplementary groups of the server's that the job must not keep.
    server_groups = [0, 4242]
    job = run(
        shell(
            "id -u; id -g; id -G; grep NoNewPrivs /proc/self/status",
            uid=nobody.pw_uid,
            gid=nobody.pw_gid,
            isolate=isolated,
            no_new_privs=no_new_privs,
        ),
        extra_groups=server_groups,
    )
    assert job.stderr == b""
    assert job.stdout_lines() == [
        str(nobody.pw_uid),
        str(nobody.pw_gid),
        str(nobody.pw_gid),
        f"NoNewPrivs:\t{int(no_new_privs)}",
    ]
    assert job.returncode == 0


# -- processes and signals ----------------------------------------------------


@pytest.mark.privileged
def test_background_processes_end_with_the_job() -> None:
    """
    A grandchild left running is killed when the command exits; otherwise
    it would also hold the job's stdout open and finish() would time out.
    """
    need_namespaces()
    sleep = unique_sleep()
    job = run(shell(f"{' '.join(sleep)} & echo started"))
    assert job.stdout == b"started\n"
    assert job.statuses == ["started", "exit 0"]
    assert processes_running(sleep) == []


@pytest.mark.parametrize("isolated", MODES)
def test_sigterm_reaches_the_command(isolated: bool) -> None:
    if isolated:
        need_namespaces()
    with HelperRun(
        shell(
            'trap "echo got-term; exit 3" TERM; echo ready; while :; do sleep 0.1; done',
            isolate=isolated,
        )
    ) as job:
        assert job.next_stdout_line() == b"ready"
        job.signal(signal.SIGTERM)
        job.finish()
    assert job.stdout == b"ready\ngot-term\n"
    assert job.statuses == (["started", "exit 3"] if isolated else [])
    assert job.returncode == 3


@pytest.mark.privileged
def test_signal_during_start_up_is_not_lost() -> None:
    """
    A job stopped while the helper is still setting up ends all the same,
    however far the helper got: signals are blocked, not dropped, until
    there is a process to forward them to.
    """
    need_namespaces()
    sleep = unique_sleep()
    for delay in (0, 0.005, 0.01, 0.02, 0.04):
        with HelperRun(config(sleep)) as job:
            time.sleep(delay)
            job.signal(signal.SIGTERM)
            job.finish()
        assert job.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM), job.statuses
        assert job.statuses in ([], ["started", f"signal {signal.SIGTERM}"])
        assert processes_running(sleep) == []


INTERMEDIATE_SERVER = """
import json, os, subprocess, sys, time
status_read, status_write = os.pipe()
helper = subprocess.Popen(
    [sys.executable, "-I", "-S", sys.argv[1], sys.argv[2]],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    preexec_fn=lambda: os.dup2(status_write, 3), close_fds=False,
)
os.close(status_write)
# Wait until the command has started: isolated jobs say so, direct ones
# close fd 3.
os.read(status_read, 100)
print(helper.pid, flush=True)
time.sleep(1000)
"""


@pytest.mark.parametrize("isolated", MODES)
def test_job_dies_with_the_server(isolated: bool) -> None:
    if isolated:
        need_namespaces()
    sleep = unique_sleep()
    job = config(sleep, isolate=isolated)
    server = subprocess.Popen(
        [PYTHON, "-c", INTERMEDIATE_SERVER, isolate.__file__, json.dumps(job)],
        stdout=subprocess.PIPE,
    )
    try:
        helper_pid = int(server.stdout.readline())
        assert processes_running(sleep) != []
    finally:
        server.kill()
        server.wait()
    wait_until(lambda: process_gone(helper_pid), "helper gone")
    wait_until(lambda: processes_running(sleep) == [], "command gone")


# -- start failures -----------------------------------------------------------


@pytest.fixture
def not_executable(tmp_path: Path) -> str:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    return str(script)


@pytest.mark.parametrize("isolated", MODES)
@pytest.mark.parametrize(
    "case, kind, error, returncode, words",
    [
        ("missing", "not_found", errno.ENOENT, 127, "exec no-such-command-"),
        ("missing path", "not_found", errno.ENOENT, 127, "exec /no/such/"),
        ("not executable", "not_executable", errno.EACCES, 126, "exec /"),
        ("bad cwd", "setup", errno.ENOENT, 125, "chdir /no/such/dir"),
        ("bad cgroup", "setup", errno.ENOENT, 125, "cgroup join /no/such/"),
    ],
)
def test_start_failure(
    isolated: bool,
    case: str,
    kind: str,
    error: int,
    returncode: int,
    words: str,
    not_executable: str,
) -> None:
    """
    A job that cannot start says why on fd 3, exits like a shell would, and
    prints nothing of its own.
    """
    if isolated:
        need_namespaces()
    job = config(["true"], isolate=isolated)
    if case == "missing":
        job["argv"] = [f"no-such-command-{random.randrange(10**9)}"]
    elif case == "missing path":
        job["argv"] = ["/no/such/command"]
    elif case == "not executable":
        job["argv"] = [not_executable]
    elif case == "bad cwd":
        job["cwd"] = "/no/such/dir"
    elif case == "bad cgroup":
        job["cgroup_procs"] = ["/no/such/cgroup.procs"]
    result = run(job)
    assert len(result.statuses) == 1
    failed, got_kind, got_errno, message = result.statuses[0].split(" ", 3)
    assert (failed, got_kind, int(got_errno)) == ("failed", kind, error)
    assert message.startswith(words)
    assert message.endswith(os.strerror(error))
    assert result.returncode == returncode
    assert result.stdout == b""
    assert result.stderr == b""


def test_not_executable_found_on_path_is_reported_as_such(tmp_path: Path) -> None:
    """
    Like execvp(3): a match without execute permission is skipped, and
    reported if nothing else is found.
    """
    script = tmp_path / "job-script"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o644)
    job = run(
        {"argv": ["job-script"], "env": {"PATH": f"/no/such/dir:{tmp_path}"}, "isolate": False}
    )
    assert job.statuses[0].startswith(f"failed not_executable {errno.EACCES} ")
    script.chmod(0o755)
    job = run(
        {"argv": ["job-script"], "env": {"PATH": f"/no/such/dir:{tmp_path}"}, "isolate": False}
    )
    assert job.stdout == b"ran\n"


@pytest.mark.parametrize(
    "raw",
    [
        '{"argv": ["true"], "cwd": "/',
        '{"argv": ["true"]} trailing',
        '["true"]',
        '{"argv": []}',
        '{"argv": "true"}',
        '{"argv": ["true"], "env": {"A=B": "c"}}',
        '{"argv": ["true"], "uid": "0"}',
        '{"argv": ["true"], "isolate": 1}',
        '{"argv": ["true"], "network": "bridge"}',
        '{"argv": ["true"], "unknown": 1}',
    ],
)
def test_bad_config_is_a_setup_failure(raw: str) -> None:
    helper = subprocess.run(
        [PYTHON, "-I", "-S", isolate.__file__, raw],
        capture_output=True,
        preexec_fn=lambda: os.dup2(1, isolate.STATUS_FD),
        close_fds=False,
        timeout=TIMEOUT,
    )
    assert helper.stdout.startswith(f"failed setup {errno.EINVAL} bad config: ".encode())
    assert helper.stdout.count(b"\n") == 1
    assert helper.stderr == b""
    assert helper.returncode == 125


CHECK_FDS = """
import os, sys
for fd in map(int, sys.argv[1:]):
    try:
        os.fstat(fd)
        print(fd, "open")
    except OSError:
        print(fd, "closed")
"""


@pytest.mark.parametrize("isolated", MODES)
def test_command_inherits_only_stdio(isolated: bool) -> None:
    """
    Neither the status pipe nor a descriptor the server leaked reaches the
    command.
    """
    if isolated:
        need_namespaces()
    with open(os.devnull) as leaked:
        fd = leaked.fileno()
        os.set_inheritable(fd, True)
        job = run(
            config(
                [PYTHON, "-I", "-S", "-c", CHECK_FDS, "2", "3", str(fd)],
                isolate=isolated,
            )
        )
    assert job.stdout_lines() == ["2 open", "3 closed", f"{fd} closed"]


def test_config_on_stdin_may_exceed_one_argument() -> None:
    """
    With C{-} the configuration comes on stdin, so it may be larger than
    the 128 KiB one argv string can hold; the command then gets /dev/null
    as its stdin.
    """
    words = ["y" * 1000] * 200
    job = config(["sh", "-c", "echo $#; cat", "sh", *words], isolate=False)
    raw = json.dumps(job).encode()
    assert len(raw) > 128 * 1024
    helper = subprocess.run(
        [PYTHON, "-I", "-S", isolate.__file__, "-"],
        input=raw,
        capture_output=True,
        preexec_fn=lambda: os.dup2(1, isolate.STATUS_FD),
        close_fds=False,
        timeout=TIMEOUT,
    )
    assert helper.stderr == b""
    assert helper.stdout == b"200\n"
    assert helper.returncode == 0


def test_environment_is_exactly_the_given_one() -> None:
    job = run({"argv": ["/usr/bin/env"], "env": {"ONLY": "this"}, "isolate": False})
    assert job.stdout == b"ONLY=this\n"


# -- cgroups ------------------------------------------------------------------


@dataclass(frozen=True)
class JoinedCgroup:
    """
    A job cgroup made by the service's own driver, for the helper to join.

    @ivar procs_files: what the server passes the helper as C{cgroup_procs}.
    @ivar pids_directory: the directory with the job's C{pids.max}.
    @ivar proc_line: the line of C{/proc/PID/cgroup} that names the job's
        pids cgroup, without the hierarchy id: C{"pids:/path"} on v1,
        C{":/path"} on v2.
    """

    layout: str
    procs_files: list[str]
    pids_directory: Path
    proc_line: str


def _mount_point(directory: str) -> str:
    """
    The cgroup filesystem mount that holds C{directory}.
    """
    best = ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mount_point, fs_type = line.split()[:3]
            if fs_type in ("cgroup", "cgroup2") and (directory + "/").startswith(mount_point.rstrip("/") + "/"):
                best = max(best, mount_point, key=len)
    assert best, f"{directory} is on no cgroup mount"
    return best


@pytest.fixture(params=[cgroup_layout()])
def pids_cgroup(request: pytest.FixtureRequest) -> Iterator[JoinedCgroup]:
    """
    A fresh job cgroup with the pids controller, made by the cgroup driver
    this host's service would use (v1 or v2), under our own cgroup.
    """
    from jobworker.host.cgroups import detect
    from jobworker.limits import Limits

    need_root()
    layout = request.param
    need(layout != "none", "needs a cgroup hierarchy")
    driver = detect(prefix=f"jobworker-test-{os.getpid()}")
    assert driver is not None and driver.name == layout
    need("pids" in driver.controllers, f"needs the pids controller ({layout})")
    driver.prepare()
    try:
        job = driver.create(f"isolate-{random.randrange(10**9)}", Limits())
        directory = job.controller_dirs["pids"]
        path = "/" + os.path.relpath(directory, _mount_point(directory))
        line = f"pids:{path}" if layout == "v1" else f":{path}"
        try:
            yield JoinedCgroup(layout, list(job.procs_files), Path(directory), line)
        finally:
            # The helper may still be exiting for a moment after its last word.
            wait_until(lambda: not job.pids(), "cgroup empty")
            job.remove()
    finally:
        driver.cleanup_stale()
        driver.release()


@pytest.mark.privileged
@pytest.mark.parametrize("isolated", MODES)
def test_command_runs_in_the_joined_cgroup(
    isolated: bool, pids_cgroup: JoinedCgroup
) -> None:
    if isolated:
        need_namespaces()
    job = run(
        config(
            ["cat", "/proc/self/cgroup"],
            cgroup_procs=pids_cgroup.procs_files,
            isolate=isolated,
        )
    )
    assert job.returncode == 0
    print(f"[{pids_cgroup.layout}] the command's /proc/self/cgroup: {job.stdout_lines()}")
    # v1: the line of the pids hierarchy; v2: the one line of the unified
    # hierarchy ("0::/path").
    if pids_cgroup.layout == "v1":
        lines = [line.split(":", 1)[1] for line in job.stdout_lines() if ":pids:" in line]
    else:
        lines = [line.split(":", 1)[1] for line in job.stdout_lines() if line.startswith("0::")]
    assert lines == [pids_cgroup.proc_line]


TRY_TO_FORK = """
import os
try:
    pid = os.fork()
except BlockingIOError:
    print("fork refused")
else:
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    print("forked")
"""


@pytest.mark.privileged
@pytest.mark.parametrize(
    "isolated, pids_max, outcome",
    [
        # The command alone fills the limit.
        (False, 1, "fork refused"),
        (False, 2, "forked"),
        # Outer and init count too.
        (True, 3, "fork refused"),
        (True, 4, "forked"),
    ],
)
def test_cgroup_limit_applies_from_the_start(
    isolated: bool, pids_max: int, outcome: str, pids_cgroup: JoinedCgroup
) -> None:
    """
    The limit holds from the command's first instruction: with room for no
    more processes than the job already has, its first fork fails.
    """
    if isolated:
        need_namespaces()
    (pids_cgroup.pids_directory / "pids.max").write_text(str(pids_max))
    job = run(
        config(
            [PYTHON, "-I", "-S", "-c", TRY_TO_FORK],
            cgroup_procs=pids_cgroup.procs_files,
            isolate=isolated,
        )
    )
    assert job.stderr == b""
    assert job.stdout_lines() == [outcome]


# -- cost -----------------------------------------------------------------------

HEAVY_MODULES = {"os", "ctypes", "json", "re", "enum", "signal", "subprocess", "socket", "typing"}


def test_helper_imports_little() -> None:
    """
    Every job pays for the helper's imports, in start-up time and memory.
    """
    helper = subprocess.run(
        [
            PYTHON,
            "-I",
            "-S",
            "-X",
            "importtime",
            isolate.__file__,
            json.dumps(config(["true"], isolate=False)),
        ],
        capture_output=True,
        preexec_fn=lambda: os.dup2(1, isolate.STATUS_FD),
        close_fds=False,
        timeout=TIMEOUT,
    )
    imported = {
        line.rpartition("|")[2].strip()
        for line in helper.stderr.decode().splitlines()
        if line.startswith("import time:")
    }
    assert "_ctypes" in imported
    assert imported & HEAVY_MODULES == set()


def test_compiled_helper_brings_its_contract(tmp_path: Path) -> None:
    """
    The bytecode runs from a directory of its own (the state dir), with the
    package nowhere on its path: the contract's bytecode lies beside it.
    """
    helper = isolate.compiled_helper(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contract.pyc", "isolate.pyc"]
    read_end, write_end = os.pipe()
    run = subprocess.run(
        [PYTHON, "-I", "-S", helper, json.dumps({"argv": ["/no/such/command"], "isolate": False})],
        preexec_fn=lambda: os.dup2(write_end, isolate.STATUS_FD),
        close_fds=False,
        capture_output=True,
        cwd="/",
        timeout=30,
    )
    os.close(write_end)
    status = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert run.returncode == isolate.EXIT_NOT_FOUND, run.stderr
    assert status.startswith("failed not_found ")


def test_compiled_helper_runs_jobs(tmp_path: Path) -> None:
    helper = isolate.compiled_helper(str(tmp_path))
    assert helper.endswith(".pyc")
    job = run(config(["echo", "hello"], isolate=False), helper=helper)
    assert job.stdout == b"hello\n"
    assert job.returncode == 0


def job_only_memory(pids: list[int]) -> int:
    """
    Bytes of anonymous memory mapped by C{pids} and no other process: what
    the machine gets back when they exit.

    Counted page by page (a page shared copy-on-write between outer and init
    after their fork counts once; one shared with any other process, not at
    all), which neither USS nor PSS gives.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    mappings: dict[int, int] = {}
    for pid in pids:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            for line in maps:
                fields = line.split()
                start, end = (int(a, 16) for a in fields[0].split("-"))
                if fields[-1] == "[vsyscall]":
                    continue
                pagemap.seek(start // page * 8)
                entries = pagemap.read((end - start) // page * 8)
                for (entry,) in struct.iter_unpack("<Q", entries):
                    # Bit 63: present; bit 61: a file page or shared anonymous.
                    present, anonymous = entry >> 63, not (entry >> 61) & 1
                    if present and anonymous:
                        frame = entry & ((1 << 55) - 1)
                        mappings[frame] = mappings.get(frame, 0) + 1
    owned = 0
    with open("/proc/kpagecount", "rb") as counts:
        for frame, ours in mappings.items():
            counts.seek(frame * 8)
            (total,) = struct.unpack("<Q", counts.read(8))
            owned += total <= ours
    return owned * page


# Outer and init of the unsupervised mode this file drives (the server's
# jobs have one supervisor instead, within 1 MiB: tests/host/test_supervisor.py);
# issue 16's 4 MiB a job.  3.51 MiB measured at c275d42 (the module grew).
HELPER_MEMORY_BUDGET = 4 * 2**20


@pytest.mark.privileged
def test_isolated_job_memory(tmp_path: Path) -> None:
    """
    Outer and init together keep within the helper's memory budget.
    """
    need_namespaces()
    need(os.path.exists("/proc/kpagecount"), "needs /proc/kpagecount")
    helper = isolate.compiled_helper(str(tmp_path))
    with HelperRun(config(unique_sleep()), helper=helper) as job:
        assert job.next_status() == "started"
        with open(f"/proc/{job.pid}/task/{job.pid}/children") as f:
            (init,) = (int(pid) for pid in f.read().split())
        used = job_only_memory([job.pid, init])
    assert used <= HELPER_MEMORY_BUDGET, f"{used / 2**20:.2f} MiB"


def test_a_truncated_compiled_helper_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # On a full disk py_compile can leave a short file in place (its write
    # is unchecked): every job then failed "Bad code object in .pyc file".
    import py_compile

    real = py_compile.compile

    def short_write(source: str, cfile: str, doraise: bool) -> str:
        real(source, cfile=cfile, doraise=doraise)
        if cfile.endswith("isolate.pyc.new"):
            with open(cfile, "r+b") as handle:
                handle.truncate(os.path.getsize(cfile) // 2)
        return cfile

    monkeypatch.setattr(py_compile, "compile", short_write)
    assert isolate.compiled_helper(str(tmp_path)) == isolate.__file__
    assert not (tmp_path / "isolate.pyc").exists()
