"""
Fuzzing of the frame decoder and the server's connection state machine,
shared by the CI run (C{tests/unit/test_fuzz.py} and C{tests/e2e/test_fuzz_live.py},
a few thousand inputs) and the
long run (C{bench/fuzz.py}, 100,000 and more).

An input is a byte string a client sends after a valid hello exchange: a
mix of valid frames of every message type (the server's own included, which
a client may not send), frames mutated (a bit flipped, a byte replaced, cut
short, a length prefix set to 0, to one off, to huge, an unknown type byte),
frames spliced together and plain random bytes; each is delivered in random
pieces.  Three targets:

  - L{CoreTarget}: the sans-IO server L{Connection} alone, answering every
    request it decodes (so its request and stream bookkeeping is driven too);
  - L{ProtocolTarget}: the real L{ServerProtocol} over an in-memory
    transport and clock, with a stand-in job manager (L{FakeManager});
  - a live server after a real TLS handshake (C{bench/fuzz.py} and
    L{live_inputs}).

The only outcomes allowed are the documented ones: messages, a
L{ProtocolError} (the core) or a C{GoAway} with a connection-tier code (the
server), C{ErrorResponse}s with request-tier codes.  Anything else (another
exception, a traceback logged, an undocumented code, a receive buffer above
the frame maximum) is counted as a crash, with the input kept to replay it.
"""

from __future__ import annotations

import random
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from jobworker.errors import ErrorCode, ProtocolError, RequestError
from jobworker.limits import Limits
from jobworker.output.log import MemorySpool, OutputLog
from jobworker.policy import Operation
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection, Role
from jobworker.protocol.wire import HEADER_SIZE, encode_message, frame_header

__all__ = [
    "CONNECTION_CODES",
    "REQUEST_CODES",
    "CoreTarget",
    "FakeJob",
    "FakeManager",
    "FuzzReport",
    "ProtocolTarget",
    "assert_clean",
    "make_input",
    "print_report",
    "run",
]

CONNECTION_CODES = frozenset(code for code in ErrorCode if code >= 100)
REQUEST_CODES = frozenset(code for code in ErrorCode if code < 100)

# -- a stand-in job manager ---------------------------------------------------------


class FakeJob:
    def __init__(self, owner: str, argv: tuple[str, ...]) -> None:
        self.job_id = uuid.uuid4()
        self.owner = owner
        self.output = OutputLog(MemorySpool())
        self.is_final = False
        self.created_at = int(time.time() * 1e6)
        self.state = m.JobState.RUNNING
        self._status = m.JobStatus(self.job_id, owner, argv, m.JobState.RUNNING, created_at=self.created_at)

    def status(self) -> m.JobStatus:
        return self._status

    def when_ended(self) -> Any:
        from twisted.internet import defer

        return defer.Deferred()

    def stop(self, by: str, grace_s: float) -> None:
        pass


class FakeManager:
    """
    Every identity may see every job, and may start at most a few (the
    jobs run nothing); enough for the server's own code to be exercised.
    """

    def __init__(self, jobs: int = 0) -> None:
        self.jobs: dict[uuid.UUID, FakeJob] = {}
        self.removal_observers: list[Callable[[FakeJob], None]] = []
        for _ in range(jobs):
            self.add()

    def add(self, argv: tuple[str, ...] = ("true",), owner: str = "alice") -> FakeJob:
        job = FakeJob(owner, argv)
        self.jobs[job.job_id] = job
        return job

    def get(self, identity: Any, operation: Operation, job_id: uuid.UUID) -> FakeJob:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise RequestError(f"no job {job_id}", ErrorCode.NOT_FOUND) from None

    def list(self, identity: Any, after: tuple[int, int] = (0, 0), newest_first: bool = False) -> list[FakeJob]:
        if newest_first:
            before = [job for job in self.jobs.values() if after == (0, 0) or (job.created_at, job.job_id.int) < after]
            return sorted(before, key=lambda job: (job.created_at, job.job_id.int), reverse=True)
        return [job for job in self.jobs.values() if (job.created_at, job.job_id.int) > after]

    def start(self, identity: Any, request: m.StartRequest) -> Any:
        from twisted.internet import defer

        if len(self.jobs) >= 64:
            raise RequestError("too many jobs", ErrorCode.TOO_MANY_JOBS)
        return defer.succeed(self.add(tuple(request.argv), identity.name))

    def remove(self, job: FakeJob) -> None:
        self.jobs.pop(job.job_id, None)
        for observer in list(self.removal_observers):
            observer(job)

    def on_removed(self, observer: Callable[[FakeJob], None]) -> Callable[[], None]:
        self.removal_observers.append(observer)
        return lambda: self.removal_observers.remove(observer)


