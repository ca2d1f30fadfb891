"""
End-to-end tests of C{jobcli} for daily use (issue 13): named servers from
the client config file, docker-grade conventions (stop waits, short ids,
rm -f, list), logs --tail and stream selection, messages, and several
servers at once.

Each test runs the real C{jobcli} console script against real servers, in
an environment without the C{JOBWORKER_*} variables of the other e2e tests
unless a test sets them, and from a directory without C{./certs}.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support import BIN, free_port, make_pki, start_server

# About jobcli as a program: it runs as one (tests/support.py, JOBCLI_MODE).
pytestmark = pytest.mark.real_jobcli

UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Home:
    """
    A user's home for jobcli: a clean environment, an XDG config dir and a
    working directory without ./certs.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config_dir = root / "xdg" / "jobworker"
        self.config_dir.mkdir(parents=True)
        self.cwd = root / "cwd"
        self.cwd.mkdir()
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("JOBWORKER_")}
        self.env["XDG_CONFIG_HOME"] = str(root / "xdg")
        self.env["HOME"] = str(root)

    def write_config(self, text: str) -> Path:
        path = self.config_dir / "config.toml"
        path.write_text(text)
        return path

    def jobcli(self, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "jobcli"), *args],
            env={**self.env, **(env or {})},
            cwd=str(self.cwd),
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )

    def ok(self, *args: str, **kwargs) -> str:
        result = self.jobcli(*args, **kwargs)
        assert result.returncode == 0, (args, result.returncode, result.stderr.decode())
        return result.stdout.decode()


@pytest.fixture
def home(tmp_path: Path, certs: Path, server) -> Home:
    """
    A home whose config file names the shared server C{lab} (the default,
    credentials of alice through [defaults], as paths relative to the file)
    and C{ops} (the same server, as admin, with its own key paths).
    """
    home = Home(tmp_path)
    pki = home.config_dir / "pki"
    shutil.copytree(certs, pki)
    home.write_config(
        f"""
default = "lab"

[defaults]
ca = "pki/ca.pem"
cert = "pki/alice.pem"
key = "pki/alice.key"

[servers.lab]
address = "{server.address}"

[servers.ops]
address = "{server.address}"
cert = "pki/admin.pem"
key = "pki/admin.key"
"""
    )
    return home


def start_job(home: Home, *argv: str, server: str = "ops") -> str:
    return home.ok("--server", server, "start", "--", *argv).strip()


def job_status(home: Home, job_id: str, server: str = "ops") -> dict:
    return json.loads(home.ok("--server", server, "status", "--json", job_id))


