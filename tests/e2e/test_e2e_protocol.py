"""
End-to-end tests of long silences, keep-alive and protocol conformance
(issue 10, sections 1 and 6) against a real server, real TLS and real jobs.

Keep-alive intervals here are fractions of a second, set by the options a
user has (C{--keepalive-interval} for the server, C{--keepalive} for
C{jobcli}, C{keepalive_interval} for the libraries), so the tests prove in
seconds what the defaults do in a minute.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import uuid
from typing import Any

import pytest

from jobworker.blocking import BlockingClient
from jobworker.blocking.tls import client_ssl_context
from jobworker.errors import ErrorCode, RequestError
from jobworker.protocol import messages as m
from jobworker.protocol.connection import MIN_FRAME_SIZE, Connection, Role
from tests.support import BIN, start_server

# A server that answers promptly does so well within this (seconds).
PROMPT_S = 3.0


def blocking_client(server, identity: str = "admin", **options) -> BlockingClient:
    certs = server.certs
    context = client_ssl_context(certs / "ca.pem", certs / f"{identity}.pem", certs / f"{identity}.key")
    client = BlockingClient(("127.0.0.1", server.port), context, **options)
    client.connect()
    return client


def start(server, argv: list[str], identity: str = "admin") -> uuid.UUID:
    with blocking_client(server, identity) as client:
        return client.start(argv)


def jobcli(server, *args: str, identity: str = "admin", **options) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "jobcli"), *args],
        env=server.env(identity),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        **options,
    )


def wait_for_log(server, text: str, count: int = 1, timeout: float = 20) -> None:
    """
    Wait until the server's log holds C{text} C{count} times (a client
    subprocess may take a while to start on a loaded machine).
    """
    deadline = time.monotonic() + timeout
    while server.log().count(text) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged {count} times in {timeout} s")
        time.sleep(0.05)


# -- long silences -------------------------------------------------------------------


SILENT = ["sh", "-c", "sleep 3; echo done; exit 7"]


def test_wait_and_follow_outlast_the_read_timeout(server) -> None:
    """
    The client's timeout bounds its set-up, never a wait: with a 1 s timeout
    (it was 30 s, hard-coded, for every read) a job silent for 3 s is waited
    for and followed to its end.
    """
    with blocking_client(server, timeout=1.0, keepalive_interval=0.5) as client:
        job_id = client.start(SILENT)
        assert client.wait(job_id).exit_code == 7
    with blocking_client(server, timeout=1.0, keepalive_interval=0.5) as client:
        job_id = client.start(SILENT)
        messages = list(client.follow(job_id))
    assert [message.data for message in messages if isinstance(message, m.Output)] == [b"done\n"]
    assert messages[-1].status.exit_code == 7


def test_wait_without_keepalive_waits_too(server) -> None:
    with blocking_client(server, timeout=1.0, keepalive_interval=0) as client:
        assert client.wait(client.start(["sh", "-c", "sleep 2"])).exit_code == 0


@pytest.mark.parametrize("command", ["run", "wait", "logs -f"])
def test_jobcli_waits_through_a_quiet_job(server, command: str) -> None:
    """
    C{jobcli run}, C{wait} and C{logs -f} ping a quiet server and wait for
    the job's end; the exit code is the job's.
    """
    if command == "run":
        result = server.jobcli("--keepalive", "0.5", "run", "--", *SILENT)
        assert (result.returncode, result.stdout) == (7, b"done\n"), result.stderr
        return
    job_id = str(start(server, SILENT))
    result = server.jobcli("--keepalive", "0.5", *command.split(), job_id)
    assert result.returncode == 7, result.stderr
    assert result.stdout == (b"done\n" if command == "logs -f" else b"")


@pytest.fixture
def own_server(certs, tmp_path):
    """
    A server of the test's own (it may be stopped with SIGSTOP), pinging
    its clients after 0.5 s of silence.
    """
    running = start_server(certs, tmp_path / "state", "--keepalive-interval", "0.5")
    yield running
    try:
        os.kill(running.process.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    running.stop()


def test_jobcli_notices_a_server_that_vanished(own_server) -> None:
    """
    A server that stops answering (SIGSTOP: no FIN, no RST, the kernel still
    ACKs) is given up on within twice the keep-alive interval, not waited
    for for ever.
    """
    job_id = str(start(own_server, ["sleep", "60"]))
    waiting = jobcli(own_server, "--keepalive", "0.5", "wait", job_id)
    wait_for_log(own_server, "connection from", 2)  # start's, then jobcli's
    time.sleep(0.5)  # its WaitRequest follows the hello (waits are audited when answered)
    os.kill(own_server.process.pid, signal.SIGSTOP)
    began = time.monotonic()
    try:
        _, stderr = waiting.communicate(timeout=15)
    finally:
        os.kill(own_server.process.pid, signal.SIGCONT)
    elapsed = time.monotonic() - began
    assert waiting.returncode == 125
    assert b"keep-alive" in stderr, stderr
    assert elapsed < 1.0 + PROMPT_S, elapsed


def test_twisted_client_notices_a_server_that_vanished(own_server) -> None:
    script = f"""