# -- inputs -----------------------------------------------------------------------


def _text(rng: random.Random, size: int = 12) -> str:
    alphabet = "abcXYZ019 _-=\n\x00é☃\U0001f600"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, size)))


def _u32(rng: random.Random) -> int:
    return rng.choice([0, 1, 2, 3, 7, 255, 2**16, 2**31 - 1, 2**32 - 1, rng.randrange(2**32)])


def _message(rng: random.Random, job_ids: list[uuid.UUID]) -> m.Message:
    """
    A random valid message of any type (the server's included).
    """
    job_id = rng.choice(job_ids + [uuid.uuid4()]) if job_ids else uuid.uuid4()
    # Mostly fresh ids; a few from a small set, so some are reused.
    request_id = _u32(rng) if rng.random() < 0.15 else rng.randrange(2**32)
    stream_id = _u32(rng) if rng.random() < 0.15 else rng.randrange(2**32)
    status = m.JobStatus(job_id, _text(rng), (_text(rng),), m.JobState.RUNNING)
    makers: list[Callable[[], m.Message]] = [
        lambda: m.StartRequest(request_id, tuple(_text(rng) for _ in range(rng.randint(0, 3))),
                               env=tuple((_text(rng, 4), _text(rng)) for _ in range(rng.randint(0, 2))),
                               workdir=rng.choice(["", "/", "/tmp", _text(rng)]), user=rng.choice(["", _text(rng)]),
                               network=rng.choice(list(m.Network)),
                               limits=Limits(cpu_millicores=rng.choice([0, 500]), pids=rng.choice([0, 10]))),
        lambda: m.StopRequest(request_id, job_id, grace_ms=_u32(rng), force=rng.random() < 0.5),
        lambda: m.StatusRequest(request_id, job_id),
        lambda: m.ListRequest(request_id),
        lambda: m.WaitRequest(request_id, job_id),
        lambda: m.RemoveRequest(request_id, job_id),
        lambda: m.FollowRequest(request_id, job_id, stream_id, offset=rng.choice([0, 1, 2**63]),
                                window=rng.choice([0, 1, 1 << 20, 2**31 - 1, 2**31]), follow=rng.random() < 0.5),
        lambda: m.WindowUpdate(stream_id, rng.choice([0, 1, 1 << 20, 2**31 - 1, 2**31, 2**32 - 1])),
        lambda: m.CancelStream(stream_id),
        lambda: m.GoAway(rng.choice([0, 100, 105, 65535]), _text(rng)),
        lambda: m.ClientHello(rng.choice([1, 0, 2]), rng.choice([16 << 10, 1 << 20, 0, 2**32 - 1])),
        lambda: m.ServerHello(1, 1 << 20, _text(rng), _text(rng), _text(rng)),
        lambda: m.StatusResponse(request_id, status),
        lambda: m.OkResponse(request_id),
        lambda: m.ErrorResponse(request_id, rng.choice([1, 3, 100]), _text(rng)),
        lambda: m.Output(stream_id, rng.choice([1, 2]), 0, bytes(rng.randrange(256) for _ in range(rng.randint(0, 8)))),
        lambda: m.Gap(stream_id, 0, _u32(rng)),
        lambda: m.EndOfStream(stream_id, m.EndReason.CANCELLED, status),
    ]
    # Requests and flow control are what a client mostly sends.
    weights = [3, 2, 4, 2, 2, 2, 4, 3, 2, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]
    return rng.choices(makers, weights)[0]()


def _encoded(rng: random.Random, job_ids: list[uuid.UUID]) -> bytes:
    while True:
        try:
            return encode_message(_message(rng, job_ids))
        except (ValueError, OverflowError):
            continue  # a value the encoder refuses (our own check, not the decoder's)


