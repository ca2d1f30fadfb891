"""
End-to-end tests of the bad input that issue 2 lists, against a real
server: each refused the documented way, and afterwards the server still
serves another client (C{jobcli run -- echo ok}).

Frames are crafted by hand here (C{struct}), not with the protocol module,
so that these tests check the wire format as the spec describes it rather
than our encoder against itself::

    frame   = length: u32 BE (type byte + body) | type: u8 | body
    GoAway  = type 0x03, code: u16 | message: u16 length + UTF-8
    hello   = ServerHello 0x01 first; ClientHello 0x02: version u16 | max_frame_size u32
"""

from __future__ import annotations

import socket
import ssl
import struct
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobworker.blocking import BlockingClient, ConnectionFailed
from jobworker.blocking.tls import client_ssl_context
from jobworker.errors import ErrorCode, RequestError
from jobworker.jobs.admission import MAX_ARGV_BYTES, MAX_ARGV_ITEMS, MAX_ENV_BYTES, MAX_ENV_ITEMS
from jobworker.pki import make_ca, make_client_cert
from jobworker.protocol import messages as m
from jobworker.protocol.wire import decode_body
from tests.support import BIN, start_server

GOAWAY = 0x03
SERVER_HELLO = 0x01
CLIENT_HELLO = 0x02
STATUS_REQUEST = 0x12
LIST_RESPONSE = 0x22

# How long the server may take to answer a bad frame or to close: far less
# than its 10 s handshake timeout and its 5 s abort grace, so a server that
# only drops the connection by timing out does not pass.
PROMPT_S = 2.0


def assert_still_serving(server) -> None:
    """
    The server survived: it runs, and another client gets a job done.
    """
    assert server.alive(), server.log()[-3000:]
    result = server.jobcli("run", "--", "echo", "ok", identity="alice")
    assert (result.returncode, result.stdout) == (0, b"ok\n"), result.stderr


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert text.endswith("\n") and text.count("\n") == 1 and text.strip(), f"not one line: {text!r}"
    return text.strip()


# -- raw frames over TLS ----------------------------------------------------------


