"""
End-to-end tests of the life of jobs across the life of the server: what a
shutdown stops, what a restart keeps, what a crash leaves (a job recorded as
C{lost}, and no process), removing jobs, and timeouts.

Processes of a job are found on the host by a marker argument
(C{sleep 1000.NNNN}, unique per test) in C{/proc/*/cmdline}: the job's PID
namespace hides nothing from the host's C{/proc}.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
import uuid
from contextlib import closing

import pytest

from jobworker.protocol import messages as m
from tests.support import start_server


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


@pytest.fixture
def servers(certs, tmp_path):
    """
    Start servers on one state directory; each is stopped (or killed) at the
    end of the test.
    """
    started = []
    state_dir = tmp_path / "state"

    def start_one(*args: str):
        running = start_server(certs, state_dir, "--grace", "1", *args)
        started.append(running)
        return running

    yield start_one
    for running in started:
        running.stop()


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


def test_a_job_running_when_the_server_is_killed_is_lost_after_restart(servers):
    argument = marker()
    try:
        first = servers()
        finished = start(first, "sh", "-c", "echo done; exit 2")
        assert wait(first, finished).exit_code == 2
        running = start(first, "sh", "-c", f"echo before; exec sleep {argument}")
        wait_running(first, running, argument)
        # The server has read the output (output still in the job's pipe
        # when the server dies is lost with it, unavoidably).
        wait_output(first, running, b"before\n")
        first.process.kill()
        first.process.wait()

        second = servers()
        lost = status(second, running)
        assert lost["state"] == "lost", lost
        assert lost["ended_at"] is not None
        # Its output up to the crash is still there.
        assert second.jobcli("logs", running, check=True).stdout == b"before\n"
        # A finished job is as it was.
        kept = status(second, finished)
        assert (kept["state"], kept["exit_code"]) == ("exited", 2)
        assert second.jobcli("logs", finished, check=True).stdout == b"done\n"
        # A lost job is final: waiting on it ends at once, with no job code.
        waited = second.jobcli("wait", running, timeout=10)
        assert waited.returncode == 125
    finally:
        kill_leftovers(argument)


def test_the_processes_of_a_lost_job_are_gone_after_restart(servers):
    argument = marker()
    try:
        first = servers()
        running = start(first, "sleep", argument)
        wait_running(first, running, argument)
        first.process.kill()
        first.process.wait()
        servers()
        assert gone_within(argument, 5), f"sleep {argument} of a lost job outlived the restart"
    finally:
        kill_leftovers(argument)


def test_starting_another_server_leaves_this_servers_jobs_alone(server, certs, tmp_path):
    # Two servers on one host (say, a developer's and the test suite's, or
    # two tenants): the second must not treat the first's jobs as its own
    # stale ones.
    argument = marker()
    try:
        job_id = start(server, "sleep", argument)
        wait_running(server, job_id, argument)
        other = start_server(certs, tmp_path / "other-state")
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
