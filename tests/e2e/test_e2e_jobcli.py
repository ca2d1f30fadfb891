"""
End-to-end tests of the C{jobcli} contract (issue 2, item 7) against a real
C{twistd jobworker} server: what each command prints, and the exit codes that
scripts depend on.

Each test runs the real C{jobcli} console script as a subprocess against the
shared server of C{tests/conftest.py}; jobs are real processes.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import textwrap
import time
import uuid
from contextlib import closing

import pytest

from jobworker.protocol import messages as m
from tests.support import BIN, REPO, free_port

# About jobcli as a program: it runs as one (tests/support.py, JOBCLI_MODE).
pytestmark = pytest.mark.real_jobcli

UUID_LINE = re.compile(rb"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\n\Z")


def start(server, *argv: str, identity: str = "admin", options: tuple[str, ...] = ()) -> str:
    """
    C{jobcli start OPTIONS -- ARGV}; the job id.
    """
    result = server.jobcli("start", *options, "--", *argv, identity=identity, check=True)
    return result.stdout.decode().strip()


def status(server, job_id: str, identity: str = "admin") -> dict:
    return json.loads(server.jobcli("status", "--json", job_id, identity=identity, check=True).stdout)


def wait_for_output(server, job_id: str, expected: bytes, timeout: float = 10) -> None:
    """
    Poll the job's output (through the blocking client, which is cheaper than
    a jobcli process) until its stdout contains C{expected}.
    """
    deadline = time.monotonic() + timeout
    with closing(server.client("admin")) as client:
        while time.monotonic() < deadline:
            stdout = b"".join(
                message.data
                for message in client.follow(uuid.UUID(job_id), follow=False)
                if isinstance(message, m.Output) and message.fd == 1
            )
            if expected in stdout:
                return
            time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not print {expected!r} within {timeout} s")


def octal_escapes(data: bytes) -> str:
    """
    C{data} as a printf(1) format that prints exactly those bytes.
    """
    return "".join(f"\\{byte:03o}" for byte in data)


def one_line(stderr: bytes) -> str:
    """
    Check that C{stderr} is exactly one non-empty line; return it.
    """
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1 and text.strip(), f"not one line: {text!r}"
    return text.strip()


# -- start and run ---------------------------------------------------------------


def test_start_prints_only_the_job_id(server):
    result = server.jobcli("start", "-e", "GREETING=hi there", "--", "sh", "-c", 'printf %s "$GREETING"')
    assert result.returncode == 0, result.stderr
    assert UUID_LINE.match(result.stdout), result.stdout
    assert result.stderr == b""
    job_id = result.stdout.decode().strip()
    assert server.jobcli("wait", job_id).returncode == 0
    # The id is the id of the job that ran the command, with the -e variable.
    assert server.jobcli("logs", job_id, check=True).stdout == b"hi there"
    assert status(server, job_id)["command"] == ["sh", "-c", 'printf %s "$GREETING"']


def test_run_streams_stdout_and_stderr_separately(server):
    script = 'printf "out 1\\n"; printf "err 1\\n" >&2; sleep 0.2; printf "out 2"; printf "err 2" >&2; exit 3'
    result = server.jobcli("run", "--", "sh", "-c", script)
    assert result.stdout == b"out 1\nout 2"
    assert result.stderr == b"err 1\nerr 2"
    assert result.returncode == 3


@pytest.mark.parametrize(
    "argv, code",
    [
        (("sh", "-c", "exit 0"), 0),
        (("sh", "-c", "exit 255"), 255),
        # $$ is the shell; inside the job's PID namespace it is not pid 1,
        # so the signal is not ignored as init's would be.
        (("sh", "-c", "kill -TERM $$"), 128 + signal.SIGTERM),
        (("sh", "-c", "kill -KILL $$"), 128 + signal.SIGKILL),
        (("sh", "-c", "kill -USR1 $$"), 128 + signal.SIGUSR1),
    ],
    ids=["exit-0", "exit-255", "sigterm", "sigkill", "sigusr1"],
)
def test_run_exits_with_the_jobs_code(server, argv, code):
    result = server.jobcli("run", "--", *argv)
    assert result.returncode == code, result.stderr


def test_run_command_not_found_exits_127(server):
    result = server.jobcli("run", "--", "no-such-command-e2e")
    assert result.returncode == 127
    assert result.stdout == b""
    assert "no-such-command-e2e" in one_line(result.stderr)


def test_run_command_not_executable_exits_126(server):
    result = server.jobcli("run", "--", "/etc/passwd")
    assert result.returncode == 126
    assert result.stdout == b""
    assert "/etc/passwd" in one_line(result.stderr)


def test_run_against_an_unreachable_server_exits_125(server):
    port = free_port()  # nothing listens there
    result = server.jobcli("--server", f"127.0.0.1:{port}", "run", "--", "true")
    assert result.returncode == 125
    assert result.stdout == b""
    assert str(port) in one_line(result.stderr)


def test_job_environment_is_minimal_plus_requested(server, monkeypatch):
    # In jobcli's environment; the server's own environment (that of this
    # test process when it started) is covered by the exact key set below.
    monkeypatch.setenv("JOBWORKER_E2E_LEAK", "must not reach the job")
    result = server.jobcli("run", "-e", "E2E_ONE=a b=c", "-e", "E2E_TWO=", "--", "env", "-0")
    assert result.returncode == 0, result.stderr
    environment = dict(item.split("=", 1) for item in result.stdout.decode().split("\0") if item)
    assert set(environment) == {"PATH", "HOME", "LANG", "E2E_ONE", "E2E_TWO"}
    assert environment["E2E_ONE"] == "a b=c"
    assert environment["E2E_TWO"] == ""
    assert environment["PATH"] and environment["LANG"] and environment["HOME"].startswith("/")


# -- stop ------------------------------------------------------------------------


def test_stop_a_job_that_exits_on_sigterm(server):
    job_id = start(server, "sh", "-c", 'trap "echo terminated; exit 0" TERM; echo ready; while :; do sleep 0.05; done')
    wait_for_output(server, job_id, b"ready\n")
    began = time.monotonic()
    stopped = server.jobcli("stop", "--grace", "8", job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == b""
    assert server.jobcli("wait", job_id).returncode == 0
    # It went on SIGTERM, well before the grace period's SIGKILL.
    assert time.monotonic() - began < 5
    final = status(server, job_id)
    assert final["state"] == "stopped"
    assert final["exit_code"] == 0 and final["signal"] is None
    assert b"terminated\n" in server.jobcli("logs", job_id, check=True).stdout


def test_stop_kills_a_job_ignoring_sigterm_after_the_grace(server):
    job_id = start(server, "sh", "-c", 'trap "" TERM; echo ready; while :; do sleep 0.05; done')
    wait_for_output(server, job_id, b"ready\n")
    began = time.monotonic()
    assert server.jobcli("stop", "--grace", "1.5", job_id).returncode == 0
    assert server.jobcli("wait", job_id).returncode == 128 + signal.SIGKILL
    elapsed = time.monotonic() - began
    assert 1.3 <= elapsed < 5, elapsed
    final = status(server, job_id)
    assert final["state"] == "stopped"
    assert final["signal"] == signal.SIGKILL and final["exit_code"] is None


def test_stop_force_kills_at_once(server):
    job_id = start(server, "sh", "-c", 'trap "" TERM; echo ready; while :; do sleep 0.05; done')
    wait_for_output(server, job_id, b"ready\n")
    began = time.monotonic()
    assert server.jobcli("stop", "--force", job_id).returncode == 0
    assert server.jobcli("wait", job_id).returncode == 128 + signal.SIGKILL
    # The default grace is 10 s: --force must not wait for it.
    assert time.monotonic() - began < 3
    final = status(server, job_id)
    assert final["state"] == "stopped" and final["signal"] == signal.SIGKILL


# -- status ----------------------------------------------------------------------

STATUS_KEYS = {"id", "owner", "command", "state", "exit_code", "signal", "started_at", "ended_at", "error"}


def test_status_json_of_a_running_then_finished_job(server):
    job_id = start(server, "sh", "-c", "echo ready; sleep 30", identity="alice")
    wait_for_output(server, job_id, b"ready\n")
    running = status(server, job_id)
    assert STATUS_KEYS <= set(running)
    assert running["id"] == job_id
    assert running["owner"] == "alice"
    assert running["command"] == ["sh", "-c", "echo ready; sleep 30"]
    assert running["state"] == "running"
    assert running["exit_code"] is None and running["signal"] is None and running["ended_at"] is None
    assert running["error"] is None
    assert isinstance(running["started_at"], (int, float)) and abs(running["started_at"] - time.time()) < 60

    assert server.jobcli("stop", "--grace", "5", job_id).returncode == 0
    assert server.jobcli("wait", job_id).returncode == 128 + signal.SIGTERM
    final = status(server, job_id)
    assert final["state"] == "stopped" and final["signal"] == signal.SIGTERM
    assert final["started_at"] == running["started_at"]
    assert final["started_at"] <= final["ended_at"] <= time.time() + 1


def test_status_json_of_a_job_that_could_not_start(server):
    result = server.jobcli("start", "--", "no-such-command-e2e")
    assert result.returncode == 1 and result.stdout == b""
    one_line(result.stderr)
    failed = [job for job in json.loads(server.jobcli("list", "--json", check=True).stdout) if job["command"] == ["no-such-command-e2e"]]
    assert failed, "a job that could not start is not listed"
    record = failed[-1]
    assert record["state"] == "failed"
    assert isinstance(record["error"], str) and record["error"]
    assert record["exit_code"] == 127


def test_status_text_names_the_job(server):
    job_id = start(server, "sh", "-c", "exit 6")
    assert server.jobcli("wait", job_id).returncode == 6
    result = server.jobcli("status", job_id)
    assert result.returncode == 0 and result.stderr == b""
    text = result.stdout.decode()
    assert job_id in text and "exited" in text and "6" in text


# -- logs ------------------------------------------------------------------------


def test_logs_are_binary_safe_on_both_streams(server):
    rng = random.Random(2)
    # Every byte value, NUL and bytes that are not UTF-8 included, in a
    # random order; each stream gets its own.
    out_chunk = bytes(range(256)) + rng.randbytes(6 * 1024) + b"\0\xff\xfe\xc3\x28"
    err_chunk = bytes(range(255, -1, -1)) + rng.randbytes(5 * 1024) + b"\x80\0"
    repeats = 24  # ~150 KiB per stream, interleaved, in many writes
    script = 'i=0; while [ $i -lt $3 ]; do printf "$1"; printf "$2" >&2; i=$((i+1)); done'
    argv = ("sh", "-c", script, "sh", octal_escapes(out_chunk), octal_escapes(err_chunk), str(repeats))

    ran = server.jobcli("run", "--", *argv)
    assert ran.returncode == 0, ran.stderr[-500:]
    assert ran.stdout == out_chunk * repeats
    assert ran.stderr == err_chunk * repeats

    job_id = start(server, *argv)
    assert server.jobcli("wait", job_id).returncode == 0
    logs = server.jobcli("logs", job_id)
    assert logs.returncode == 0
    assert logs.stdout == out_chunk * repeats
    assert logs.stderr == err_chunk * repeats


def test_logs_follow_streams_until_the_end_and_exits_with_the_code(server):
    job_id = start(server, "sh", "-c", "echo first; sleep 1; echo second >&2; sleep 0.5; echo third; exit 5")
    began = time.monotonic()
    followed = server.jobcli("logs", "-f", job_id)
    assert followed.returncode == 5
    assert followed.stdout == b"first\nthird\n"
    assert followed.stderr == b"second\n"
    # It did follow: the job took 1.5 s to print everything.
    assert time.monotonic() - began >= 1.2


def test_logs_without_follow_returns_what_exists_now(server):
    job_id = start(server, "sh", "-c", "echo early; sleep 30")
    try:
        wait_for_output(server, job_id, b"early\n")
        began = time.monotonic()
        now = server.jobcli("logs", job_id)
        assert time.monotonic() - began < 5
        assert now.returncode == 0
        assert now.stdout == b"early\n"
        assert status(server, job_id)["state"] == "running"
    finally:
        server.jobcli("stop", "--force", job_id)


def test_logs_since_offset_resumes(server):
    job_id = start(server, "printf", "0123456789abcdef")
    assert server.jobcli("wait", job_id).returncode == 0
    assert server.jobcli("logs", job_id, check=True).stdout == b"0123456789abcdef"
    assert server.jobcli("logs", "--since-offset", "10", job_id, check=True).stdout == b"abcdef"
    assert server.jobcli("logs", "--since-offset", "16", job_id, check=True).stdout == b""
    followed = server.jobcli("logs", "-f", "--since-offset", "3", job_id)
    assert followed.returncode == 0 and followed.stdout == b"3456789abcdef"


# -- wait and list ---------------------------------------------------------------


def test_wait_exits_with_the_jobs_code(server):
    exited = start(server, "sh", "-c", "sleep 2; exit 7")
    signaled = start(server, "sh", "-c", "sleep 0.5; kill -TERM $$")
    began = time.monotonic()
    result = server.jobcli("wait", exited)
    assert result.returncode == 7
    assert result.stdout == b"" and result.stderr == b""
    assert time.monotonic() - began >= 0.2  # it waited for the job
    assert server.jobcli("wait", signaled).returncode == 128 + signal.SIGTERM
    # A finished job answers at once, with the same code.
    assert server.jobcli("wait", exited).returncode == 7


def test_list_shows_jobs(server):
    job_id = start(server, "sh", "-c", "exit 9", identity="bob")
    assert server.jobcli("wait", job_id).returncode == 9
    listed = json.loads(server.jobcli("list", "--json", check=True).stdout)
    assert isinstance(listed, list)
    mine = [job for job in listed if job["id"] == job_id]
    assert len(mine) == 1
    assert mine[0]["owner"] == "bob"
    assert mine[0]["state"] == "exited" and mine[0]["exit_code"] == 9
    assert mine[0]["command"] == ["sh", "-c", "exit 9"]
    text = server.jobcli("list", check=True).stdout.decode()
    # The table shows short ids (12 hex digits, as docker's).
    line = next((line for line in text.splitlines() if line.startswith(uuid.UUID(job_id).hex[:12] + " ")), None)
    assert line is not None, text
    assert "bob" in line and "exited" in line


# -- errors of the other commands ----------------------------------------------------


@pytest.mark.parametrize("command", [("status",), ("status", "--json"), ("logs",), ("stop",), ("rm",)])
def test_other_commands_fail_with_exit_1_and_one_line(server, command):
    missing = str(uuid.uuid4())
    result = server.jobcli(*command, missing)
    assert result.returncode == 1
    assert result.stdout == b""
    assert missing in one_line(result.stderr)


def test_a_malformed_job_id_is_one_line_error(server):
    result = server.jobcli("status", "not-a-job-id")
    assert result.returncode == 1
    assert result.stdout == b""
    assert "not-a-job-id" in one_line(result.stderr)


# -- start-up cost ---------------------------------------------------------------

# Runs jobcli's main() in a fresh interpreter, then reports which modules it
# loaded.  The second report, after importing the reactor on purpose, shows
# that the check can see a reactor when there is one.
_REACTOR_PROBE = textwrap.dedent(
    """
    import json, sys
    from jobworker import cli
    code = cli.main(sys.argv[1:])
    sys.stdout.flush()
    before = "twisted.internet.reactor" in sys.modules
    from twisted.internet import reactor
    after = "twisted.internet.reactor" in sys.modules
    sys.stderr.write(json.dumps({"code": code, "before": before, "after": after}) + "\\n")
    """
)


def test_status_does_not_import_the_reactor(server):
    job_id = start(server, "true")
    assert server.jobcli("wait", job_id).returncode == 0
    result = subprocess.run(
        [str(BIN / "python"), "-c", _REACTOR_PROBE, "status", "--json", job_id],
        env=server.env("viewer"),
        cwd=str(REPO),
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    report = json.loads(result.stderr.decode().strip().splitlines()[-1])
    # The status really was fetched: main() did its whole job.
    assert report["code"] == 0, result.stderr
    assert json.loads(result.stdout)["id"] == job_id
    assert report["after"] is True
    assert report["before"] is False, "jobcli status imported twisted.internet.reactor"
