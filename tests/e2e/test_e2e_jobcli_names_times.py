"""
End-to-end tests of what issue 13 left for last: C{jobcli logs
--timestamps} and C{--since}, job names and labels, and the end-of-job line
of an OOM kill; each through the real C{jobcli} against a real server.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import UTC, datetime

import pytest

from jobworker.errors import ErrorCode, JobworkerError
from jobworker.protocol import messages as m
from tests.support import need, need_root, start_server

# About jobcli as a program: it runs as one (tests/support.py, JOBCLI_MODE).
pytestmark = pytest.mark.real_jobcli

STAMPED = re.compile(rb"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (.*)$")


def ok(server, *args: str, identity: str = "admin") -> str:
    result = server.jobcli(*args, identity=identity)
    assert result.returncode == 0, (args, result.returncode, result.stderr.decode())
    return result.stdout.decode()


def start(server, *args: str, identity: str = "admin") -> str:
    return ok(server, "start", *args, identity=identity).strip()


def stamped_lines(data: bytes) -> list[tuple[float, bytes]]:
    """
    (seconds since the epoch, text) of each line of C{logs -t} output.
    """
    found = []
    for line in data.splitlines():
        match = STAMPED.match(line)
        assert match is not None, line
        when = datetime.strptime(match.group(1).decode(), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        found.append((when.timestamp(), match.group(2)))
    return found


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


# -- logs --timestamps ---------------------------------------------------------------------


def test_timestamps_prefix_each_line_with_the_time_the_server_read_it(server):
    before = time.time()
    job_id = start(server, "--", "sh", "-c", "echo one; echo err >&2; sleep 1.2; printf 'two\\nthree\\npartial'")
    ok(server, "wait", job_id)
    after = time.time()
    result = server.jobcli("logs", "--timestamps", job_id)
    assert result.returncode == 0, result.stderr
    lines = stamped_lines(result.stdout)
    assert [text for _, text in lines] == [b"one", b"two", b"three", b"partial"]
    for when, _ in lines:
        assert before - 1 <= when <= after + 1
    # One mark per chunk read: "two" and "three" came in one write.
    assert lines[1][0] - lines[0][0] >= 1.0
    assert lines[2][0] == lines[1][0] == lines[3][0]
    # stderr lines are stamped on stderr.
    [(err_time, err_text)] = stamped_lines(result.stderr)
    assert err_text == b"err" and abs(err_time - lines[0][0]) < 0.5
    # Without -t: the bytes as they were.
    assert ok(server, "logs", "--stdout", job_id) == "one\ntwo\nthree\npartial"


def test_timestamps_with_follow_and_the_library(server):
    job_id = start(server, "--", "sh", "-c", "echo a; sleep 0.5; echo b")
    result = server.jobcli("logs", "-f", "-t", "--stdout", job_id)
    assert result.returncode == 0, result.stderr
    lines = stamped_lines(result.stdout)
    assert [text for _, text in lines] == [b"a", b"b"]
    assert lines[1][0] - lines[0][0] >= 0.4
    # The blocking client yields the marks as messages.
    with server.client() as client:
        messages = list(client.follow(job_id, follow=False, timestamps=True))
    marks = [message for message in messages if isinstance(message, m.TimeMark)]
    assert [mark.offset for mark in marks] == [0, 2]
    assert abs(marks[1].time / 1e6 - lines[1][0]) < 1e-5
    # Without timestamps, none.
    with server.client() as client:
        assert not any(isinstance(message, m.TimeMark) for message in client.follow(job_id, follow=False))


def test_timestamps_through_a_pipe_that_fills(server):
    """
    C{logs -t} writes more bytes than the stream carries (a time before
    each line); a reader that lags (a full pipe) still gets every line,
    once, in order, and the stream's credit stays right.
    """
    import subprocess

    from tests.support import BIN

    job_id = start(server, "--", "sh", "-c", "seq 1 200000")
    ok(server, "wait", job_id)
    result = subprocess.run(
        ["sh", "-c", f"{BIN / 'jobcli'} logs -t {job_id} | (sleep 1; cat)"],
        env=server.env(), capture_output=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 200000
    assert [line.split(b" ", 1)[1] for line in lines] == [str(n).encode() for n in range(1, 200001)]
    assert all(STAMPED.match(line) for line in lines[:: 997])


# -- logs --since ---------------------------------------------------------------------------


def test_since_a_time_and_a_duration(server):
    job_id = start(server, "--", "sh", "-c", "echo early1; echo early2; sleep 1.5; echo late1; echo late2; echo late3")
    ok(server, "wait", job_id)
    lines = stamped_lines(server.jobcli("logs", "-t", job_id).stdout)
    middle = (lines[1][0] + lines[2][0]) / 2
    assert ok(server, "logs", "--since", rfc3339(middle), job_id) == "late1\nlate2\nlate3\n"
    # An ISO time with an offset other than UTC means the same moment.
    local = datetime.fromtimestamp(middle, UTC).astimezone().isoformat()
    assert ok(server, "logs", "--since", local, job_id) == "late1\nlate2\nlate3\n"
    assert ok(server, "logs", "--since", "1h", job_id) == "early1\nearly2\nlate1\nlate2\nlate3\n"
    # With --tail: the last N lines of what was read since then.
    assert ok(server, "logs", "--since", rfc3339(middle), "--tail", "2", job_id) == "late2\nlate3\n"
    assert ok(server, "logs", "--since", rfc3339(middle), "--tail", "10", job_id) == "late1\nlate2\nlate3\n"
    # With -t: the times shown are from then on.
    late = stamped_lines(server.jobcli("logs", "-t", "--since", rfc3339(middle), job_id).stdout)
    assert [text for _, text in late] == [b"late1", b"late2", b"late3"] and late[0][0] >= middle
    time.sleep(1.1)
    assert ok(server, "logs", "--since", "1s", job_id) == ""


def test_follow_since_now_gets_only_new_output(server):
    job_id = start(server, "--", "sh", "-c", "echo old; sleep 1.5; echo new")
    deadline = time.monotonic() + 10
    while b"old" not in server.jobcli("logs", job_id).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    result = server.jobcli("logs", "-f", "--since", rfc3339(time.time()), job_id)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"new\n"


def test_since_in_the_future_or_unparsable_is_a_usage_error(server):
    job_id = start(server, "--", "echo", "x")
    for args, message in (
        (("--since", "2999-01-01T00:00:00Z"), b"is in the future"),
        (("--since", "yesterday"), b"is neither a duration"),
        (("--since", "10q"), b"is neither a duration"),
        (("-f", "--since", "2999-01-01"), b"is in the future"),
    ):
        result = server.jobcli("logs", *args, job_id)
        assert result.returncode == 2, (args, result.returncode, result.stderr)
        assert message in result.stderr, result.stderr
        assert b"Traceback" not in result.stderr


# -- spools of older servers and damaged times files ------------------------------------------


def test_old_spools_and_damaged_times_files(certs, tmp_path):
    running = start_server(certs, tmp_path / "state")
    try:
        first = running.jobcli("run", "--", "sh", "-c", "echo alpha; echo beta")
        assert first.returncode == 0, first.stderr
        ids = [job.job_id for job in running.client().list()]
        second = running.jobcli("run", "--", "sh", "-c", "echo gamma; sleep 0.2; echo delta")
        assert second.returncode == 0, second.stderr
        [second_id] = [job.job_id for job in running.client().list() if job.job_id not in ids]
        [first_id] = ids
    finally:
        running.stop()
    jobs_dir = tmp_path / "state" / "jobs"
    assert (jobs_dir / f"{first_id}.times").exists()
    # The first job as an older server left it: today's spool, no times file.
    (jobs_dir / f"{first_id}.times").unlink()
    # The second's times file damaged: its second entry zeroed, garbage after.
    times = jobs_dir / f"{second_id}.times"
    content = times.read_bytes()
    times.write_bytes(content[:24] + bytes(16) + b"garbage")
    running = start_server(certs, tmp_path / "state", port=running.port)
    try:
        assert running.jobcli("logs", str(first_id)).stdout == b"alpha\nbeta\n"
        old = running.jobcli("logs", "-t", str(first_id))
        assert old.returncode == 0 and old.stdout == b"- alpha\n- beta\n", old
        # No byte of it is known to be recent: --since shows none of it.
        assert running.jobcli("logs", "--since", "1h", str(first_id)).stdout == b""
        damaged = running.jobcli("logs", "-t", str(second_id))
        assert damaged.returncode == 0, damaged.stderr
        lines = stamped_lines(damaged.stdout)
        assert [text for _, text in lines] == [b"gamma", b"delta"]
        assert lines[0][0] == lines[1][0]  # the times after the damage are lost, the output is not
        assert running.jobcli("status", str(second_id)).returncode == 0
        assert running.alive()
        assert "times file: bad entry" in running.log()
    finally:
        running.stop()


# -- names -------------------------------------------------------------------------------------


def test_a_name_works_wherever_an_id_does(server):
    name = f"web-{uuid.uuid4().hex[:8]}"
    job_id = start(server, "--name", name, "--", "sh", "-c", "echo hi; sleep 30", identity="alice")
    status = json.loads(ok(server, "status", "--json", name, identity="alice"))
    assert status["id"] == job_id and status["name"] == name
    assert f"name:       {name}" in ok(server, "status", name, identity="alice")
    deadline = time.monotonic() + 10
    while ok(server, "logs", name, identity="alice") != "hi\n":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ok(server, "list", "-q", "--no-trunc", "--name", name, identity="alice").split() == [job_id]
    listing = ok(server, "list", "--name", name, identity="alice").splitlines()
    assert listing[0].split()[6] == "NAME" and listing[1].split()[6] == name
    ok(server, "stop", "--grace", "0.5", name, identity="alice")
    assert server.jobcli("wait", name, identity="alice").returncode == 143
    # A finished job keeps its name until it is removed, as docker's.
    taken = server.jobcli("start", "--name", name, "--", "true", identity="alice")
    assert taken.returncode == 1
    assert f"the name '{name}' is in use by job {job_id}".encode() in taken.stderr
    assert server.jobcli("run", "--name", name, "--", "true", identity="alice").returncode == 125
    ok(server, "rm", name, identity="alice")
    again = server.jobcli("run", "--name", name, "--", "echo", "again", identity="alice")
    assert again.returncode == 0 and again.stdout == b"again\n"


def test_names_are_unique_per_owner_with_a_stable_code(server):
    name = f"n{uuid.uuid4().hex[:8]}"
    alice = start(server, "--name", name, "--", "true", identity="alice")
    with server.client("alice") as client:
        with pytest.raises(JobworkerError) as refused:
            client.start(["true"], name=name)
        assert refused.value.code is ErrorCode.NAME_IN_USE
    # Another owner may use it...
    bob = start(server, "--name", name, "--", "true", identity="bob")
    assert json.loads(ok(server, "status", "--json", name, identity="bob"))["id"] == bob
    assert json.loads(ok(server, "status", "--json", name, identity="alice"))["id"] == alice
    # ... and an admin who sees both is told the name is ambiguous.
    ambiguous = server.jobcli("status", name)
    assert ambiguous.returncode == 1
    assert b"is ambiguous" in ambiguous.stderr and alice.encode() in ambiguous.stderr and bob.encode() in ambiguous.stderr


def test_a_name_wins_over_an_id_prefix_as_in_docker(server):
    target = start(server, "--", "true", identity="alice")
    prefix = uuid.UUID(target).hex[:8]
    named = start(server, "--name", prefix, "--", "true", identity="alice")
    assert json.loads(ok(server, "status", "--json", prefix, identity="alice"))["id"] == named
    # The whole id still names the first.
    assert json.loads(ok(server, "status", "--json", target, identity="alice"))["id"] == target
    missing = server.jobcli("status", "no-such-name", identity="alice")
    assert missing.returncode == 1 and b"no job has the id or name 'no-such-name'" in missing.stderr


# -- labels ------------------------------------------------------------------------------------


def test_labels_are_shown_and_filtered_on_the_server(server):
    tag = uuid.uuid4().hex[:8]
    web = start(server, "-l", f"run={tag}", "-l", "app=web", "--label", "tier=front end", "--", "true", identity="alice")
    db = start(server, "-l", f"run={tag}", "-l", "app=db", "--", "true", identity="alice")
    status = json.loads(ok(server, "status", "--json", web, identity="alice"))
    assert status["labels"] == {"run": tag, "app": "web", "tier": "front end"}
    assert f"labels:     run={tag} app=web tier=front end" in ok(server, "status", web, identity="alice")

    def ids(*filters: str) -> set[str]:
        return set(ok(server, "list", "-q", "--no-trunc", *filters, identity="alice").split())

    assert ids("-l", f"run={tag}") == {web, db}
    assert ids("-l", f"run={tag}", "-l", "app=web") == {web}
    assert ids("-l", f"run={tag}", "--label", "tier") == {web}
    assert ids("-l", f"run={tag}", "-l", "app=nope") == set()
    listed = json.loads(ok(server, "list", "--json", "-l", f"run={tag}", identity="alice"))
    assert {job["id"]: job["labels"]["app"] for job in listed} == {web: "web", db: "db"}
    # The server filters: its answer holds only the matching jobs.
    with server.client("alice") as client:
        assert [job.job_id for job in client.list(labels=[f"run={tag}", "app=db"])] == [uuid.UUID(db)]


def test_names_and_labels_one_past_each_cap_and_hostile_text(server):
    cases = [
        ("--name", "x" * 129),
        ("--name", "-leading-dash"),
        ("--name", "bell\x07"),
        ("--name", "caf\udce9"),
        ("-l", "k" * 129 + "=v"),
        ("-l", "k=" + "v" * 1025),
        ("-l", "k=esc\x1b[31m"),
        ("-l", "novalue"),
    ]
    for option, value in cases:
        result = server.jobcli("start", option, value, "--", "true", identity="alice")
        assert result.returncode == 2, (option, value, result.stderr)
        assert b"Traceback" not in result.stderr
        assert server.jobcli("run", option, value, "--", "true", identity="alice").returncode == 125
    too_many = [arg for index in range(33) for arg in ("-l", f"k{index}=v")]
    result = server.jobcli("start", *too_many, "--", "true", identity="alice")
    assert result.returncode == 2 and b"33 labels; at most 32" in result.stderr
    too_big = [arg for index in range(5) for arg in ("-l", f"k{index}=" + "v" * 1000)]
    result = server.jobcli("start", *too_big, "--", "true", identity="alice")
    assert result.returncode == 2 and b"in all; at most 4096" in result.stderr
    # The server checks too, whatever a client sends.
    with server.client("alice") as client:
        for options in (
            {"name": "x" * 129},
            {"name": "a\nb"},
            {"labels": tuple((f"k{index}", "v") for index in range(33))},
            {"labels": (("k", "v" * 1025),)},
            {"labels": (("k", "a\x00b"),)},
            {"labels": (("k", "1"), ("k", "2"))},
        ):
            with pytest.raises(JobworkerError) as refused:
                client.start(["true"], **options)
            assert refused.value.code is ErrorCode.BAD_REQUEST, options
        with pytest.raises(JobworkerError) as refused:
            client.list(labels=[f"k{index}" for index in range(33)])
        assert refused.value.code is ErrorCode.BAD_REQUEST
        with pytest.raises(JobworkerError):
            client.list(name="bad name")
        # The connection goes on.
        assert client.list(name="x" * 128) == ()
    result = server.jobcli("list", "--label", "=v", identity="alice")
    assert result.returncode == 2


# -- the end-of-job line of an OOM kill --------------------------------------------------------


def test_run_and_wait_say_when_the_kernel_killed_the_job_for_memory(server):
    need_root()
    from jobworker.host.cgroups import detect

    driver = detect()
    need(driver is not None and "memory" in driver.controllers, "no memory controller")
    hog = "b = []\nwhile True: b.append(bytearray(1 << 20))"
    result = server.jobcli("run", "-v", "--memory", "32M", "--", "python3", "-c", hog)
    assert result.returncode == 137, result.stderr
    match = re.search(rb"jobcli: job ([0-9a-f-]{36}) ", result.stderr)
    assert match, result.stderr
    job_id = match.group(1).decode()
    short = uuid.UUID(job_id).hex[:12]
    line = f"jobcli: job {short} was killed by the kernel: out of memory (its memory limit of 32M)\n".encode()
    assert result.stderr.endswith(line), result.stderr
    waited = server.jobcli("wait", job_id)
    assert waited.returncode == 137 and waited.stderr == line, waited.stderr
    assert json.loads(ok(server, "status", "--json", job_id))["state"] == "oom"