def wait_for_state(home: Home, job_id: str, state: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job_status(home, job_id)["state"] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not {state} within {timeout} s")


def wait_for_output(home: Home, job_id: str, expected: bytes, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expected in home.jobcli("--server", "ops", "logs", job_id).stdout:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not print {expected!r}")


# -- 1. named servers ------------------------------------------------------------------


def test_the_default_server_of_the_config_file_with_relative_paths(home):
    # No flag, no environment, no ./certs: the file's default and its
    # [defaults] credentials, resolved next to the file.
    assert home.ok("whoami").startswith("alice (user) on ")
    assert json.loads(home.ok("whoami", "--json"))["identity"] == "alice"


def test_server_flag_and_env_pick_a_named_server(home):
    assert home.ok("--server", "ops", "whoami").startswith("admin (admin) on ")
    assert home.ok("whoami", env={"JOBWORKER_SERVER": "ops"}).startswith("admin (admin) on ")
    # The flag wins over the environment.
    assert home.ok("--server", "lab", "whoami", env={"JOBWORKER_SERVER": "ops"}).startswith("alice (user) on ")


def test_flags_and_env_override_the_files_credentials(home, certs):
    bob = ["--cert", str(certs / "bob.pem"), "--key", str(certs / "bob.key")]
    assert home.ok("--server", "ops", *bob, "whoami").startswith("bob (user) on ")
    viewer = {"JOBWORKER_CERT": str(certs / "viewer.pem"), "JOBWORKER_KEY": str(certs / "viewer.key")}
    assert home.ok("--server", "ops", "whoami", env=viewer).startswith("viewer (viewer) on ")


def test_without_a_config_file_the_environment_works_as_before(home, server):
    (home.config_dir / "config.toml").unlink()
    result = home.jobcli("whoami", env=server.env("bob"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().startswith("bob (user) on ")
    # And without anything: localhost:8443 with ./certs, which is not here.
    bare = home.jobcli("whoami")
    assert bare.returncode == 1
    assert bare.stderr.decode() == "jobcli: cannot read certs/ca.pem: No such file or directory\n"


def test_jobcli_config_says_what_is_used_and_why(home, server):
    config = home.config_dir / "config.toml"
    pki = home.config_dir / "pki"
    text = home.ok("config")
    assert text.splitlines() == [
        f"config file: {config}",
        "server:      lab (from the config file)",
        f"address:     {server.address}  [server lab in {config} (chosen by default in {config})]",
        f"ca:          {pki / 'ca.pem'}  [[defaults] in {config}]",
        f"cert:        {pki / 'alice.pem'}  [[defaults] in {config}]",
        f"key:         {pki / 'alice.key'}  [[defaults] in {config}]",
        text.splitlines()[-1],
    ]
    assert re.fullmatch(r"identity:    alice \(role user\), certificate valid until .+ GMT", text.splitlines()[-1])
    data = json.loads(home.ok("--server", "ops", "--ca", "/x/ca.pem", "config", "--json"))
    assert data["server"] == "ops" and data["configured"] is True
    assert data["ca"] == {"value": "/x/ca.pem", "source": "--ca"}
    assert data["cert"] == {"value": str(pki / "admin.pem"), "source": f"server ops in {config}"}
    assert data["certificate"]["identity"] == "admin" and data["certificate"]["role"] == "admin"
    # An address that is not a name of the file is an address.
    plain = json.loads(home.ok("config", "--json", env={"JOBWORKER_SERVER": "10.9.9.9:1"}))
    assert plain["address"] == {"value": "10.9.9.9:1", "source": "$JOBWORKER_SERVER"} and plain["configured"] is False


def test_jobworker_config_names_another_file(home, server, certs, tmp_path):
    other = tmp_path / "elsewhere.toml"
    other.write_text(f'default = "x"\n[servers.x]\naddress = "{server.address}"\nca = "{certs}/ca.pem"\ncert = "{certs}/bob.pem"\nkey = "{certs}/bob.key"\n')
    assert home.ok("whoami", env={"JOBWORKER_CONFIG": str(other)}).startswith("bob (user) on ")


@pytest.mark.parametrize(
    "text, message",
    [
        ('default = "nope"\n', "default 'nope' names no [servers.nope] table"),
        ('[servers.a]\naddress = "h:1"\ncerts = "x"\n', "unknown key servers.a.certs (known: address, ca, cert, key)"),
        ("[servers.a]\nca = 'x'\n", "servers.a has no address"),
        ("servers = 3\n", "servers must be a table of [servers.NAME] tables"),
        ("[servers.a\n", "is not valid TOML"),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_file(home, text, message):
    path = home.write_config(text)
    result = home.jobcli("whoami")
    assert result.returncode == 1 and result.stdout == b""
    line = result.stderr.decode()
    assert line.count("\n") == 1 and line.startswith(f"jobcli: {path}")
    assert message in line


def test_the_library_uses_the_config_file(home, server):
    from jobworker.blocking import BlockingClient

    path = home.config_dir / "config.toml"
    with BlockingClient.from_config("ops", config_path=str(path)) as client:
        assert client.hello.identity == "admin"
        job_id = client.start(["true"])
        # Ids as strings, and prefixes, work as well as UUIDs.
        assert client.wait(str(job_id)).state.label == "exited"
        assert client.resolve_job_id(job_id.hex[:8]) == job_id
        client.remove(str(job_id))


def test_the_twisted_client_uses_the_config_file(home):
    probe = (
        "import sys\n"
        "from twisted.internet import task, defer\n"
        "from jobworker.client import connect_configured\n"
        "async def main(reactor):\n"
        "    client = await connect_configured(reactor, 'lab', config_path=sys.argv[1])\n"
        "    status = await client.wait(str(await client.start(['true'])))\n"
        "    sleeper = await client.start(['sleep', '30'])\n"
        "    await client.signal(str(sleeper), 10)\n"
        "    signaled = await client.wait(sleeper)\n"
        "    print(signaled.state.label, signaled.signal, status.state.label)\n"
        "    await client.close()\n"
        "task.react(lambda reactor: defer.ensureDeferred(main(reactor)))\n"
    )
    result = subprocess.run(
        [str(BIN / "python"), "-c", probe, str(home.config_dir / "config.toml")],
        env=home.env, cwd=str(home.cwd), capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode().split() == ["signaled", "10", "exited"]


# -- 2. conventions ----------------------------------------------------------------------


def test_stop_waits_until_the_job_has_ended(home):
    # The job takes 1 s to go after SIGTERM: stop must not return before.
    job_id = start_job(home, "sh", "-c", 'trap "sleep 1; exit 0" TERM; echo ready; while :; do sleep 0.05; done')
    wait_for_output(home, job_id, b"ready\n")
    began = time.monotonic()
    stopped = home.jobcli("--server", "ops", "stop", job_id)
    assert stopped.returncode == 0 and stopped.stdout == b"" and stopped.stderr == b"", stopped.stderr
    assert time.monotonic() - began >= 0.9
    assert job_status(home, job_id)["state"] == "stopped"
    # An ended job is stopped already: success, and stop && rm works.
    assert home.jobcli("--server", "ops", "stop", job_id).returncode == 0
    assert home.jobcli("--server", "ops", "rm", job_id).returncode == 0
    assert home.jobcli("--server", "ops", "status", job_id).returncode == 1


def test_stop_no_wait_returns_at_once(home):
    job_id = start_job(home, "sh", "-c", 'trap "sleep 2; exit 0" TERM; echo ready; while :; do sleep 0.05; done')
    wait_for_output(home, job_id, b"ready\n")
    began = time.monotonic()
    stopped = home.jobcli("--server", "ops", "stop", "--no-wait", job_id)
    assert stopped.returncode == 0, stopped.stderr
    assert time.monotonic() - began < 1.5
    assert job_status(home, job_id)["state"] == "running"
    assert home.jobcli("--server", "ops", "wait", job_id).returncode == 0


def test_stop_and_rm_take_several_ids_and_json(home):
    first = start_job(home, "sleep", "30")
    second = start_job(home, "sleep", "30")
    stopped = json.loads(home.ok("--server", "ops", "stop", "--json", "--grace", "5", first, second))
    assert [item["id"] for item in stopped] == [first, second]
    assert [item["state"] for item in stopped] == ["stopped", "stopped"]
    assert [item["signal"] for item in stopped] == [signal.SIGTERM, signal.SIGTERM]
    missing = str(uuid.uuid4())
    removed = home.jobcli("--server", "ops", "rm", "--json", first, missing, second)
    # One unknown id fails the command (exit 1, its line) but not the others.
    assert removed.returncode == 1
    assert json.loads(removed.stdout) == [{"id": first, "removed": True}, {"id": second, "removed": True}]
    assert removed.stderr.decode().count("\n") == 1 and missing in removed.stderr.decode()


def test_rm_refuses_a_running_job_and_rm_f_stops_it_first(home):
    job_id = start_job(home, "sh", "-c", 'trap "" TERM; while :; do sleep 0.05; done')
    refused = home.jobcli("--server", "ops", "rm", job_id)
    assert refused.returncode == 1
    assert refused.stderr.decode().endswith(" (stop it first, or use rm -f)\n")
    assert job_status(home, job_id)["state"] == "running"
    began = time.monotonic()
    assert home.jobcli("--server", "ops", "rm", "-f", job_id).returncode == 0
    assert time.monotonic() - began < 5  # SIGKILL, not the 10 s grace
    assert home.jobcli("--server", "ops", "status", job_id).returncode == 1


def test_short_id_prefixes_work_everywhere(home):
    job_id = start_job(home, "sh", "-c", "echo hello; exit 4")
    short = uuid.UUID(job_id).hex[:6]
    assert home.jobcli("--server", "ops", "wait", short).returncode == 4
    assert job_status(home, short)["id"] == job_id
    assert home.ok("--server", "ops", "logs", short) == "hello\n"
    assert home.ok("--server", "ops", "logs", job_id[:9]) == "hello\n"  # with its dash
    too_short = home.jobcli("--server", "ops", "status", job_id[:3])
    assert too_short.returncode == 1
    assert too_short.stderr.decode() == f"jobcli: job id prefix {job_id[:3]!r} is too short: give at least 4 characters\n"
    unknown = home.jobcli("--server", "ops", "status", "0000000000")
    # A prefix nobody has: uuid4 ids start with 0000000000 once in 2**40.
    assert unknown.returncode == 1 and unknown.stderr.decode() == "jobcli: no job matches the id prefix '0000000000'\n"
    # wait exits 125 on its own failure.
    assert home.jobcli("--server", "ops", "wait", "zzzz").returncode == 125
    assert home.ok("--server", "ops", "rm", short) == ""


def test_an_ambiguous_prefix_lists_the_candidates():
    from jobworker.blocking import BlockingClient
    from jobworker.errors import ErrorCode, RequestError
    from jobworker.protocol import messages as m

    ids = [uuid.UUID("abcd1234" + "0" * 24), uuid.UUID("abcd5678" + "0" * 24), uuid.UUID("ffff" + "0" * 28)]
    client = BlockingClient(("127.0.0.1", 1), None)
    # As the server does: a name filter matches none of these unnamed jobs.
    client.iter_jobs = lambda name="", **_: iter(
        () if name else (m.JobStatus(job_id, "a", ("x",), m.JobState.EXITED) for job_id in ids)
    )
    with pytest.raises(RequestError) as caught:
        client.resolve_job_ids(["abcd"])
    assert caught.value.code is ErrorCode.BAD_REQUEST
    assert str(caught.value) == f"job id prefix 'abcd' is ambiguous: it matches {ids[0]}, {ids[1]}"
    assert client.resolve_job_ids(["abcd1", "FFFF", str(ids[1])]) == [ids[0], ids[2], ids[1]]


def test_list_newest_first_with_short_ids_ages_and_durations(home):
    older = start_job(home, "sh", "-c", "sleep 0.3")
    time.sleep(0.05)
    newer = start_job(home, "true")
    home.jobcli("--server", "ops", "wait", older)
    home.jobcli("--server", "ops", "wait", newer)
    lines = home.ok("--server", "ops", "list").splitlines()
    assert re.fullmatch(r"ID {12}OWNER {9}STATE {6}EXIT  CREATED {7}DURATION   NAME +COMMAND", lines[0]), lines[0]
    ids = [line.split()[0] for line in lines[1:]]
    assert ids.index(uuid.UUID(newer).hex[:12]) < ids.index(uuid.UUID(older).hex[:12])
    row = next(line for line in lines if line.startswith(uuid.UUID(older).hex[:12]))
    assert re.search(r"  exited  +0  \d+(\.\d)?(ms|s) ago +\d+(\.\d)?(ms|s) +- +sh -c sleep 0\.3$", row), row
    quiet = home.ok("--server", "ops", "list", "-q").split()
    assert quiet.index(uuid.UUID(newer).hex[:12]) < quiet.index(uuid.UUID(older).hex[:12])
    assert all(re.fullmatch(r"[0-9a-f]{12}", item) for item in quiet)
    full = home.ok("--server", "ops", "list", "-q", "--no-trunc").split()
    assert full.index(newer) < full.index(older) and all(UUID_TEXT.fullmatch(item) for item in full)
    as_json = [job["id"] for job in json.loads(home.ok("--server", "ops", "list", "--json"))]
    assert as_json.index(newer) < as_json.index(older)


@pytest.mark.parametrize(
    "args, code",
    [
        (("run", "--memory", "lots", "--", "true"), 125),
        (("run", "--no-such-option", "--", "true"), 125),
        (("run",), 125),
        (("run", "-e", "NOEQUALS", "--", "true"), 125),
        (("start", "--memory", "lots", "--", "true"), 2),
        (("status",), 2),
    ],
)
def test_usage_errors_of_run_exit_125(home, args, code):
    result = home.jobcli("--server", "ops", *args)
    assert result.returncode == code, result.stderr
    assert result.stdout == b""
    assert "Traceback" not in result.stderr.decode()


def test_end_of_job_lines_for_timeout_and_stop(home):
    ran = home.jobcli("--server", "ops", "run", "--timeout", "1s", "--", "sleep", "30")
    assert ran.returncode != 0
    line = ran.stderr.decode()
    assert re.fullmatch(r"jobcli: job [0-9a-f]{12} was stopped: it ran past its timeout of 1\.0s\n", line), line
    job_id = start_job(home, "sleep", "30")
    home.ok("--server", "ops", "stop", "--no-wait", "--force", job_id)
    waited = home.jobcli("--server", "ops", "wait", job_id)
    assert waited.returncode == 128 + signal.SIGKILL
    assert waited.stderr.decode() == f"jobcli: job {uuid.UUID(job_id).hex[:12]} was stopped by admin\n"
    followed = home.jobcli("--server", "ops", "logs", "-f", job_id)
    assert followed.stderr.decode() == waited.stderr.decode()
    # A job that ended by itself says nothing.
    assert home.jobcli("--server", "ops", "run", "--", "true").stderr == b""


def test_run_verbose_prints_the_job_id(home):
    ran = home.jobcli("--server", "ops", "run", "-v", "--", "echo", "hi")
    assert ran.returncode == 0 and ran.stdout == b"hi\n"
    match = re.fullmatch(rf"jobcli: job ({UUID_TEXT.pattern}) \(jobcli logs -f ([0-9a-f]{{12}}) resumes if the connection drops\)\n", ran.stderr.decode())
    assert match and uuid.UUID(match.group(1)).hex[:12] == match.group(2)
    assert job_status(home, match.group(1))["command"] == ["echo", "hi"]


def test_json_of_start_wait_and_whoami(home):
    started = json.loads(home.ok("--server", "ops", "start", "--json", "--", "sh", "-c", "exit 3"))
    assert set(started) == {"id"} and UUID_TEXT.fullmatch(started["id"])
    waited = home.jobcli("--server", "ops", "wait", "--json", started["id"])
    assert waited.returncode == 3
    assert json.loads(waited.stdout)["exit_code"] == 3
    who = json.loads(home.ok("--server", "ops", "whoami", "--json"))
    assert who["identity"] == "admin" and who["role"] == "admin" and who["protocol_version"] >= 1


# -- 3. logs -----------------------------------------------------------------------------


def test_logs_tail_counts_lines_as_tail_does(home):
    job_id = start_job(home, "sh", "-c", "printf 'a\\nb\\nc\\nd\\n'; sleep 0.2; printf 'E1\\nE2\\n' >&2; sleep 0.2; printf 'e'")
    home.jobcli("--server", "ops", "wait", job_id)
    logs = lambda *args: home.jobcli("--server", "ops", "logs", *args, job_id)  # noqa: E731
    assert logs("--tail", "2", "--stdout").stdout == b"d\ne"
    assert logs("--tail", "2", "--stdout").stderr == b""
    assert logs("--tail", "1", "--stderr").stderr == b"E2\n"
    assert logs("--tail", "1", "--stderr").stdout == b""
    assert logs("--tail", "0").stdout == b""
    assert logs("--tail", "100").stdout == b"a\nb\nc\nd\ne"
    both = logs("--tail", "3")
    assert both.stdout == b"e" and both.stderr == b"E1\nE2\n"
    assert logs("--stderr").stdout == b"" and logs("--stderr").stderr == b"E1\nE2\n"


def test_logs_tail_of_a_long_log_reads_back_far_enough(home):
    # 200 000 lines: more than the first 64 KiB window holds.
    job_id = start_job(home, "sh", "-c", "seq 1 200000")
    home.jobcli("--server", "ops", "wait", job_id)
    assert home.ok("--server", "ops", "logs", "-n", "3", job_id) == "199998\n199999\n200000\n"
    assert home.ok("--server", "ops", "logs", "-n", "20000", job_id).splitlines()[0] == "180001"


def test_logs_tail_then_follow(home):
    job_id = start_job(home, "sh", "-c", "echo one; echo two; sleep 3; echo three")
    wait_for_output(home, job_id, b"two\n")
    followed = home.jobcli("--server", "ops", "logs", "-f", "--tail", "1", job_id)
    assert followed.returncode == 0 and followed.stdout == b"two\nthree\n"


def test_status_shows_the_end_offset_to_resume_from(home):
    job_id = start_job(home, "printf", "0123456789")
    home.jobcli("--server", "ops", "wait", job_id)
    text = home.ok("--server", "ops", "status", job_id)
    assert "output:     10 B; end offset 10 (jobcli logs -f --since-offset 10 resumes there)\n" in text
    assert home.ok("--server", "ops", "logs", "--since-offset", "10", job_id) == ""


# -- 4. messages -------------------------------------------------------------------------


def test_status_text_has_durations_ages_and_time_zone(home):
    job_id = start_job(home, "sh", "-c", "sleep 0.2")
    home.jobcli("--server", "ops", "wait", job_id)
    text = home.ok("--server", "ops", "status", job_id)
    assert re.search(r"^created:    \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} [+-]\d{4} \(\d+(\.\d)?(ms|s) ago\)$", text, re.M), text
    exact = job_status(home, job_id)
    ran_ms = round((exact["ended_at"] - exact["started_at"]) * 1000)
    shown = re.search(r"^duration:   (\d+)ms$", text, re.M)
    assert shown and abs(int(shown.group(1)) - ran_ms) <= 1, (text, ran_ms)
    assert re.search(r"^usage:      cpu=\S+ memory-peak=\d+(\.\d+)? (B|KiB|MiB) io-read=\d+(\.\d+)? (B|KiB|MiB) ", text, re.M), text


def test_a_bad_port_is_one_line_without_a_python_exception(home):
    result = home.jobcli("--server", "127.0.0.1:abc", "whoami")
    assert result.returncode == 1
    assert result.stderr.decode() == (
        "jobcli: '127.0.0.1:abc' (--server) is not a server of the config file nor an address (HOST[:PORT], [IPv6]:PORT)\n"
    )
    keepalive = home.jobcli("--server", "ops", "whoami", env={"JOBWORKER_KEEPALIVE": "soon"})
    assert keepalive.returncode == 1
    assert keepalive.stderr.decode() == "jobcli: JOBWORKER_KEEPALIVE: 'soon' is not a number of seconds\n"


def test_memory_without_a_unit_is_refused(home):
    result = home.jobcli("--server", "ops", "start", "--memory", "10", "--", "true")
    assert result.returncode == 2
    assert "memory: '10' is 10 bytes, less than 1M: give a unit, e.g. 10M" in result.stderr.decode()
    # A plain number of at least 1M is bytes, and accepted.  (Not 1048576
    # itself: 1 MiB is too little for the job's helper, which the OOM killer
    # then ends before the command starts, and the start fails.)
    assert home.jobcli("--server", "ops", "start", "--memory", "67108864", "--", "true").returncode == 0


def test_tls_failures_name_the_cause(home, server, certs, tmp_path):
    other = make_pki(tmp_path / "other")
    # Our CA does not know the server's certificate.
    unknown_ca = home.jobcli("--server", server.address, "--ca", str(other / "ca.pem"), "--cert", str(certs / "admin.pem"), "--key", str(certs / "admin.key"), "whoami")
    assert unknown_ca.returncode == 1
    assert "unknown CA: the server's certificate is not signed by the CA given (--ca)" in unknown_ca.stderr.decode()
    # The server does not know our client certificate's CA.
    refused = home.jobcli("--server", server.address, "--ca", str(certs / "ca.pem"), "--cert", str(other / "admin.pem"), "--key", str(other / "admin.key"), "whoami")
    assert refused.returncode == 1
    assert "the server refused our client certificate" in refused.stderr.decode(), refused.stderr
    # Our certificate has expired.
    from jobworker.pki import make_client_cert

    now = datetime.now(UTC)
    cert, key = make_client_cert(tmp_path, certs / "ca.pem", certs / "ca.key", "old", "user", name="old",
                                 not_valid_before=now - timedelta(days=10), not_valid_after=now - timedelta(days=1))
    expired = home.jobcli("--server", server.address, "--ca", str(certs / "ca.pem"), "--cert", str(cert), "--key", str(key), "whoami")
    assert expired.returncode == 1
    assert "the server refused our client certificate: it has expired" in expired.stderr.decode(), expired.stderr


def test_tls_cause_of_a_name_mismatch_and_an_expired_server_certificate():
    import ssl

    from jobworker.blocking import tls_failure_cause

    def verify_error(message: str) -> ssl.SSLCertVerificationError:
        error = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
        error.verify_message = message
        error.reason = "CERTIFICATE_VERIFY_FAILED"
        return error

    assert tls_failure_cause(verify_error("Hostname mismatch, certificate is not valid for 'db1'."), "db1") == (
        "server name mismatch: the server's certificate is not for 'db1' (dial a name the certificate carries)"
    )
    assert tls_failure_cause(verify_error("certificate has expired"), "h") == "the server's certificate has expired"


# -- 5. many servers -----------------------------------------------------------------------


@pytest.fixture
def fleet(home, certs, server, tmp_path):
    """
    Two servers, C{a} (the shared one) and C{b} (one of its own), and C{down}
    (nothing listens there), all as admin.
    """
    second = start_server(certs, tmp_path / "second" / "state")
    pki = home.config_dir / "pki"
    home.write_config(
        "[defaults]\n"
        f'ca = "{pki}/ca.pem"\ncert = "{pki}/admin.pem"\nkey = "{pki}/admin.key"\n'
        f'[servers.a]\naddress = "{server.address}"\n'
        f'[servers.b]\naddress = "{second.address}"\n'
        f'[servers.down]\naddress = "127.0.0.1:{free_port()}"\n'
    )
    yield home
    second.stop()


def test_run_on_several_servers_prefixes_lines_and_exits_with_the_worst(fleet):
    ran = fleet.jobcli("--server", "a,b", "run", "--", "sh", "-c", "echo one; echo two >&2; printf three")
    assert ran.returncode == 0, ran.stderr
    assert sorted(ran.stdout.decode().splitlines()) == ["a: one", "a: three", "b: one", "b: three"]
    assert sorted(ran.stderr.decode().splitlines()) == ["a: two", "b: two"]
    # The worst exit code wins; an unreachable server is jobcli's 125.
    worst = fleet.jobcli("--server", "a,down", "run", "--", "sh", "-c", "exit 3")
    assert worst.returncode == 125
    assert re.fullmatch(r"down: jobcli: cannot connect to 127\.0\.0\.1:\d+: Connection refused\n", worst.stderr.decode())
    started = time.monotonic()
    both = fleet.jobcli("--server", "a,b", "run", "--", "sleep", "3")
    # Concurrently: two three-second jobs take about three seconds, not six.
    assert both.returncode == 0 and time.monotonic() - started < 5.5


def test_start_status_list_and_stop_on_several_servers_json(fleet):
    started = [json.loads(line) for line in fleet.ok("--server", "a,b", "start", "--json", "--", "sleep", "30").splitlines()]
    assert sorted(item["server"] for item in started) == ["a", "b"]
    assert all(item["exit_code"] == 0 and item["error"] is None for item in started)
    ids = {item["server"]: item["result"]["id"] for item in started}
    # Text: each server's id on a prefixed line.
    plain = fleet.ok("--server", "a,b", "start", "--", "true").splitlines()
    assert sorted(line.split(": ")[0] for line in plain) == ["a", "b"]
    listed = [json.loads(line) for line in fleet.ok("--server", "b,a", "list", "--json", "--state", "running").splitlines()]
    for item in listed:
        assert ids[item["server"]] in [job["id"] for job in item["result"]]
        other = ids["a" if item["server"] == "b" else "b"]
        assert other not in [job["id"] for job in item["result"]]
    # status of an id that only one server has: the other one fails (1).
    status = fleet.jobcli("--server", "a,b", "status", "--json", ids["a"])
    assert status.returncode == 1
    by_server = {item["server"]: item for item in map(json.loads, status.stdout.decode().splitlines())}
    assert by_server["a"]["result"]["state"] == "running" and by_server["b"]["exit_code"] == 1
    assert ids["a"] in by_server["b"]["error"]
    for name, job_id in ids.items():
        fleet.ok("--server", name, "stop", "--force", job_id)


def test_commands_of_one_server_refuse_a_list(fleet):
    result = fleet.jobcli("--server", "a,b", "logs", "abcd")
    assert result.returncode == 1
    assert result.stderr.decode() == "jobcli: logs works on one server at a time; several at once: list, run, start, status, stop\n"


# -- 6. shell completion -------------------------------------------------------------------


def complete(home: Home, words: list[str], shell: str = "bash", env: dict | None = None) -> list[str]:
    """
    Load C{jobcli completion SHELL} in bash and complete C{words} (the last
    one is being typed); the candidates.
    """
    script = home.ok("completion", shell)
    program = (
        'source /dev/stdin; COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); _jobcli; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    if shell == "zsh":
        # bash stands in for zsh's bashcompinit layer: the rest is the same.
        script = script.replace("autoload -U +X bashcompinit && bashcompinit\n", "")
    result = subprocess.run(
        ["bash", "-c", program, "bash", *words],
        input=script.encode(), env={**home.env, "PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})},
        cwd=str(home.cwd), capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.decode().splitlines() if line]


def test_bash_completion_of_commands_options_choices_servers_and_ids(home):
    assert complete(home, ["jobcli", "st"]) == ["start", "stop", "status"]
    assert complete(home, ["jobcli", "logs", "--st"]) == ["--stdout", "--stderr"]
    assert complete(home, ["jobcli", "run", "--network", ""]) == ["none", "host"]
    assert complete(home, ["jobcli", "--server", ""]) == ["lab", "ops"]
    job_id = start_job(home, "true")
    short = uuid.UUID(job_id).hex[:12]
    # Ids come from the server named before the command.
    assert short in complete(home, ["jobcli", "--server", "ops", "status", short[:4]])
    assert complete(home, ["jobcli", "--server", "ops", "rm", "-f", short]) == [short]
    # A new option appears without editing the script: it is generated.
    assert "--no-wait" in complete(home, ["jobcli", "stop", "--"])


def test_bash_completion_offers_job_names_too(home):
    """
    Names work wherever ids do, so they are completed where ids are, from
    the same single list request (C{list -q --names}).
    """
    marker = uuid.uuid4().hex[:8]
    named = home.ok("--server", "ops", "start", "--name", f"web-{marker}", "--", "true").strip()
    start_job(home, "true")  # one without a name adds only its id
    assert complete(home, ["jobcli", "--server", "ops", "logs", f"web-{marker[:4]}"]) == [f"web-{marker}"]
    offered = complete(home, ["jobcli", "--server", "ops", "status", ""])
    assert f"web-{marker}" in offered and uuid.UUID(named).hex[:12] in offered
    # The listing behind it: names of named jobs only; with -q, ids as well.
    names = home.ok("--server", "ops", "list", "--names").split()
    assert f"web-{marker}" in names and not any(len(word) == 12 and word.isalnum() and "-" not in word for word in names)
    both = home.ok("--server", "ops", "list", "-q", "--names").split()
    assert f"web-{marker}" in both and uuid.UUID(named).hex[:12] in both


def test_zsh_completion_is_the_bash_function_through_bashcompinit(home):
    script = home.ok("completion", "zsh")
    assert script.startswith("#compdef jobcli\n")
    assert "autoload -U +X bashcompinit && bashcompinit\n" in script
    assert complete(home, ["jobcli", "wa"], shell="zsh") == ["wait"]


# -- Ctrl-C during run ---------------------------------------------------------------------


def _running_jobcli(home: Home, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "jobcli"), "--server", "ops", *args], env=home.env, cwd=str(home.cwd),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )


def test_ctrl_c_stops_the_job_and_a_second_one_leaves_at_once(home):
    # One Ctrl-C: the job is stopped, run streams to its end and exits with its code.
    once = _running_jobcli(home, "run", "--", "sh", "-c", "echo ready; exec sleep 30")
    assert once.stdout.readline() == b"ready\n"
    once.send_signal(signal.SIGINT)
    out, err = once.communicate(timeout=20)
    assert once.returncode == 128 + signal.SIGTERM
    lines = err.decode().splitlines()
    assert re.fullmatch(rf"jobcli: stopping job {UUID_TEXT.pattern} \(interrupt again to stop waiting; the stop goes on\)", lines[0])
    assert re.fullmatch(r"jobcli: job [0-9a-f]{12} was stopped by admin", lines[1]) and len(lines) == 2
    # Two: jobcli leaves at once with 130, the job (deaf to SIGTERM) is
    # still stopped, by SIGKILL at the end of the grace period.
    twice = _running_jobcli(home, "run", "--", "sh", "-c", 'trap "" TERM; echo ready; while :; do sleep 0.05; done')
    assert twice.stdout.readline() == b"ready\n"
    twice.send_signal(signal.SIGINT)
    job_id = None
    deadline = time.monotonic() + 10
    while job_id is None and time.monotonic() < deadline:
        line = twice.stderr.readline().decode()
        match = UUID_TEXT.search(line)
        job_id = match.group(0) if match else None
    assert job_id is not None
    twice.send_signal(signal.SIGINT)
    began = time.monotonic()
    twice.communicate(timeout=10)
    assert twice.returncode == 130 and time.monotonic() - began < 3
    assert job_status(home, job_id)["state"] == "running"
    assert home.jobcli("--server", "ops", "wait", job_id, timeout=30).returncode == 128 + signal.SIGKILL


# -- kill -s SIGNAL ---------------------------------------------------------------------------


def test_kill_sends_one_signal_and_the_job_goes_on(home):
    job_id = start_job(home, "sh", "-c", 'trap "echo got usr1" USR1; echo ready; while :; do sleep 0.05; done')
    wait_for_output(home, job_id, b"ready\n")
    sent = home.jobcli("--server", "ops", "kill", "-s", "USR1", job_id[:8])
    assert sent.returncode == 0 and sent.stdout == b"" and sent.stderr == b"", sent.stderr
    wait_for_output(home, job_id, b"got usr1\n")
    assert job_status(home, job_id)["state"] == "running"
    # Without -s: KILL, a forced stop.
    assert json.loads(home.ok("--server", "ops", "kill", "--json", job_id)) == [{"id": job_id, "signal": signal.SIGKILL}]
    assert home.jobcli("--server", "ops", "wait", job_id).returncode == 128 + signal.SIGKILL
    assert job_status(home, job_id)["state"] == "stopped"
    ended = home.jobcli("--server", "ops", "kill", "-s", "TERM", job_id)
    assert ended.returncode == 1 and "has already ended" in ended.stderr.decode()


def test_kill_with_a_signal_the_command_does_not_handle(home):
    job_id = start_job(home, "sh", "-c", "echo ready; exec sleep 30")
    wait_for_output(home, job_id, b"ready\n")
    assert home.jobcli("--server", "ops", "kill", "-s", "10", job_id).returncode == 0
    assert home.jobcli("--server", "ops", "wait", job_id).returncode == 128 + signal.SIGUSR1
    final = job_status(home, job_id)
    assert final["state"] == "signaled" and final["signal"] == signal.SIGUSR1


def test_kill_refuses_signals_that_cannot_be_forwarded(home, server):
    refused = home.jobcli("--server", "ops", "kill", "-s", "STOP", "abcd")
    assert refused.returncode == 2
    assert "'STOP': a job can be sent only HUP, INT, KILL, QUIT, TERM, USR1, USR2" in refused.stderr.decode()
    # The server refuses them too, whatever the client.
    from jobworker.errors import ErrorCode, RequestError

    job_id = start_job(home, "sleep", "30")
    with server.client("admin") as client:
        with pytest.raises(RequestError) as caught:
            client.signal(job_id, signal.SIGSTOP)
        assert caught.value.code is ErrorCode.BAD_REQUEST
        client.stop(job_id, force=True)


def test_a_config_file_address_may_be_a_unix_socket(home, certs, tmp_path):
    socket_path = tmp_path / "jobworker.sock"
    unix_server = start_server(certs, tmp_path / "unix" / "state", "--listen", f"unix:{socket_path}")
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pki = home.config_dir / "pki"
        home.write_config(
            f'default = "local"\n[servers.local]\naddress = "unix:{socket_path}"\n'
            f'ca = "{pki}/ca.pem"\ncert = "{pki}/bob.pem"\nkey = "{pki}/bob.key"\n'
        )
        assert home.ok("whoami").startswith("bob (user) on ")
        assert home.ok("run", "--", "echo", "over unix") == "over unix\n"
    finally:
        unix_server.stop()
