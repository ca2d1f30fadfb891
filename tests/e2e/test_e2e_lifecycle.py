"""
End-to-end tests of the life of jobs across the life of the server: what a
shutdown stops, what a restart keeps, what a crash leaves (a job recorded as
C{lost}, and no process), removing jobs, and timeouts.

Processes of a job are found on the host by a marker argument
(C{sleep 1000.NNNN}, unique per test) in C{/proc/*/cmdline}: the job's PID
namespace hides nothing from the host's C{/proc}.

Every test runs against three kinds of server (the C{mode} fixture): the
default one (root, namespaces, cgroups), one started with C{--no-isolation
--cgroups none}, and one running as an unprivileged user (C{nobody}), which
the README documents as a way to run jobworker and which has neither
namespaces nor cgroups: jobs are then signalled through their process group.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobworker.protocol import messages as m
from tests.support import need, need_root, start_server


def marker() -> str:
    """
    A sleep duration that no other process on the host has as an argument.
    """
    return f"1000.{random.randrange(10**8):08d}1"


def processes_with(argument: str) -> list[int]:
    """
    Pids of the processes that have C{argument} as one of their arguments.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                arguments = file.read().split(b"\0")
        except OSError:
            continue
        if argument.encode() in arguments[1:]:
            found.append(int(entry))
    return found


def gone_within(argument: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while processes_with(argument):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def kill_leftovers(argument: str) -> None:
    """
    Kill what a failed test left behind, so that it does not outlive the run.
    """
    for pid in processes_with(argument):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_running(server, job_id: str, argument: str, timeout: float = 10) -> None:
    """
    Wait until the job's C{sleep ARGUMENT} process exists.
    """
    deadline = time.monotonic() + timeout
    while not processes_with(argument):
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id}: no process with {argument} after {timeout} s")
        time.sleep(0.05)