def _mutate(rng: random.Random, frame: bytes, max_frame: int) -> bytes:
    data = bytearray(frame)
    how = rng.randrange(9)
    if how == 0 and data:
        position = rng.randrange(len(data))
        data[position] ^= 1 << rng.randrange(8)
    elif how == 1 and data:
        data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == 2 and len(data) > HEADER_SIZE + 1:
        # cut the body short, keeping the header's length
        del data[rng.randrange(HEADER_SIZE + 1, len(data)) :]
    elif how == 3 and len(data) > HEADER_SIZE:
        length = len(data) - HEADER_SIZE
        new = rng.choice([0, 1, length - 1, length + 1, max_frame, max_frame + 1, 2**32 - 1, rng.randrange(2**32)])
        data[:HEADER_SIZE] = max(0, min(new, 2**32 - 1)).to_bytes(HEADER_SIZE, "big")
    elif how == 4 and len(data) > HEADER_SIZE:
        data[HEADER_SIZE] = rng.randrange(256)  # any type byte
    elif how == 5:
        # trailing bytes inside the frame
        extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        body = bytes(data[HEADER_SIZE:]) + extra
        data = bytearray(len(body).to_bytes(HEADER_SIZE, "big") + body)
    elif how == 6:
        data = bytearray(bytes(rng.randrange(256) for _ in range(rng.randint(1, 32))))
    elif how == 7 and len(data) > HEADER_SIZE + 2:
        # a field's bytes shifted: delete one byte in the body, fix the length
        del data[rng.randrange(HEADER_SIZE + 1, len(data))]
        data[:HEADER_SIZE] = (len(data) - HEADER_SIZE).to_bytes(HEADER_SIZE, "big")
    else:
        data += data[HEADER_SIZE:][: rng.randint(0, 16)]
    return bytes(data)


def make_input(rng: random.Random, job_ids: list[uuid.UUID], max_frame: int = 1 << 20) -> bytes:
    """
    One fuzz input: 1 to 8 frames, each valid or mutated, or random bytes.
    """
    pieces = []
    # Mostly valid frames, so the state machine gets deep before it meets
    # a bad one; a mutated frame usually ends the connection.
    mutation_rate = rng.choice([0.0, 0.1, 0.2, 0.5])
    for _ in range(rng.randint(1, 8)):
        frame = _encoded(rng, job_ids)
        if rng.random() < mutation_rate:
            frame = _mutate(rng, frame, max_frame)
        pieces.append(frame)
    if rng.random() < 0.05:
        # the start of a frame that announces a large body and never ends
        pieces.append(frame_header(rng.randint(2, max_frame), rng.choice([0x10, 0x12, 0x16])) + b"\0" * rng.randint(0, 64))
    return b"".join(pieces)


def _chunks(rng: random.Random, data: bytes) -> list[bytes]:
    if rng.random() < 0.5 or len(data) < 2:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 6))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


# -- targets ----------------------------------------------------------------------


@dataclass
class FuzzReport:
    """
    What a run saw.

    @ivar inputs: inputs fed.
    @ivar crashes: inputs that led to anything undocumented.
    @ivar tracebacks: failures the server logged (C{log.failure}, or an
        exception out of C{dataReceived}).
    @ivar protocol_errors: inputs answered by closing the connection with a
        documented connection-tier code.
    @ivar messages: messages the target decoded (or requests it answered).
    @ivar codes: every code seen, by name.
    @ivar examples: the first crashing inputs with what happened.
    """

    inputs: int = 0
    crashes: int = 0
    tracebacks: int = 0
    protocol_errors: int = 0
    messages: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    examples: list[tuple[bytes, str]] = field(default_factory=list)

    def crash(self, data: bytes, what: str) -> None:
        self.crashes += 1
        if len(self.examples) < 5:
            self.examples.append((data, what))

    def code(self, code: int) -> None:
        name = ErrorCode(code).name if code in ErrorCode._value2member_map_ else f"UNDOCUMENTED_{code}"
        self.codes[name] = self.codes.get(name, 0) + 1