class RawConnection:
    """
    A TLS connection to the server that speaks frames built by hand.
    """

    def __init__(self, server, identity: str = "admin") -> None:
        certs = server.certs
        context = client_ssl_context(certs / "ca.pem", certs / f"{identity}.pem", certs / f"{identity}.key")
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self, size: int, deadline: float) -> bool:
        """
        Read until C{size} bytes are buffered; False at end of stream.
        """
        while len(self.buffer) < size:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise AssertionError("the server sent nothing more in time") from None
            except (ssl.SSLError, ConnectionError):
                return False
            if not data:
                return False
            self.buffer += data
        return True

    def read_frame(self, timeout: float = PROMPT_S) -> tuple[int, bytes] | None:
        """
        The next frame as (type, body); None when the connection closed.
        """
        deadline = time.monotonic() + timeout
        if not self._fill(4, deadline):
            return None
        (length,) = struct.unpack(">I", self.buffer[:4])
        if not self._fill(4 + length, deadline):
            return None
        frame, self.buffer = self.buffer[4 : 4 + length], self.buffer[4 + length :]
        return frame[0], frame[1:]

    def hello(self, version: int = m.PROTOCOL_VERSION, max_frame_size: int = 1 << 20) -> None:
        frame = self.read_frame(timeout=10)
        assert frame is not None and frame[0] == SERVER_HELLO, frame
        self.send(struct.pack(">IBHI", 7, CLIENT_HELLO, version, max_frame_size))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def expect_goaway(self, code: ErrorCode) -> str:
        """
        The next frame is a GoAway with C{code}, then the connection closes,
        all within L{PROMPT_S} each.  Returns the GoAway's message.
        """
        frame = self.read_frame()
        assert frame is not None, "the connection closed without a GoAway"
        kind, body = frame
        assert kind == GOAWAY, f"expected a GoAway, got type 0x{kind:02x}"
        (received_code, length) = struct.unpack(">HH", body[:4])
        message = body[4 : 4 + length].decode()
        assert received_code == code, f"GoAway code {received_code} ({message!r}), expected {code.name} ({int(code)})"
        assert self.closed_within(PROMPT_S), "the server did not close the connection after its GoAway"
        return message

    def closed_within(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self._fill(len(self.buffer) + 1, deadline):
                    return True
            except AssertionError:
                return False
        return False


@pytest.fixture
def raw(server):
    connections = []

    def connect(identity: str = "admin") -> RawConnection:
        connection = RawConnection(server, identity)
        connections.append(connection)
        return connection

    yield connect
    for connection in connections:
        connection.close()


def test_malformed_frame_gets_goaway_protocol_error(server, raw):
    connection = raw()
    connection.hello()
    # A StatusRequest needs a 4-byte request id and a 16-byte job id.
    connection.send(struct.pack(">IB", 4, STATUS_REQUEST) + b"\x00\xff\x13")
    connection.expect_goaway(ErrorCode.PROTOCOL_ERROR)
    assert_still_serving(server)


@pytest.mark.parametrize("where", ["name", "label key", "label value", "list name filter", "list label filter"])
def test_invalid_utf8_in_a_name_or_label_gets_goaway_protocol_error(server, raw, where):
    """
    Text on the wire is UTF-8 (spec section 4): a job name, a label or a
    list filter that is not is the peer's protocol error, whatever field it
    is in; the server says so and serves on.
    """
    from jobworker.protocol.wire import encode_message

    marker = "QQQQ"
    message = {
        "name": m.StartRequest(1, ("true",), name=marker),
        "label key": m.StartRequest(1, ("true",), labels=((marker, "v"),)),
        "label value": m.StartRequest(1, ("true",), labels=(("k", marker),)),
        "list name filter": m.ListRequest(1, name=marker),
        "list label filter": m.ListRequest(1, labels=(marker,)),
    }[where]
    frame = encode_message(message)
    assert frame.count(marker.encode()) == 1
    connection = raw()
    connection.hello()
    connection.send(frame.replace(marker.encode(), b"\xff\xfe\xc3\x28"))
    connection.expect_goaway(ErrorCode.PROTOCOL_ERROR)
    assert_still_serving(server)


def test_unknown_message_type_gets_goaway_unknown_message(server, raw):
    connection = raw()
    connection.hello()
    connection.send(struct.pack(">IB", 5, 0x7E) + b"\x00\x00\x00\x01")
    connection.expect_goaway(ErrorCode.UNKNOWN_MESSAGE)
    assert_still_serving(server)


def test_huge_length_prefix_is_refused_without_the_body(server, raw):
    connection = raw()
    connection.hello()
    # Only the length and type byte: the server must not wait for 4 GiB.
    connection.send(struct.pack(">IB", 0xFFFFFFF0, STATUS_REQUEST))
    connection.expect_goaway(ErrorCode.FRAME_TOO_LARGE)
    assert_still_serving(server)


@pytest.mark.parametrize("version", [1, min(m.SUPPORTED_VERSIONS) - 1, m.PROTOCOL_VERSION + 1])
def test_client_hello_with_another_version_gets_goaway_unsupported_version(server, raw, version):
    """
    Older clients (version 1, version 2 jobcli) and one that claims a
    version above the server's hello are refused at once, with a message
    naming the versions the server speaks.
    """
    connection = raw()
    connection.hello(version=version)
    message = connection.expect_goaway(ErrorCode.UNSUPPORTED_VERSION)
    speaks = ", ".join(str(known) for known in sorted(m.SUPPORTED_VERSIONS))
    assert f"version {version}" in message and f"speaks {speaks}" in message
    assert_still_serving(server)


def test_a_version_3_client_lists_oldest_first(server, raw):
    """
    A version 3 client (its list requests end before version 4's
    newest_first flag) is served: its list comes oldest first.
    """
    client = server.client("admin")
    try:
        made = [client.start(["true"]) for _ in range(3)]
    finally:
        client.close()
    connection = raw()
    connection.hello(version=3)
    # list_request.basic of protocol-spec/vectors: request 8, the first page.
    connection.send(bytes.fromhex("000000291300000008" + "00" * 36))
    frame = connection.read_frame()
    assert frame is not None and frame[0] == LIST_RESPONSE, frame
    response = decode_body(*frame, 3)
    assert isinstance(response, m.ListResponse) and response.request_id == 8
    listed = [job.job_id for job in response.jobs]
    assert [job_id for job_id in listed if job_id in made] == made
    assert listed == [job.job_id for job in sorted(response.jobs, key=lambda job: (job.created_at, job.job_id.int))]


def test_plaintext_before_the_tls_handshake_is_dropped(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n" * 4)
        began = time.monotonic()
        received = b""
        sock.settimeout(PROMPT_S)
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail("the server kept a connection that sent plaintext open")
        assert time.monotonic() - began < PROMPT_S
    # At most a TLS alert record (content type 21), never a hello or data.
    assert received == b"" or received[0] == 21, received[:20]
    assert_still_serving(server)


# -- TLS refusals -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_certs(certs, tmp_path_factory) -> Path:
    """
    Client certificates the server must refuse, and another CA.
    """
    directory = tmp_path_factory.mktemp("bad-certs")
    other = directory / "other-ca"
    make_ca(other, name="someone else's CA")
    make_client_cert(directory, other / "ca.pem", other / "ca.key", "admin", "admin", name="foreign")
    now = datetime.now(UTC)
    make_client_cert(
        directory, certs / "ca.pem", certs / "ca.key", "admin", "admin", name="expired",
        not_valid_before=now - timedelta(days=30), not_valid_after=now - timedelta(days=1),
    )
    make_client_cert(
        directory, certs / "ca.pem", certs / "ca.key", "admin", "admin", name="server-eku",
        extended_key_usage=("serverAuth",),
    )
    make_client_cert(
        directory, certs / "ca.pem", certs / "ca.key", "admin", "admin", name="no-eku", extended_key_usage=(),
    )
    return directory


def _tls13_context(certs: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(certs / "ca.pem")
    return context


def _refused(server, context: ssl.SSLContext) -> str:
    """
    Connect with C{context}; the server must refuse before its hello.
    """
    client = BlockingClient(("127.0.0.1", server.port), context, timeout=PROMPT_S * 2)
    try:
        with pytest.raises(ConnectionFailed) as caught:
            client.connect()
    finally:
        client.close()
    assert client.hello is None
    return caught.value.message


def test_client_without_certificate_is_refused(server, certs):
    _refused(server, _tls13_context(certs))
    assert_still_serving(server)


@pytest.mark.parametrize("name", ["foreign", "expired", "server-eku", "no-eku"])
def test_client_certificate_is_refused(server, certs, bad_certs, name):
    # foreign: signed by another CA; expired; server-eku: extended key usage
    # serverAuth only; no-eku: no extended key usage at all.  Each names the
    # admin, so a server that let it in would greet it as admin.
    context = client_ssl_context(certs / "ca.pem", bad_certs / f"{name}.pem", bad_certs / f"{name}.key")
    _refused(server, context)
    assert_still_serving(server)


def test_tls12_client_is_refused(server, certs):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(certs / "ca.pem")
    context.load_cert_chain(certs / "admin.pem", certs / "admin.key")
    message = _refused(server, context)
    assert "handshake" in message or "refused" in message
    assert_still_serving(server)


# -- bad requests -----------------------------------------------------------------------


def test_command_that_does_not_exist(server):
    started = server.jobcli("start", "--", "no-such-command-e2e-bad")
    assert started.returncode == 1 and started.stdout == b""
    assert "no-such-command-e2e-bad" in one_line(started.stderr)
    ran = server.jobcli("run", "--", "no-such-command-e2e-bad")
    assert ran.returncode == 127
    assert_still_serving(server)


def test_empty_argv_is_a_bad_request(server):
    client = server.client("admin")
    try:
        with pytest.raises(RequestError) as caught:
            client.request(m.StartRequest(client.conn.next_request_id(), ()))
        assert caught.value.code is ErrorCode.BAD_REQUEST
        # A request error: the same connection goes on.
        assert isinstance(client.list(), tuple)
    finally:
        client.close()
    result = server.jobcli("start", "--")
    assert result.returncode == 1 and result.stdout == b""
    one_line(result.stderr)
    assert_still_serving(server)


def _start_error(server, argv, env=()) -> RequestError:
    client = server.client("admin")
    try:
        with pytest.raises(RequestError) as caught:
            client.start(list(argv), env=tuple(env))
        assert isinstance(client.list(), tuple)  # the connection goes on
    finally:
        client.close()
    return caught.value


def test_argv_beyond_the_limits_is_refused(server):
    # Bytes: each argument counts its length plus a NUL.  Each argument
    # stays under the wire's 64 KiB per string.
    big = ["x" * 60_000] * (MAX_ARGV_BYTES // 60_000 + 1)
    error = _start_error(server, ["true", *big])
    assert error.code is ErrorCode.BAD_REQUEST
    assert "too long" in error.message
    many = ["x"] * MAX_ARGV_ITEMS
    error = _start_error(server, ["true", *many])
    assert error.code is ErrorCode.BAD_REQUEST
    assert "too long" in error.message
    # Through jobcli: exit 1 and one line.
    result = server.jobcli("start", "--", "true", *big)
    assert result.returncode == 1 and result.stdout == b""
    assert "too long" in one_line(result.stderr)
    assert_still_serving(server)


def test_argument_too_long_for_the_wire_is_a_clear_jobcli_error(server):
    # One argument of 100 kB: within the 256 KiB total, but a string on the
    # wire holds at most 65535 bytes.  jobcli must say so in one line, not
    # crash with a traceback.
    for command in ("start", "run"):
        result = server.jobcli(command, "--", "echo", "z" * 100_000)
        assert result.returncode == (1 if command == "start" else 125), result.stderr[-2000:]
        assert result.stdout == b""
        assert b"Traceback" not in result.stderr
        one_line(result.stderr[-2000:])
    assert_still_serving(server)


def test_argv_within_the_limits_runs(server):
    # Four arguments of 60 kB: under the documented 256 KiB in all, under
    # the wire's 64 KiB per string and the kernel's 128 KiB per argument.
    client = server.client("admin")
    try:
        args = [letter * 60_000 for letter in "abcd"]
        job_id = client.start(["sh", "-c", 'printf %s $((${#1} + ${#2} + ${#3} + ${#4}))', "sh", *args])
        final = client.wait(job_id)
    finally:
        client.close()
    assert final.state is m.JobState.EXITED and final.exit_code == 0, final
    assert server.jobcli("logs", str(job_id), check=True).stdout == b"240000"


def test_env_within_the_limits_runs(server):
    client = server.client("admin")
    try:
        env = tuple((f"BIG_{letter}", letter * 60_000) for letter in "abcd")
        script = 'printf %s $((${#BIG_a} + ${#BIG_b} + ${#BIG_c} + ${#BIG_d}))'
        job_id = client.start(["sh", "-c", script], env=env)
        final = client.wait(job_id)
    finally:
        client.close()
    assert final.state is m.JobState.EXITED and final.exit_code == 0, final
    assert server.jobcli("logs", str(job_id), check=True).stdout == b"240000"


def test_env_beyond_the_limits_is_refused(server):
    big = [(f"BIG{i}", "v" * 60_000) for i in range(MAX_ENV_BYTES // 60_000 + 1)]
    error = _start_error(server, ["true"], env=big)
    assert error.code is ErrorCode.BAD_REQUEST
    assert "environment" in error.message
    many = [(f"V{i}", "") for i in range(MAX_ENV_ITEMS + 1)]
    error = _start_error(server, ["true"], env=many)
    assert error.code is ErrorCode.BAD_REQUEST
    assert "environment" in error.message
    # Through jobcli: exit 1 and one line.
    options = [item for i in range(len(big)) for item in ("-e", f"BIG{i}=" + "v" * 60_000)]
    result = server.jobcli("start", *options, "--", "true")
    assert result.returncode == 1 and result.stdout == b""
    assert "environment" in one_line(result.stderr)
    assert_still_serving(server)


@pytest.mark.parametrize(
    "command, code",
    [(("status",), 1), (("status", "--json"), 1), (("logs",), 1), (("logs", "-f"), 125), (("stop",), 1), (("rm",), 1), (("wait",), 125)],
)
def test_unknown_job_id(server, command, code):
    missing = str(uuid.uuid4())
    result = server.jobcli(*command, missing)
    assert result.returncode == code
    assert result.stdout == b""
    assert missing in one_line(result.stderr)
    assert_still_serving(server)


def test_stop_of_a_finished_job(server):
    job_id = server.jobcli("start", "--", "sh", "-c", "exit 3", check=True).stdout.decode().strip()
    assert server.jobcli("wait", job_id).returncode == 3
    # As docker stop (issue 13): a job that has ended is stopped already.
    result = server.jobcli("stop", job_id)
    assert result.returncode == 0
    assert result.stdout == b"" and result.stderr == b""
    # The job is as it was.
    after = server.jobcli("status", "--json", job_id, check=True).stdout
    assert b'"state": "exited"' in after and b'"exit_code": 3' in after
    assert_still_serving(server)


def test_follower_that_disconnects_mid_stream(server):
    lines = 40
    script = f'i=0; while [ $i -lt {lines} ]; do echo "line $i"; i=$((i+1)); sleep 0.05; done'
    expected = b"".join(b"line %d\n" % i for i in range(lines))
    job_id = server.jobcli("start", "--", "sh", "-c", script, check=True).stdout.decode().strip()
    # A second follower, jobcli logs -f, from the start.
    other = subprocess.Popen(
        [str(BIN / "jobcli"), "logs", "-f", job_id],
        env=server.env("viewer"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        leaver = server.client("admin")
        received = b""
        for message in leaver.follow(uuid.UUID(job_id)):
            assert isinstance(message, m.Output), message
            received += message.data
            if received.count(b"\n") >= 3:
                break
        # Leave mid-stream, without cancelling or a TLS close.
        leaver._sock.socket.shutdown(socket.SHUT_RDWR)
        leaver.close()
        assert expected.startswith(received)
        out, err = other.communicate(timeout=30)
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
    assert other.returncode == 0, err
    assert out == expected
    final = server.jobcli("status", "--json", job_id, check=True).stdout
    assert b'"state": "exited"' in final
    assert server.jobcli("logs", job_id, check=True).stdout == expected
    assert_still_serving(server)


# -- timeouts ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def impatient_server(certs, tmp_path_factory):
    running = start_server(certs, tmp_path_factory.mktemp("impatient") / "state", "--handshake-timeout", "1")
    yield running
    running.stop()


def test_silent_tcp_client_is_dropped_after_the_handshake_timeout(impatient_server):
    with socket.create_connection(("127.0.0.1", impatient_server.port), timeout=10) as sock:
        began = time.monotonic()
        sock.settimeout(1 + PROMPT_S)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail("the server kept a silent connection past its 1 s handshake timeout")
        elapsed = time.monotonic() - began
    assert 0.7 <= elapsed < 1 + PROMPT_S, elapsed
    assert_still_serving(impatient_server)


def test_client_that_never_sends_its_hello_is_dropped_after_the_handshake_timeout(impatient_server):
    connection = RawConnection(impatient_server)
    try:
        began = time.monotonic()
        frame = connection.read_frame(timeout=5)
        assert frame is not None and frame[0] == SERVER_HELLO
        # ... and no ClientHello from us.
        frame = connection.read_frame(timeout=1 + PROMPT_S)
        assert frame is not None, "closed without a GoAway"
        assert frame[0] == GOAWAY and struct.unpack(">H", frame[1][:2])[0] == ErrorCode.TIMEOUT
        assert time.monotonic() - began >= 0.7
        assert connection.closed_within(PROMPT_S), "the server did not close the connection after its GoAway"
    finally:
        connection.close()
    assert_still_serving(impatient_server)


def test_limits_out_of_range_are_that_requests_error(server):
    """
    A start request whose limits no parser would accept (a CPU limit of
    4 294 967 cores) is answered INVALID_LIMITS; the connection and a wait
    pending on it go on.
    """
    client = server.client("admin")
    try:
        job_id = client.start(["sleep", "0.5"])
        waiting = client.conn.next_request_id()
        client._write(client.conn.send(m.WaitRequest(waiting, job_id)))
        request_id = client.conn.next_request_id()
        frame = bytearray(client.conn.send(m.StartRequest(request_id, ("true",))))
        # header (5), request id (4), argv (2 + 2 + 4), env (2), workdir (2),
        # user (2), network (1): then the u32 cpu_millicores.
        at = 5 + 4 + 8 + 2 + 2 + 2 + 1
        assert frame[at : at + 4] == b"\0\0\0\0"
        frame[at : at + 4] = b"\xff\xff\xff\xff"
        client._write(bytes(frame))
        with pytest.raises(RequestError) as caught:
            client._await_response(request_id)
        assert caught.value.code is ErrorCode.INVALID_LIMITS
        assert "cpu_millicores" in caught.value.message
        # The wait sent before the bad request is answered on the same connection.
        status = client._await_response(waiting).status
        assert status.state is m.JobState.EXITED
    finally:
        client.close()
    assert_still_serving(server)