def wait_output(server, job_id: str, expected: bytes, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    with closing(server.client("admin")) as client:
        while client.status(uuid.UUID(job_id)).output_bytes < len(expected):
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: no output after {timeout} s")
            time.sleep(0.02)


def octal(data: bytes) -> str:
    """
    C{data} as a printf(1) format that prints exactly those bytes.
    """
    return "".join(f"\\{byte:03o}" for byte in data)


def status(server, job_id: str) -> dict:
    return json.loads(server.jobcli("status", "--json", job_id, check=True).stdout)


def start(server, *argv: str) -> str:
    with closing(server.client("admin")) as client:
        return str(client.start(list(argv)))


def wait(server, job_id: str) -> m.JobStatus:
    with closing(server.client("admin")) as client:
        return client.wait(uuid.UUID(job_id))


@dataclass(frozen=True)
class ServerMode:
    """
    How the servers of a test run: extra options, and the user they run as
    (None: the test's own, root on CI).
    """

    name: str
    args: tuple[str, ...] = ()
    user: str | None = None


MODES = [
    ServerMode("isolated"),
    ServerMode("no-isolation", ("--no-isolation", "--cgroups", "none")),
    ServerMode("unprivileged", user="nobody"),
]


@pytest.fixture(scope="module", params=MODES, ids=lambda mode: mode.name)
def launch(request, certs, tmp_path_factory):
    """
    A function C{launch(name, *args)} that starts a server of this module's
    mode on the state directory C{name} (the same name, the same state).

    An unprivileged server gets a copy of the certificates and state
    directories that it owns, in a directory of its own under /tmp (pytest's
    temporary directories are private to root).
    """
    mode: ServerMode = request.param
    if mode.user is None:
        base = tmp_path_factory.mktemp(mode.name)
        server_certs = certs
    else:
        need_root()
        need(shutil.which("setpriv") is not None, "needs setpriv (util-linux) to drop to an unprivileged user")
        entry = pwd.getpwnam(mode.user)
        base = Path(tempfile.mkdtemp(prefix="jobworker-unprivileged-"))
        base.chmod(0o755)
        server_certs = base / "certs"
        shutil.copytree(certs, server_certs)
        for path in (server_certs, *server_certs.iterdir()):
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start_one(name: str, *args: str):
        state_dir = base / name
        if mode.user is not None and not state_dir.exists():
            state_dir.mkdir(mode=0o700)
            os.chown(state_dir, entry.pw_uid, entry.pw_gid)
        return start_server(server_certs, state_dir, *mode.args, *args, user=mode.user)

    start_one.mode = mode
    yield start_one
    if mode.user is not None:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def server(launch):
    """
    One server of this module's mode, shared by the tests that need no
    special options.
    """
    running = launch("shared")
    yield running
    running.stop()


@pytest.fixture
def servers(launch):
    """
    Start servers on one state directory; each is stopped (or killed) at the
    end of the test.
    """
    started = []
    name = f"state-{uuid.uuid4().hex[:12]}"

    def start_one(*args: str):
        running = launch(name, "--grace", "1", *args)
        started.append(running)
        return running

    yield start_one
    for running in started:
        running.stop()


# -- the simplest jobs --------------------------------------------------------------


def test_run_prints_and_exits_in_every_mode(server):
    # Without cgroups the end of a job was never noticed (a TypeError in
    # processEnded): `run` hung and the job stayed running.
    for attempt in range(6):
        result = server.jobcli("run", "--", "python3", "-c", 'print("x")', timeout=20)
        assert (result.returncode, result.stdout, result.stderr) == (0, b"x\n", b""), attempt
    assert "Traceback" not in server.log()


def test_stop_force_ends_a_running_job(server, launch):
    argument = marker()
    try:
        job_id = start(server, "sh", "-c", f'trap "" TERM; sleep {argument}')
        wait_running(server, job_id, argument)
        if launch.mode.user is not None:
            # The server really is unprivileged: so are its jobs.
            (pid,) = processes_with(argument)
            assert os.stat(f"/proc/{pid}").st_uid == pwd.getpwnam(launch.mode.user).pw_uid
            assert status(server, job_id)["user"] == launch.mode.user
        stopped = server.jobcli("stop", "--force", job_id, timeout=20)
        assert stopped.returncode == 0, stopped.stderr
        final = wait(server, job_id)
        assert final.state is m.JobState.STOPPED, final
        assert final.signal == signal.SIGKILL
        assert gone_within(argument, 5), f"sleep {argument} outlived stop --force"
    finally:
        kill_leftovers(argument)


# -- shutdown --------------------------------------------------------------------------


def test_sigterm_stops_running_jobs_and_the_server_exits(servers):
    polite, stubborn = marker(), marker()
    try:
        server = servers()
        polite_id = start(server, "sleep", polite)
        # Ignores SIGTERM (sleep inherits the ignored disposition): only the
        # SIGKILL after the grace period ends it.
        stubborn_id = start(server, "sh", "-c", f'trap "" TERM; sleep {stubborn}; echo survived')
        wait_running(server, polite_id, polite)
        wait_running(server, stubborn_id, stubborn)

        began = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not exit within 20 s of SIGTERM")
        # twistd ends by re-raising the signal it shut down on.
        assert code in (0, -signal.SIGTERM), server.log()[-3000:]
        assert time.monotonic() - began < 10
        assert gone_within(polite, 2), f"sleep {polite} outlived the server"
        assert gone_within(stubborn, 2), f"sleep {stubborn} (ignoring SIGTERM) outlived the server"

        # The shutdown was recorded: the jobs were stopped, not lost.
        restarted = servers()
        for job_id, signum in ((polite_id, signal.SIGTERM), (stubborn_id, signal.SIGKILL)):
            record = status(restarted, job_id)
            assert record["state"] == "stopped", record
            assert record["signal"] == signum, record
    finally:
        kill_leftovers(polite)
        kill_leftovers(stubborn)


# -- restart and crash -------------------------------------------------------------


def test_finished_jobs_survive_a_restart(servers):
    first = servers()
    out = bytes(range(256)) * 8 + b"\0end"
    err = bytes(range(255, -1, -1)) * 4
    script = 'printf "$1"; printf "$2" >&2; exit 3'
    job_id = start(first, "sh", "-c", script, "sh", octal(out), octal(err))
    assert wait(first, job_id).exit_code == 3
    before = first.jobcli("logs", job_id)
    assert (before.stdout, before.stderr) == (out, err)
    record = status(first, job_id)
    assert first.stop() in (0, -signal.SIGTERM)

    second = servers()
    listed = {job["id"]: job for job in json.loads(second.jobcli("list", "--json", check=True).stdout)}
    assert job_id in listed
    after = second.jobcli("logs", job_id)
    assert after.returncode == 0
    assert (after.stdout, after.stderr) == (out, err)
    again = status(second, job_id)
    for key in ("id", "owner", "command", "state", "exit_code", "signal", "started_at", "ended_at", "error"):
        assert again[key] == record[key], key
    assert second.jobcli("wait", job_id).returncode == 3
    followed = second.jobcli("logs", "-f", job_id)
    assert (followed.returncode, followed.stdout, followed.stderr) == (3, out, err)


def _supervised(server, job_id: str) -> bool:
    """
    Whether the job has a supervisor that outlives the server (an isolated
    job does; a direct one, the server's own child, dies with it).
    """
    record = json.loads((server.state_dir / "jobs" / f"{job_id}.json").read_text())
    return "supervisor" in record


def test_a_job_running_when_the_server_is_killed_is_taken_back_or_lost(servers):
    # An isolated job's supervisor outlives the server: the next server
    # takes the job back.  A direct job dies with the server: lost.
    argument = marker()
    try:
        first = servers()
        finished = start(first, "sh", "-c", "echo done; exit 2")
        assert wait(first, finished).exit_code == 2
        running = start(first, "sh", "-c", f"echo before; exec sleep {argument}")
        wait_running(first, running, argument)
        wait_output(first, running, b"before\n")
        supervised = _supervised(first, running)
        first.process.kill()
        first.process.wait()

        second = servers()
        again = status(second, running)
        # Its output up to the crash is still there.
        assert second.jobcli("logs", running, check=True).stdout == b"before\n"
        # A finished job is as it was.
        kept = status(second, finished)
        assert (kept["state"], kept["exit_code"]) == ("exited", 2)
        assert second.jobcli("logs", finished, check=True).stdout == b"done\n"
        if supervised:
            assert again["state"] == "running", again
            assert processes_with(argument), "the job died with the server"
            assert second.jobcli("stop", running).returncode == 0
            waited = second.jobcli("wait", running, timeout=10)
            assert waited.returncode == 128 + 15 or status(second, running)["state"] == "stopped"
            assert gone_within(argument, 5), "a stop of a job taken back left its processes"
        else:
            assert again["state"] == "lost", again
            assert again["ended_at"] is not None
            # A lost job is final: waiting on it ends at once, with no job code.
            waited = second.jobcli("wait", running, timeout=10)
            assert waited.returncode == 125
    finally:
        kill_leftovers(argument)


def test_the_processes_of_a_lost_job_are_gone_after_restart(servers):
    # A direct job dies with its server; a supervised one is lost only when
    # its supervisor dies (tests/e2e/test_e2e_live_restore.py): either way,
    # none of its processes outlives it.
    argument = marker()
    try:
        first = servers()
        running = start(first, "sleep", argument)
        wait_running(first, running, argument)
        supervised = _supervised(first, running)
        first.process.kill()
        first.process.wait()
        second = servers()
        if supervised:
            assert status(second, running)["state"] == "running"
            assert second.jobcli("stop", "--force", running).returncode == 0
        assert gone_within(argument, 5), f"sleep {argument} of a lost job outlived the restart"
    finally:
        kill_leftovers(argument)


def test_starting_another_server_leaves_this_servers_jobs_alone(server, launch):
    # Two servers on one host (say, a developer's and the test suite's, or
    # two tenants): the second must not treat the first's jobs as its own
    # stale ones.
    argument = marker()
    try:
        job_id = start(server, "sleep", argument)
        wait_running(server, job_id, argument)
        other = launch("other-state")
        try:
            time.sleep(0.5)
        finally:
            other.stop()
        assert processes_with(argument), "starting another server killed this server's job"
        assert status(server, job_id)["state"] == "running"
    finally:
        with closing(server.client("admin")) as client:
            client.stop(uuid.UUID(job_id), force=True)
        kill_leftovers(argument)


# -- rm and timeouts ----------------------------------------------------------------------


def test_rm_removes_a_finished_job(server):
    job_id = start(server, "sh", "-c", "echo bye")
    wait(server, job_id)
    removed = server.jobcli("rm", job_id)
    assert (removed.returncode, removed.stdout, removed.stderr) == (0, b"", b"")
    for command in (("status",), ("logs",)):
        gone = server.jobcli(*command, job_id)
        assert gone.returncode == 1
        assert job_id.encode() in gone.stderr
    assert job_id not in server.jobcli("list", check=True).stdout.decode()
    again = server.jobcli("rm", job_id)
    assert again.returncode == 1


def test_rm_refuses_a_running_job(server):
    argument = marker()
    job_id = start(server, "sleep", argument)
    try:
        wait_running(server, job_id, argument)
        refused = server.jobcli("rm", job_id)
        assert refused.returncode == 1 and refused.stdout == b""
        assert refused.stderr.count(b"\n") == 1
        assert status(server, job_id)["state"] == "running"
        assert processes_with(argument)
    finally:
        with closing(server.client("admin")) as client:
            client.stop(uuid.UUID(job_id), force=True)
            client.wait(uuid.UUID(job_id))
        kill_leftovers(argument)
    assert server.jobcli("rm", job_id).returncode == 0


def test_timeout_ends_a_job_in_state_timeout(server):
    argument = marker()
    try:
        began = time.monotonic()
        job_id = server.jobcli("start", "--timeout", "1s", "--", "sleep", argument, check=True).stdout.decode().strip()
        code = server.jobcli("wait", job_id).returncode
        elapsed = time.monotonic() - began
        assert 0.8 <= elapsed < 6, elapsed
        assert code == 128 + signal.SIGTERM
        record = status(server, job_id)
        assert record["state"] == "timeout", record
        assert record["error"]
        assert not processes_with(argument)
    finally:
        kill_leftovers(argument)


def test_run_with_timeout_exits_like_the_killed_job(server):
    result = server.jobcli("run", "--timeout", "1s", "--", "sh", "-c", "echo tick; sleep 30")
    assert result.returncode == 128 + signal.SIGTERM
    assert result.stdout == b"tick\n"


# -- background children (hostile pass of issue 10) ---------------------------------


def test_a_job_whose_background_child_holds_its_output_ends_with_its_command(server):
    # The command exits; the child it left in the background (same process
    # group, no cgroup in some modes) still holds stdout: the job must end
    # anyway, with nothing left behind.
    child = marker()
    try:
        began = time.monotonic()
        result = server.jobcli("run", "--", "sh", "-c", f"sleep {child} & echo parent; exit 4", timeout=20)
        assert (result.returncode, result.stdout) == (4, b"parent\n"), result.stderr
        assert time.monotonic() - began < 8
        assert gone_within(child, 5), f"sleep {child} outlived its job"
    finally:
        kill_leftovers(child)


def test_stop_and_timeout_end_every_process_of_a_job(server):
    stopped_child, timed_child = marker(), marker()
    try:
        stopped = start(server, "sh", "-c", f"sleep {stopped_child} & wait")
        wait_running(server, stopped, stopped_child)
        assert server.jobcli("stop", "--grace", "1", stopped, timeout=20).returncode == 0
        assert wait(server, stopped).state is m.JobState.STOPPED
        assert gone_within(stopped_child, 5), f"sleep {stopped_child} outlived stop"
        timed = server.jobcli(
            "start", "--timeout", "1s", "--", "sh", "-c", f"sleep {timed_child} & wait", check=True
        ).stdout.decode().strip()
        assert wait(server, timed).state is m.JobState.TIMEOUT
        assert gone_within(timed_child, 5), f"sleep {timed_child} outlived the timeout"
    finally:
        kill_leftovers(stopped_child)
        kill_leftovers(timed_child)