class CoreTarget:
    """
    The sans-IO server core after a valid hello exchange, a fresh one per
    input.  Every request it decodes is answered (an C{ErrorResponse}, or
    an C{OkResponse} for a follow, which opens its stream), as the server
    would, so later frames of the input meet pending requests and streams.
    """

    def __init__(self, max_frame: int = 1 << 20) -> None:
        self.max_frame = max_frame

    def feed(self, rng: random.Random, data: bytes, report: FuzzReport) -> None:
        conn = Connection(Role.SERVER, max_frame_size=self.max_frame)
        conn.send(m.ServerHello(m.PROTOCOL_VERSION, self.max_frame, "fuzz", "alice", "admin"))
        conn.receive_data(encode_message(m.ClientHello(m.PROTOCOL_VERSION, 1 << 20)))
        report.inputs += 1
        try:
            for chunk in _chunks(rng, data):
                for message in conn.receive_data(chunk):
                    report.messages += 1
                    # Frames decoded behind a GoAway in the same read are
                    # returned too; the server serves nothing once closed.
                    if not conn.is_closed:
                        self._answer(conn, message)
                if conn.receive_buffered > self.max_frame + HEADER_SIZE:
                    report.crash(data, f"receive buffer of {conn.receive_buffered} bytes")
                    return
        except ProtocolError as error:
            report.protocol_errors += 1
            report.code(error.code)
            if error.code not in CONNECTION_CODES:
                report.crash(data, f"protocol error with a request-tier code {error.code!r}")
            if conn.receive_data(b"\0\0\0\x01\x12") != []:
                report.crash(data, "a closed connection still decodes")
        except Exception:
            report.crash(data, traceback.format_exc())

    @staticmethod
    def _answer(conn: Connection, message: m.Message) -> None:
        if isinstance(message, m.REQUEST_TYPES):
            if isinstance(message, m.FollowRequest):
                conn.send(m.OkResponse(message.request_id))
                if conn.send_window(message.stream_id) > 0:
                    conn.send_output(message.stream_id, 1, 0, b"x")
            else:
                conn.send(m.ErrorResponse(message.request_id, int(ErrorCode.NOT_FOUND), "no"))
        elif isinstance(message, m.CancelStream) and message.stream_id in conn.open_streams:
            conn.send(m.EndOfStream(message.stream_id, m.EndReason.CANCELLED, m.JobStatus(uuid.uuid4(), "", (), m.JobState.RUNNING)))


def _client_certificate() -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "alice"), x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "admin")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