import sys
from twisted.internet import defer, task
from jobworker.client import connect, ClientConnectionLost
from jobworker.errors import ErrorCode
import uuid

async def main(reactor):
    client = await connect(reactor, "127.0.0.1:{own_server.port}", ca="{own_server.certs}/ca.pem",
                           cert="{own_server.certs}/admin.pem", key="{own_server.certs}/admin.key",
                           keepalive_interval=0.5)
    job_id = await client.start(["sleep", "60"])
    print("waiting", flush=True)
    try:
        await client.wait(job_id)
    except ClientConnectionLost as exc:
        print("lost", exc.code.name, flush=True)

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""
    process = subprocess.Popen([str(BIN / "python"), "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"waiting\n"
        time.sleep(0.3)  # the wait request follows the print at once
        os.kill(own_server.process.pid, signal.SIGSTOP)
        began = time.monotonic()
        out, err = process.communicate(timeout=15)
        elapsed = time.monotonic() - began
    finally:
        os.kill(own_server.process.pid, signal.SIGCONT)
        if process.poll() is None:
            process.kill()
    assert out == b"lost TIMEOUT\n", err
    assert elapsed < 1.0 + PROMPT_S


def test_server_notices_a_client_that_vanished(own_server) -> None:
    """
    A client stopped with SIGSTOP (its kernel still ACKs, it answers no
    ping) loses its connection within twice the server's keep-alive
    interval; the job goes on.
    """
    job_id = str(start(own_server, ["sleep", "60"]))
    waiting = jobcli(own_server, "--keepalive", "0", "wait", job_id)
    wait_for_log(own_server, "connection from", 2)  # start's, then jobcli's
    time.sleep(0.5)  # its WaitRequest follows the hello (waits are audited when answered)
    waiting.send_signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 1.0 + PROMPT_S
        while "no answer to a keep-alive ping" not in own_server.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "no answer to a keep-alive ping" in own_server.log()
    finally:
        waiting.send_signal(signal.SIGCONT)
    _, stderr = waiting.communicate(timeout=15)
    assert waiting.returncode == 125, stderr
    with blocking_client(own_server) as client:
        assert client.status(uuid.UUID(job_id)).state is m.JobState.RUNNING
        client.stop(uuid.UUID(job_id), force=True)


def test_a_reader_that_holds_jobcli_up_is_not_taken_for_dead(own_server) -> None:
    """
    C{jobcli logs -f ID | less}, with less paused: jobcli cannot write, but
    it goes on answering the server's pings, so the server (pinging after
    0.5 s) keeps the stream; everything arrives once the reader reads.
    """
    size = 4 << 20  # more than the 8 MiB window's half, far more than a pipe holds
    job_id = str(start(own_server, ["sh", "-c", f"head -c {size} /dev/zero; sleep 5"]))
    reader = jobcli(own_server, "--keepalive", "0", "logs", "-f", job_id)
    wait_for_log(own_server, "operation=logs")
    time.sleep(3)  # six keep-alive intervals without reading jobcli's stdout
    assert "no answer to a keep-alive ping" not in own_server.log()
    out, err = reader.communicate(timeout=60)
    assert (reader.returncode, len(out)) == (0, size), err


# -- protocol conformance ----------------------------------------------------------


class RawClient:
    """
    A TLS connection driven by a client L{Connection}, frame by frame.
    """

    def __init__(self, server, identity: str = "admin", max_frame_size: int = 1 << 20) -> None:
        certs = server.certs
        context = client_ssl_context(certs / "ca.pem", certs / f"{identity}.pem", certs / f"{identity}.key")
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", server.port), timeout=10), server_hostname="127.0.0.1")
        self.conn = Connection(Role.CLIENT, max_frame_size=max_frame_size)
        self.inbox: list[m.Message] = []
        [hello] = self.read(1)
        assert isinstance(hello, m.ServerHello)
        self.send(m.ClientHello(self.conn.version, max_frame_size))

    def send(self, *messages: m.Message) -> None:
        self.sock.sendall(b"".join(self.conn.send(message) for message in messages))

    def read(self, count: int, timeout: float = PROMPT_S) -> list[m.Message]:
        deadline = time.monotonic() + timeout
        while len(self.inbox) < count:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                raise AssertionError(f"{len(self.inbox)} of {count} messages in {timeout} s: {self.inbox!r}") from None
            if not data:
                raise AssertionError("the server closed the connection")
            self.inbox += self.conn.receive_data(data)
        taken, self.inbox = self.inbox[:count], self.inbox[count:]
        return taken

    def closed_within(self, timeout: float) -> tuple[bool, bytes]:
        """
        Whether the server closes within C{timeout}, and what it sent first.
        """
        deadline = time.monotonic() + timeout
        received = b""
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except (ssl.SSLError, ConnectionError):
                return True, received
            if not data:
                return True, received
            received += data
        return False, received

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(server):
    made: list[RawClient] = []

    def connect(**options) -> RawClient:
        client = RawClient(server, **options)
        made.append(client)
        return client

    yield connect
    for client in made:
        client.close()


def test_a_client_goaway_closes_the_connection_at_once(server, raw) -> None:
    client = raw()
    job_id = start(server, ["sleep", "30"])
    client.send(m.WaitRequest(1, job_id), m.GoAway(int(ErrorCode.PROTOCOL_ERROR), "this client gives up"))
    closed, sent = client.closed_within(PROMPT_S)
    assert closed and sent == b"", sent
    assert "went away" in server.log()
    with blocking_client(server) as other:
        other.stop(job_id, force=True)


def test_the_129th_wait_of_one_write_is_refused_and_no_other(server, raw) -> None:
    client = raw()
    job_id = start(server, ["sleep", "30"])
    client.send(*(m.WaitRequest(i, job_id) for i in range(1, 130)))
    [refused] = client.read(1)
    assert isinstance(refused, m.ErrorResponse)
    assert (refused.request_id, refused.code) == (129, ErrorCode.TOO_MANY_REQUESTS)
    with blocking_client(server) as other:
        other.stop(job_id, force=True)
    answers = client.read(128, timeout=15)
    assert sorted(answer.request_id for answer in answers) == list(range(1, 129))
    assert all(isinstance(answer, m.StatusResponse) for answer in answers)


def test_a_burst_of_follows_is_refused_only_beyond_the_stream_cap(server, raw) -> None:
    client = raw()
    job_id = start(server, ["sleep", "30"])
    client.send(*(m.FollowRequest(i, job_id, i, window=0) for i in range(1, 301)))
    answers = client.read(300)
    assert [a.request_id for a in answers if isinstance(a, m.OkResponse)] == list(range(1, 257))
    assert {a.request_id: a.code for a in answers if isinstance(a, m.ErrorResponse)} == {
        i: ErrorCode.TOO_MANY_STREAMS for i in range(257, 301)
    }
    with blocking_client(server) as other:
        other.stop(job_id, force=True)


def test_every_stream_ends_whatever_the_client_frame_size(server, raw) -> None:
    """
    A client announcing the smallest frame (16 KiB) follows a job whose
    argv is 20 KB: the stream ends with one EndOfStream carrying the
    abridged final status, and its status answer is abridged too.
    """
    client = raw(max_frame_size=MIN_FRAME_SIZE)
    argv = ("sh", "-c", "echo hi; exit 3", *("p" * 1000 for _ in range(20)))
    client.send(m.StartRequest(1, argv))
    [started] = client.read(1)
    assert isinstance(started, m.StartResponse), started
    client.send(m.FollowRequest(2, started.job_id, 1))
    [ok, output, end] = client.read(3, timeout=10)
    assert isinstance(ok, m.OkResponse) and output.data == b"hi\n"
    assert isinstance(end, m.EndOfStream) and end.reason is m.EndReason.JOB_ENDED
    assert end.status.abridged and end.status.exit_code == 3 and end.status.argv[:3] == argv[:3]
    client.send(m.StatusRequest(3, started.job_id))
    [status] = client.read(1)
    assert isinstance(status, m.StatusResponse) and status.status.abridged
    with blocking_client(server) as full:
        complete = full.status(started.job_id)
    assert complete.argv == argv and not complete.abridged


BAD_STARTS: dict[str, dict[str, Any]] = {
    "NUL in user": dict(argv=["true"], user="no\0body"),
    "NUL in argv[0]": dict(argv=["tr\0ue"]),
    "NUL in an argument": dict(argv=["echo", "a\0b"]),
    "NUL in an env name": dict(argv=["true"], env=(("A\0B", "x"),)),
    "NUL in an env value": dict(argv=["true"], env=(("A", "x\0y"),)),
    "= in an env name": dict(argv=["true"], env=(("A=B", "x"),)),
    "empty env name": dict(argv=["true"], env=(("", "x"),)),
    "NUL in workdir": dict(argv=["true"], workdir="/tm\0p"),
    "relative workdir": dict(argv=["true"], workdir="tmp"),
    "empty argv[0]": dict(argv=[""]),
}


@pytest.mark.parametrize("identity", ["admin", "alice"])
@pytest.mark.parametrize("case", sorted(BAD_STARTS))
def test_every_string_rule_is_a_bad_request(server, case: str, identity: str) -> None:
    fields = dict(BAD_STARTS[case])
    argv = fields.pop("argv")
    with blocking_client(server, identity) as client:
        with pytest.raises(RequestError) as refused:
            client.start(argv, **fields)
        assert refused.value.code is ErrorCode.BAD_REQUEST, refused.value
        assert isinstance(client.list(), tuple)  # the connection goes on
    assert "Traceback" not in server.log()


def test_jobs_with_the_largest_argv_do_not_break_the_list(server) -> None:
    """
    Five jobs of alice's, each with a 260 KB argv (the most a start may
    carry): 1.3 MB of statuses, more than one 1 MiB frame.  Every role's
    list still works, in pages, and the server filters by state and owner.
    """
    argv = ["true", *("z" * 65_000 for _ in range(4))]
    with blocking_client(server, "alice") as client:
        made = [client.start(argv) for _ in range(5)]
        for job_id in made:
            client.wait(job_id)
    for identity in ("admin", "viewer", "alice"):
        result = server.jobcli("list", "--json", identity=identity)
        assert result.returncode == 0, result.stderr
        listed = {job["id"]: job for job in json.loads(result.stdout)}
        assert {str(job_id) for job_id in made} <= set(listed)
        assert all(listed[str(job_id)]["command"] == argv for job_id in made)
    result = server.jobcli("list", "--owner", "alice", "--state", "exited,failed", "--json")
    filtered = json.loads(result.stdout)
    assert {str(job_id) for job_id in made} <= {job["id"] for job in filtered}
    assert {(job["owner"], job["state"]) for job in filtered} <= {("alice", "exited"), ("alice", "failed")}
    result = server.jobcli("list", "--state", "running", "--owner", "nobody-at-all")
    assert result.returncode == 0 and result.stdout.decode().count("\n") == 1  # the header only
    with blocking_client(server, "alice") as client:
        for job_id in made:
            client.remove(job_id)


def test_jobcli_list_refuses_an_unknown_state(server) -> None:
    result = server.jobcli("list", "--state", "sleeping")
    assert result.returncode == 2 and b"not a job state" in result.stderr


@pytest.fixture
def idle_server(certs, tmp_path):
    running = start_server(certs, tmp_path / "state", "--idle-timeout", "2", "--keepalive-interval", "0")
    yield running
    running.stop()


def test_idle_timeout_counts_afresh_after_a_wait_longer_than_it(idle_server) -> None:
    """
    A wait of 4 s on a server with a 2 s idle timeout is not cut; once it
    is answered the connection is idle, and is closed 2 s later (before the
    fix it stayed open for ever).
    """
    client = RawClient(idle_server)
    try:
        job_id = start(idle_server, ["sleep", "4"])
        client.send(m.WaitRequest(1, job_id))
        [answer] = client.read(1, timeout=10)
        assert isinstance(answer, m.StatusResponse) and answer.status.state is m.JobState.EXITED
        answered = time.monotonic()
        closed, sent = client.closed_within(5)
        assert closed
        assert 1.5 < time.monotonic() - answered < 4
        assert m.GoAway.TYPE in sent[4:5]
    finally:
        client.close()


def test_an_incomplete_frame_does_not_keep_a_connection_from_idling(idle_server) -> None:
    """
    Bytes of a frame that never completes are not a request: the connection
    is idle all along and is closed after the 2 s idle timeout, while the
    bytes still trickle in (they used to restart the timer for ever).
    """
    client = RawClient(idle_server)
    try:
        frame = client.conn.send(m.StatusRequest(1, uuid.uuid4()))
        began = time.monotonic()
        closed = False
        for byte in frame[:-1]:  # one byte every 0.15 s for 3.75 s: never a whole frame
            try:
                client.sock.sendall(bytes([byte]))
            except (ssl.SSLError, ConnectionError):
                closed = True
                break
            closed, _ = client.closed_within(0.15)
            if closed:
                break
        assert closed
        assert 1.5 < time.monotonic() - began < 3.0
    finally:
        client.close()
