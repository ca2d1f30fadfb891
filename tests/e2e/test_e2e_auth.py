"""
End-to-end tests of authorization (issue 2, item 4): the role comes from the
client certificate's OU, and each role may do what the issue lists, through
the real C{jobcli} against the shared server.

  - admin: everything, on every job; may use the host network and choose
    the job user;
  - user: starts jobs; stop/status/logs/wait/rm only its own; a job of
    someone else answers exactly like one that does not exist;
  - viewer: status/logs/wait/list on every job; no start or stop;
  - no OU, or an unknown one: nothing at all.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import closing

import pytest

DENIED = "permission denied"

# Set-up and checks go through the blocking client in this process; only the
# operation under test runs jobcli, which costs a Python start-up each time.


def start(server, *argv: str, identity: str) -> str:
    with closing(server.client(identity)) as client:
        return str(client.start(list(argv)))


def state(server, job_id: str) -> str:
    with closing(server.client("admin")) as client:
        return client.status(uuid.UUID(job_id)).state.label


def finished_job(server, identity: str, code: int = 0) -> str:
    with closing(server.client(identity)) as client:
        job_id = client.start(["sh", "-c", f"echo from {identity}; exit {code}"])
        assert client.wait(job_id).exit_code == code
    return str(job_id)


def all_ids(server) -> set[str]:
    with closing(server.client("admin")) as client:
        return {str(job.job_id) for job in client.list()}


@pytest.fixture(scope="module")
def running_job(server):
    """
    A long job of alice's, that no test here may end; stopped at the end.
    """
    job_id = start(server, "sh", "-c", "echo started; exec sleep 600", identity="alice")
    yield job_id
    with closing(server.client("admin")) as client:
        client.stop(uuid.UUID(job_id), force=True)
        client.wait(uuid.UUID(job_id))


def answer(result) -> tuple[int, bytes, bytes]:
    return result.returncode, result.stdout, result.stderr


def listed_ids(server, identity: str) -> set[str]:
    result = server.jobcli("list", "--json", identity=identity, check=True)
    return {job["id"] for job in json.loads(result.stdout)}


# -- users and the jobs of others ---------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [("status",), ("status", "--json"), ("logs",), ("logs", "-f"), ("wait",), ("stop",), ("stop", "--force"), ("rm",)],
)
def test_another_users_job_answers_like_a_missing_one(server, running_job, command):
    missing = str(uuid.uuid4())
    theirs = server.jobcli(*command, running_job, identity="bob")
    nobodys = server.jobcli(*command, missing, identity="bob")
    assert theirs.returncode != 0
    assert theirs.returncode == nobodys.returncode
    assert theirs.stdout == nobodys.stdout == b""
    assert theirs.stderr.replace(running_job.encode(), b"ID") == nobodys.stderr.replace(missing.encode(), b"ID")
    # ... and bob's attempt changed nothing.
    assert state(server, running_job) == "running"


def test_another_users_finished_job_answers_like_a_missing_one(server):
    job_id = finished_job(server, "alice", code=3)
    missing = str(uuid.uuid4())
    for command in (("status",), ("logs",), ("wait",), ("rm",), ("stop",)):
        theirs = server.jobcli(*command, job_id, identity="bob")
        nobodys = server.jobcli(*command, missing, identity="bob")
        assert (theirs.returncode, theirs.stdout) == (nobodys.returncode, nobodys.stdout), command
        assert theirs.returncode not in (0, 3), command
        assert theirs.stderr.replace(job_id.encode(), b"ID") == nobodys.stderr.replace(missing.encode(), b"ID"), command
    # bob's rm did not remove it.
    assert server.jobcli("logs", job_id, identity="alice", check=True).stdout == b"from alice\n"


def test_user_manages_own_jobs(server):
    job_id = start(server, "sh", "-c", "echo started; exec sleep 60", identity="alice")
    status = json.loads(server.jobcli("status", "--json", job_id, identity="alice", check=True).stdout)
    assert status["owner"] == "alice"
    assert server.jobcli("stop", "--force", job_id, identity="alice").returncode == 0
    assert server.jobcli("wait", job_id, identity="alice").returncode == 137
    assert server.jobcli("logs", job_id, identity="alice", check=True).stdout == b"started\n"
    assert server.jobcli("rm", job_id, identity="alice").returncode == 0
    assert server.jobcli("status", job_id, identity="alice").returncode == 1


def test_user_lists_only_own_jobs(server):
    alices = finished_job(server, "alice")
    bobs = finished_job(server, "bob")
    admins = finished_job(server, "admin")
    alice_sees = listed_ids(server, "alice")
    assert alices in alice_sees
    assert bobs not in alice_sees and admins not in alice_sees
    owners = {job["owner"] for job in json.loads(server.jobcli("list", "--json", identity="alice", check=True).stdout)}
    assert owners == {"alice"}
    # The table shows short ids (12 hex digits); --no-trunc whole ones.
    text = server.jobcli("list", "--no-trunc", identity="alice", check=True).stdout.decode()
    assert alices in text and bobs not in text and admins not in text
    short = server.jobcli("list", identity="alice", check=True).stdout.decode()
    assert alices.replace("-", "")[:12] in short and bobs.replace("-", "")[:12] not in short
    for everyone in ("admin", "viewer"):
        assert {alices, bobs, admins} <= listed_ids(server, everyone)


def test_admin_may_do_everything_to_a_users_job(server):
    job_id = start(server, "sh", "-c", "echo started; exec sleep 60", identity="bob")
    status = json.loads(server.jobcli("status", "--json", job_id, identity="admin", check=True).stdout)
    assert status["owner"] == "bob" and status["state"] in ("starting", "running")
    assert server.jobcli("stop", "--force", job_id, identity="admin").returncode == 0
    assert server.jobcli("wait", job_id, identity="admin").returncode == 137
    final = json.loads(server.jobcli("status", "--json", job_id, identity="bob", check=True).stdout)
    assert final["state"] == "stopped"
    assert server.jobcli("logs", job_id, identity="admin", check=True).stdout == b"started\n"
    assert server.jobcli("rm", job_id, identity="admin").returncode == 0
    assert job_id not in listed_ids(server, "bob")


# -- host network and job user ----------------------------------------------------------


def _net_namespace(server, identity: str, *options: str) -> tuple[int, bytes, bytes]:
    return answer(server.jobcli("run", *options, "--", "readlink", "/proc/self/ns/net", identity=identity))


def test_user_may_not_use_the_host_network(server):
    code, out, err = _net_namespace(server, "alice", "--network", "host")
    assert code != 0 and out == b""
    assert b"admin" in err or DENIED.encode() in err
    started = server.jobcli("start", "--network", "host", "--", "true", identity="alice")
    assert started.returncode == 1 and started.stdout == b""


def test_admin_may_use_the_host_network(server):
    ours = os.readlink("/proc/self/ns/net").encode()
    code, out, err = _net_namespace(server, "admin", "--network", "host")
    assert code == 0, err
    assert out.strip() == ours
    # Without it, the job has a network namespace of its own.
    code, out, err = _net_namespace(server, "admin")
    assert code == 0, err
    assert out.strip().startswith(b"net:[") and out.strip() != ours


def test_user_may_not_choose_the_job_user(server):
    result = server.jobcli("run", "--user", "root", "--", "id", "-u", identity="alice")
    assert result.returncode != 0 and result.stdout == b""
    started = server.jobcli("start", "--user", "root", "--", "id", "-u", identity="bob")
    assert started.returncode == 1 and started.stdout == b""


def test_admin_may_choose_the_job_user(server):
    result = server.jobcli("run", "--user", "root", "--", "id", "-u", identity="admin")
    assert (result.returncode, result.stdout) == (0, b"0\n"), result.stderr
    # By default, jobs do not run as root.
    default = server.jobcli("run", "--", "id", "-u", identity="admin")
    assert default.returncode == 0 and default.stdout.strip() not in (b"", b"0")


# -- viewer ---------------------------------------------------------------------------


def test_viewer_reads_every_job(server, running_job):
    finished = finished_job(server, "bob", code=4)
    status = json.loads(server.jobcli("status", "--json", running_job, identity="viewer", check=True).stdout)
    assert status["owner"] == "alice"
    assert server.jobcli("logs", finished, identity="viewer", check=True).stdout == b"from bob\n"
    assert server.jobcli("wait", finished, identity="viewer").returncode == 4
    assert {running_job, finished} <= listed_ids(server, "viewer")


@pytest.mark.parametrize("command", [("start", "--", "true"), ("run", "--", "true")])
def test_viewer_may_not_start(server, command):
    before = all_ids(server)
    result = server.jobcli(*command, identity="viewer")
    assert result.returncode != 0 and result.stdout == b""
    assert DENIED in result.stderr.decode()
    assert all_ids(server) == before


@pytest.mark.parametrize("command", [("stop",), ("stop", "--force"), ("rm",)])
def test_viewer_may_not_stop_or_remove(server, running_job, command):
    result = server.jobcli(*command, running_job, identity="viewer")
    assert result.returncode == 1 and result.stdout == b""
    assert DENIED in result.stderr.decode()
    assert state(server, running_job) == "running"


def test_viewer_may_not_remove_a_finished_job(server):
    job_id = finished_job(server, "alice")
    result = server.jobcli("rm", job_id, identity="viewer")
    assert result.returncode == 1
    assert DENIED in result.stderr.decode()
    assert job_id in all_ids(server)


# -- no role, unknown role ----------------------------------------------------------


@pytest.mark.parametrize("identity", ["norole", "badrole"])
@pytest.mark.parametrize(
    "command",
    [
        ("start", "--", "true"),
        ("list",),
        ("list", "--json"),
        ("status", "JOB"),
        ("logs", "JOB"),
        ("wait", "JOB"),
        ("stop", "JOB"),
        ("rm", "JOB"),
        ("status", "MISSING"),
    ],
)
def test_no_role_may_do_nothing(server, running_job, identity, command):
    before = all_ids(server)
    missing = str(uuid.uuid4())
    args = [running_job if arg == "JOB" else missing if arg == "MISSING" else arg for arg in command]
    result = server.jobcli(*args, identity=identity)
    assert result.returncode != 0
    assert result.stdout == b""
    # Denied, not "no such job": the answer does not depend on the job.
    assert DENIED in result.stderr.decode()
    assert all_ids(server) == before
    assert state(server, running_job) == "running"


@pytest.mark.parametrize("identity", ["norole", "badrole"])
def test_no_role_may_not_run(server, identity):
    result = server.jobcli("run", "--", "echo", "hi", identity=identity)
    assert result.returncode == 125
    assert result.stdout == b""
    assert DENIED in result.stderr.decode()