class ProtocolTarget:
    """
    The real L{ServerProtocol} after a valid hello exchange, over an
    in-memory transport and a fake clock; a fresh connection per input, on
    one factory (so connection and stream accounting is checked too: once
    every connection is closed, nothing may stay counted).
    """

    def __init__(self, jobs: int = 3) -> None:
        from twisted.internet.testing import MemoryReactorClock
        from twisted.logger import globalLogPublisher

        from jobworker.server.factory import ServerFactory, ServerLimits

        self.clock = MemoryReactorClock()
        self.manager = FakeManager(jobs)
        self.factory = ServerFactory(self.manager, self.clock, server_name="fuzz", limits=ServerLimits(audit_burst=0))  # type: ignore[arg-type]  # a stand-in manager
        self.certificate = _client_certificate()
        self.failures: list[str] = []
        self._observer = self._watch
        globalLogPublisher.addObserver(self._observer)  # type: ignore[arg-type]  # a callable of one event is an observer

    def close(self) -> None:
        from twisted.logger import globalLogPublisher

        globalLogPublisher.removeObserver(self._observer)  # type: ignore[arg-type]  # a callable of one event is an observer

    def _watch(self, event: dict) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.failures.append(str(event.get("log_failure") or event.get("log_format")))

    def feed(self, rng: random.Random, data: bytes, report: FuzzReport) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.internet.testing import StringTransportWithDisconnection
        from twisted.python.failure import Failure

        certificate = self.certificate

        class Transport(StringTransportWithDisconnection):
            def getPeerCertificate(self) -> Any:
                return certificate

            def abortConnection(self) -> None:
                self.loseConnection()

        protocol = self.factory.buildProtocol(None)
        transport = Transport()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        protocol.handshakeCompleted()
        client = Connection(Role.CLIENT)
        client.receive_data(transport.value())
        transport.clear()
        protocol.dataReceived(client.send(m.ClientHello(m.PROTOCOL_VERSION, 1 << 20)))
        failures = len(self.failures)
        report.inputs += 1
        try:
            for chunk in _chunks(rng, data):
                if not transport.connected:
                    break
                protocol.dataReceived(chunk)
            self.clock.advance(0)  # the pump's turn
        except Exception:
            report.tracebacks += 1
            report.crash(data, traceback.format_exc())
        else:
            self._check_output(transport.value(), data, report)
        if len(self.failures) > failures:
            report.tracebacks += len(self.failures) - failures
            report.crash(data, self.failures[-1])
        if transport.connected:
            transport.loseConnection()
        protocol.connectionLost(Failure(ConnectionDone()))
        if self.factory.open_connections != 0 or self.factory.streams_of("alice") != 0:
            report.crash(data, f"left counted: {self.factory.open_connections} connections, {self.factory.streams_of('alice')} streams")
            self.factory.open_connections = 0
            self.factory._streams_of.clear()
            self.factory._connections_of.clear()

    @staticmethod
    def _check_output(written: bytes, data: bytes, report: FuzzReport) -> None:
        """
        Everything the server wrote must be valid frames (the client core
        decodes them without a protocol error, given that it did not see the
        requests: so only frame syntax and codes are checked here).
        """
        from jobworker.protocol.framing import FrameBuffer
        from jobworker.protocol.wire import decode_body

        try:
            for kind, body in FrameBuffer(16 << 20).receive(written):
                message = decode_body(kind, body)
                report.messages += 1
                if isinstance(message, m.GoAway):
                    report.protocol_errors += 1
                    report.code(message.code)
                    if message.code not in CONNECTION_CODES:
                        report.crash(data, f"GoAway with an undocumented code {message.code}")
                elif isinstance(message, m.ErrorResponse):
                    report.code(message.code)
                    if message.code not in REQUEST_CODES:
                        report.crash(data, f"ErrorResponse with code {message.code}")
                    elif message.code == ErrorCode.INTERNAL:
                        report.crash(data, f"INTERNAL error: {message.message}")
        except ProtocolError as error:
            report.crash(data, f"the server wrote a bad frame: {error.message}")


def run(target: Any, count: int, seed: int = 0, job_ids: list[uuid.UUID] | None = None) -> FuzzReport:
    """
    Feed C{count} inputs made from C{seed} to C{target}.
    """
    rng = random.Random(seed)
    report = FuzzReport()
    ids = job_ids if job_ids is not None else list(getattr(getattr(target, "manager", None), "jobs", {}))
    for _ in range(count):
        target.feed(rng, make_input(rng, ids), report)
    return report


# -- a live server ------------------------------------------------------------------


class LiveTarget:
    """
    A running server, over real TLS: inputs are sent on one connection
    (after a valid hello exchange) until the server closes it, then on a new
    one.  After each input a probe (a C{ListRequest} with a request id of
    the probe's own) shows when the server has dealt with it; a probe
    swallowed by an input's unfinished frame is followed by another after
    C{reprobe_s}, and the server's frame timeout ends a frame that even
    that does not complete (run it with a short C{--frame-timeout}).

    @ivar connections: connections made.
    """

    PROBE_BASE = 0xFFF00000

    def __init__(self, host: str, port: int, context: Any, *, wait_s: float = 6.0, reprobe_s: float = 1.5) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.wait_s = wait_s
        self.reprobe_s = reprobe_s
        self.connections = 0
        self._sock: Any = None
        self._probe = 0

    def _connect(self) -> None:
        import socket

        raw = socket.create_connection((self.host, self.port), timeout=self.wait_s)
        self._sock = self.context.wrap_socket(raw, server_hostname=self.host)
        self.connections += 1
        client = Connection(Role.CLIENT)
        buffer = b""
        while client.peer_hello is None:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection before its hello")
            buffer += data
            for message in client.receive_data(data):
                if isinstance(message, m.GoAway):
                    raise ConnectionError(f"refused: {message.message}")
        self._sock.sendall(client.send(m.ClientHello(m.PROTOCOL_VERSION, 1 << 20)))

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def feed(self, rng: random.Random, data: bytes, report: FuzzReport) -> None:
        from jobworker.protocol.framing import FrameBuffer
        from jobworker.protocol.wire import decode_body

        if self._sock is None:
            self._connect()
        report.inputs += 1
        self._probe = (self._probe + 1) % 0xFFFFF
        probe_id = self.PROBE_BASE + self._probe
        frames = FrameBuffer(16 << 20)
        probes = {probe_id}
        try:
            for chunk in _chunks(rng, data):
                self._sock.sendall(chunk)
            self._sock.sendall(encode_message(m.ListRequest(probe_id)))
            deadline = time.monotonic() + self.wait_s
            self._sock.settimeout(self.reprobe_s)
            while True:
                try:
                    received = self._sock.recv(1 << 20)
                except TimeoutError:
                    # The probe may have completed an input's cut-short
                    # frame instead: ask again.
                    if time.monotonic() >= deadline:
                        raise
                    self._probe = (self._probe + 1) % 0xFFFFF
                    probes.add(self.PROBE_BASE + self._probe)
                    self._sock.sendall(encode_message(m.ListRequest(self.PROBE_BASE + self._probe)))
                    continue
                if not received:
                    self.close()
                    return
                for kind, body in frames.receive(received):
                    message = decode_body(kind, body)
                    report.messages += 1
                    if isinstance(message, m.GoAway):
                        report.protocol_errors += 1
                        report.code(message.code)
                        if message.code not in CONNECTION_CODES:
                            report.crash(data, f"GoAway with an undocumented code {message.code}")
                        self.close()
                        return
                    if isinstance(message, m.ErrorResponse):
                        report.code(message.code)
                        if message.code not in REQUEST_CODES or message.code == ErrorCode.INTERNAL:
                            report.crash(data, f"ErrorResponse {message.code}: {message.message}")
                    if getattr(message, "request_id", None) in probes:
                        return
        except ProtocolError as error:
            report.crash(data, f"the server wrote a bad frame: {error.message}")
            self.close()
        except TimeoutError:
            report.crash(data, f"no answer to {len(probes)} probes within {self.wait_s} s")
            self.close()
        except OSError:
            # A reset after the server's GoAway can beat the GoAway itself.
            self.close()


def run_parallel(make_target: Callable[[], Any], count: int, seed: int, threads: int) -> tuple[FuzzReport, list[Any]]:
    """
    As L{run}, over C{threads} targets fed at once (each its own thread and
    inputs), for a live server: most of the time goes to waiting on it.
    """
    import threading

    targets = [make_target() for _ in range(threads)]
    reports: list[FuzzReport] = [FuzzReport() for _ in range(threads)]
    shares = [count // threads + (1 if index < count % threads else 0) for index in range(threads)]

    def work(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        for _ in range(shares[index]):
            targets[index].feed(rng, make_input(rng, []), reports[index])

    workers = [threading.Thread(target=work, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    total = FuzzReport()
    for report in reports:
        total.inputs += report.inputs
        total.crashes += report.crashes
        total.tracebacks += report.tracebacks
        total.protocol_errors += report.protocol_errors
        total.messages += report.messages
        for name, number in report.codes.items():
            total.codes[name] = total.codes.get(name, 0) + number
        total.examples.extend(report.examples[: 5 - len(total.examples)])
    return total, targets


# -- what the standing runs (tests/unit/test_fuzz.py, tests/e2e/test_fuzz_live.py) report


def print_report(name: str, report: FuzzReport, growth_kib: int) -> None:
    print(
        f"\nfuzz {name}: {report.inputs} inputs, {report.crashes} crashes, {report.tracebacks} tracebacks,"
        f" {report.protocol_errors} protocol errors, {report.messages} messages,"
        f" RSS growth {growth_kib} KiB, codes {dict(sorted(report.codes.items()))}"
    )


def assert_clean(report: FuzzReport) -> None:
    assert report.crashes == 0 and report.tracebacks == 0, [
        (data.hex(), what) for data, what in report.examples
    ]
