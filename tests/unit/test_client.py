"""
The embeddable Twisted client.

The tests play the server with L{jobworker.testing} (the real server-side
sans-IO core over a StringTransport, no reactor); those that talk to a real
server over real TLS are L{tests.e2e.test_client_real_server}.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionClosed, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from jobworker.client import ClientConnectionLost, Follower, JobworkerClientProtocol, connect
from jobworker.errors import ErrorCode, JobworkerError, RequestError
from jobworker.limits import Limits
from jobworker.protocol import messages as m
from jobworker.testing import FakeServer, connected_pair, job_status

JOB = uuid.UUID("12345678-1234-5678-1234-567812345678")


def result_of(deferred: defer.Deferred[Any]) -> Any:
    """
    The result a Deferred has already fired with.
    """
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, f"{deferred!r} has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def failure_of(deferred: defer.Deferred[Any], *kinds: type[BaseException]) -> Any:
    """
    The exception a Deferred has already failed with, which must be one of
    C{kinds}.
    """
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, f"{deferred!r} has not fired"
    assert isinstance(results[0], Failure), f"{deferred!r} succeeded with {results[0]!r}"
    assert results[0].check(*kinds), results[0]
    return results[0].value


def has_fired(deferred: defer.Deferred[Any]) -> bool:
    return deferred.called


class Recorder:
    """
    An output receiver that keeps what it was given, in order.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, int, Any]] = []

    def output(self, fd: int, data: bytes) -> None:
        self.events.append(("output", fd, data))

    def gap(self, offset: int, length: int) -> None:
        self.events.append(("gap", offset, length))

    @property
    def data(self) -> bytes:
        return b"".join(data for kind, _, data in self.events if kind == "output")


def open_follow(
    client: JobworkerClientProtocol, server: FakeServer, receiver: Any = None, **options: Any
) -> tuple[Follower, m.FollowRequest, Recorder]:
    """
    Follow L{JOB} and have the server accept it.
    """
    recorder = Recorder()
    follower = client.follow(JOB, receiver or recorder, **options)
    request = server.receive_one(m.FollowRequest)
    server.send(m.OkResponse(request.request_id))
    return follower, request, recorder


def output(request: m.FollowRequest, offset: int, data: bytes, fd: int = 1) -> m.Output:
    return m.Output(request.stream_id, fd, offset, data)


# -- hello -------------------------------------------------------------------------


def test_hello_exchange() -> None:
    """
    The client answers the server's hello and then, only then, is ready.
    """
    client = JobworkerClientProtocol()
    server = FakeServer(client)
    client.makeConnection(server.transport)
    assert not has_fired(client.ready)
    with pytest.raises(ValueError, match="hello"):
        client.list()
    assert server.transport.value() == b""  # the server speaks first
    server.send(m.ServerHello(m.PROTOCOL_VERSION, 1 << 20, "worker-1", "alice", "user"))
    hello = server.receive_one(m.ClientHello)
    assert hello.version == m.PROTOCOL_VERSION
    assert hello.max_frame_size == client.conn.max_frame_size
    assert result_of(client.ready).identity == "alice"
    assert client.hello is not None and client.hello.server_name == "worker-1"


def test_loss_before_hello_fails_ready() -> None:
    client = JobworkerClientProtocol()
    server = FakeServer(client)
    client.makeConnection(server.transport)
    server.drop(ConnectionLost("reset"))
    error = failure_of(client.ready, ClientConnectionLost)
    assert "before the server's hello" in error.message
    assert isinstance(error.reason, ConnectionLost)


def test_goaway_instead_of_hello_fails_ready() -> None:
    client = JobworkerClientProtocol()
    server = FakeServer(client)
    client.makeConnection(server.transport)
    server.go_away(ErrorCode.TOO_MANY_REQUESTS, "busy")
    error = failure_of(client.ready, ClientConnectionLost)
    assert error.code is ErrorCode.TOO_MANY_REQUESTS
    assert "busy" in str(error)


# -- requests ----------------------------------------------------------------------


def test_concurrent_requests_answered_out_of_order() -> None:
    """
    Each answer fires the Deferred of its own request, whatever the order.
    """
    client, server = connected_pair()
    other = uuid.uuid4()
    started = client.start(["echo", "hi"])
    status = client.status(JOB)
    waited = client.wait(other)
    listed = client.list()
    stopped = client.stop(JOB)
    removed = client.remove(other)
    requests = server.receive()
    assert [type(request) for request in requests] == [
        m.StartRequest, m.StatusRequest, m.WaitRequest, m.ListRequest, m.StopRequest, m.RemoveRequest,
    ]
    assert len({request.request_id for request in requests}) == 6
    start, status_request, wait, list_request, stop, remove = requests
    new_job = uuid.uuid4()
    running = job_status(JOB, state=m.JobState.RUNNING)
    ended = job_status(other, exit_code=7)
    server.send(m.OkResponse(remove.request_id), m.StatusResponse(wait.request_id, ended))
    assert result_of(removed) is None
    assert result_of(waited) == ended
    assert not any(has_fired(d) for d in (started, status, listed, stopped))
    server.send(
        m.ListResponse(list_request.request_id, (running, ended)),
        m.OkResponse(stop.request_id),
        m.StatusResponse(status_request.request_id, running),
        m.StartResponse(start.request_id, new_job),
    )
    assert result_of(started) == new_job
    assert result_of(status) == running
    assert result_of(listed) == (running, ended)
    assert result_of(stopped) is None
    assert client.conn.pending_requests == 0


def test_request_fields() -> None:
    client, server = connected_pair()
    limits = Limits(memory_bytes=64 << 20, pids=10)
    client.start(
        ["sh", "-c", "env"], env={"A": "1"}, workdir="/tmp", user="nobody", network=m.Network.HOST, limits=limits
    )
    client.stop(JOB, grace=2.5)
    client.stop(JOB, force=True)
    start, stop, kill = server.receive()
    assert start == m.StartRequest(
        start.request_id, ("sh", "-c", "env"), (("A", "1"),), "/tmp", "nobody", m.Network.HOST, limits
    )
    assert (stop.job_id, stop.grace_ms, stop.force) == (JOB, 2500, False)
    assert kill.force


def test_bad_arguments_fail_the_deferred() -> None:
    client, server = connected_pair()
    failure_of(client.stop(JOB, grace=-1), ValueError)
    failure_of(client.start(["x" * 70_000]), ValueError)
    assert server.receive() == []
    # The connection is still good.
    listed = client.list()
    server.send(m.ListResponse(server.receive_one(m.ListRequest).request_id, ()))
    assert result_of(listed) == ()


def test_error_response_is_request_error_with_its_code() -> None:
    """
    An error answers one request; the others and the connection go on.
    """
    client, server = connected_pair()
    missing = client.status(JOB)
    denied = client.stop(JOB)
    strange = client.remove(JOB)
    fine = client.list()
    status_request, stop, remove, list_request = server.receive()
    server.send(
        m.ErrorResponse(stop.request_id, ErrorCode.PERMISSION_DENIED, "alice may not stop it"),
        m.ErrorResponse(status_request.request_id, ErrorCode.NOT_FOUND, f"no job {JOB}"),
        m.ErrorResponse(remove.request_id, 9999, "a code from the future"),
        m.ListResponse(list_request.request_id, ()),
    )
    error = failure_of(missing, RequestError)
    assert (error.code, error.message) == (ErrorCode.NOT_FOUND, f"no job {JOB}")
    error = failure_of(denied, RequestError)
    assert (error.code, error.message) == (ErrorCode.PERMISSION_DENIED, "alice may not stop it")
    assert failure_of(strange, RequestError).code is ErrorCode.INTERNAL
    assert result_of(fine) == ()
    assert client.conn.is_open


def test_cancelled_request_ignores_its_answer() -> None:
    client, server = connected_pair()
    waited = client.wait(JOB)
    request = server.receive_one(m.WaitRequest)
    waited.cancel()
    failure_of(waited, defer.CancelledError)
    server.send(m.StatusResponse(request.request_id, job_status(JOB)))
    assert client.conn.is_open


# -- the end of the connection -----------------------------------------------------


def test_connection_loss_fails_everything_pending() -> None:
    """
    Every pending request and every follower, opened or still asked for,
    fails with one ClientConnectionLost, which Twisted code recognises as a
    closed connection.
    """
    client, server = connected_pair()
    waited = client.wait(JOB)
    listed = client.list()
    server.receive()
    open_follower, _, _ = open_follow(client, server)
    asked_follower = client.follow(JOB, Recorder())
    server.receive()
    server.drop(ConnectionLost("connection reset by peer"))
    errors = [
        failure_of(waited, ClientConnectionLost),
        failure_of(listed, ClientConnectionLost),
        failure_of(open_follower.done, ClientConnectionLost),
        failure_of(asked_follower.done, ClientConnectionLost),
    ]
    assert all(error is errors[0] for error in errors)
    assert isinstance(errors[0], (JobworkerError, ConnectionClosed))
    assert "connection reset by peer" in str(errors[0])
    # Later requests fail at once.
    assert failure_of(client.status(JOB), ClientConnectionLost) is errors[0]
    assert failure_of(client.follow(JOB, Recorder()).done, ClientConnectionLost) is errors[0]


def test_callback_making_a_request_on_loss_fails_at_once() -> None:
    client, server = connected_pair()
    later: list[defer.Deferred[Any]] = []
    client.wait(JOB).addErrback(lambda _: later.append(client.list()))
    server.drop()
    [retried] = later
    failure_of(retried, ClientConnectionLost)


def test_goaway_fails_everything_and_closes() -> None:
    client, server = connected_pair()
    waited = client.wait(JOB)
    server.receive()
    follower, _, _ = open_follow(client, server)
    server.go_away(ErrorCode.TIMEOUT, "idle timeout")
    error = failure_of(waited, ClientConnectionLost)
    assert failure_of(follower.done, ClientConnectionLost) is error
    assert error.code is ErrorCode.TIMEOUT
    assert "idle timeout" in error.message
    assert not server.transport.connected  # the client closed its side


def test_protocol_error_sends_goaway_and_fails_everything() -> None:
    client, server = connected_pair()
    waited = client.wait(JOB)
    server.receive()
    client.dataReceived(b"\x00\x00\x00\x01\xee")  # an unknown message type
    error = failure_of(waited, ClientConnectionLost)
    assert error.code is ErrorCode.UNKNOWN_MESSAGE
    [goaway] = server.receive()
    assert isinstance(goaway, m.GoAway) and goaway.code == ErrorCode.UNKNOWN_MESSAGE
    assert not server.transport.connected


def test_wrong_response_type_is_a_protocol_error() -> None:
    client, server = connected_pair()
    started = client.start(["true"])
    server.send(m.OkResponse(server.receive_one(m.StartRequest).request_id))
    assert failure_of(started, ClientConnectionLost).code is ErrorCode.PROTOCOL_ERROR
    assert isinstance(server.receive_one(m.GoAway), m.GoAway)


def test_close() -> None:
    client, server = connected_pair()
    waited = client.wait(JOB)
    closed = client.close()
    assert "closed by this client" in failure_of(waited, ClientConnectionLost).message
    assert result_of(closed) is None
    assert not server.transport.connected
    assert result_of(client.close()) is None


# -- following ----------------------------------------------------------------------


def test_follow_delivers_output_in_order_and_ends_with_the_status() -> None:
    client, server = connected_pair()
    follower, request, recorder = open_follow(client, server, offset=5, follow=False)
    assert (request.job_id, request.offset, request.follow) == (JOB, 5, False)
    final = job_status(JOB, exit_code=0, output_bytes=40)
    server.send(
        output(request, 5, b"one\n"),
        output(request, 9, b"oops\n", fd=2),
        m.Gap(request.stream_id, 14, 20),
        output(request, 34, b"two\n"),
    )
    assert recorder.events == [
        ("output", 1, b"one\n"),
        ("output", 2, b"oops\n"),
        ("gap", 14, 20),
        ("output", 1, b"two\n"),
    ]
    assert follower.offset == 38
    assert not has_fired(follower.done)
    server.send(m.EndOfStream(request.stream_id, m.EndReason.CAUGHT_UP, final))
    assert result_of(follower.done) == final
    assert follower.end_reason is m.EndReason.CAUGHT_UP
    assert client.conn.open_streams == frozenset()


def test_follow_with_callables() -> None:
    client, server = connected_pair()
    seen: list[tuple[int, bytes]] = []
    follower = client.follow(JOB, lambda fd, data: seen.append((fd, data)))
    request = server.receive_one(m.FollowRequest)
    server.send(m.OkResponse(request.request_id), m.Gap(request.stream_id, 0, 10), output(request, 10, b"x"))
    assert seen == [(1, b"x")]  # no gap callback: the gap is skipped
    assert follower.offset == 11


def test_several_followers_are_kept_apart() -> None:
    client, server = connected_pair()
    first, first_request, first_seen = open_follow(client, server)
    second, second_request, second_seen = open_follow(client, server)
    assert first_request.stream_id != second_request.stream_id
    server.send(output(first_request, 0, b"a"), output(second_request, 0, b"b"), output(first_request, 1, b"c"))
    server.send(m.EndOfStream(first_request.stream_id, m.EndReason.JOB_ENDED, job_status(JOB)))
    assert (first_seen.data, second_seen.data) == (b"ac", b"b")
    assert has_fired(first.done) and not has_fired(second.done)


def test_follow_refused() -> None:
    client, server = connected_pair()
    follower = client.follow(JOB, Recorder())
    request = server.receive_one(m.FollowRequest)
    server.send(m.ErrorResponse(request.request_id, ErrorCode.NOT_FOUND, "no such job"))
    assert failure_of(follower.done, RequestError).code is ErrorCode.NOT_FOUND
    assert client.conn.open_streams == frozenset()


def test_window_credit_is_granted_back_after_half_the_window() -> None:
    client, server = connected_pair()
    follower, request, recorder = open_follow(client, server, window=1000)
    assert request.window == 1000
    stream = request.stream_id
    server.send(output(request, 0, b"a" * 400))
    assert server.receive() == []
    assert server.conn.send_window(stream) == 600
    server.send(output(request, 400, b"b" * 100))
    assert server.receive() == [m.WindowUpdate(stream, 500)]
    assert server.conn.send_window(stream) == 1000
    # The server may use the whole window: all of it is consumed and
    # granted back, so the stream never stalls.
    server.send(output(request, 500, b"c" * 1000))
    assert server.receive() == [m.WindowUpdate(stream, 1000)]
    assert server.conn.send_window(stream) == 1000
    assert len(recorder.data) == 1500


def test_credit_only_after_the_callback_returns() -> None:
    client, server = connected_pair()
    updates_seen_in_callback: list[list[m.Message]] = []

    def slow(fd: int, data: bytes) -> None:
        updates_seen_in_callback.append(server.receive())

    client.follow(JOB, slow, window=100)
    request = server.receive_one(m.FollowRequest)
    server.send(m.OkResponse(request.request_id), output(request, 0, b"x" * 100))
    assert updates_seen_in_callback == [[]]
    assert server.receive() == [m.WindowUpdate(request.stream_id, 100)]


def test_pause_stops_delivery_and_credit_until_resume() -> None:
    client, server = connected_pair()
    follower, request, recorder = open_follow(client, server, window=1000)
    stream = request.stream_id
    server.send(output(request, 0, b"a" * 100))
    follower.pause()
    # The server spends the rest of its window; nothing is delivered and no
    # credit comes back, so the server can send no more.
    server.send(output(request, 100, b"b" * 600), output(request, 700, b"c" * 300))
    assert server.conn.send_window(stream) == 0
    server.send(m.EndOfStream(stream, m.EndReason.JOB_ENDED, job_status(JOB)))
    assert recorder.data == b"a" * 100
    assert server.receive() == []
    assert not has_fired(follower.done)
    follower.resume()
    assert recorder.data == b"a" * 100 + b"b" * 600 + b"c" * 300
    assert follower.offset == 1000
    assert has_fired(follower.done)


def test_paused_stream_holds_the_server_at_a_zero_window() -> None:
    client, server = connected_pair()
    follower, request, recorder = open_follow(client, server, window=1000)
    stream = request.stream_id
    follower.pause()
    server.send(output(request, 0, b"a" * 1000))
    assert server.receive() == []
    assert server.conn.send_window(stream) == 0
    with pytest.raises(ValueError):
        server.conn.send_output(stream, 1, 1000, b"more")
    follower.resume()
    assert server.receive() == [m.WindowUpdate(stream, 1000)]
    assert recorder.data == b"a" * 1000


def test_pause_from_the_output_callback() -> None:
    """
    A callback that pauses gets no further call until resumed, and the
    chunk it was handed is granted back only on resume.
    """
    client, server = connected_pair()
    seen: list[bytes] = []
    follower: Follower

    def receive(fd: int, data: bytes) -> None:
        seen.append(data)
        follower.pause()

    follower = client.follow(JOB, receive, window=100)
    request = server.receive_one(m.FollowRequest)
    server.send(m.OkResponse(request.request_id), output(request, 0, b"x" * 60), output(request, 60, b"y" * 40))
    assert seen == [b"x" * 60]
    assert server.receive() == []
    follower.resume()
    assert seen == [b"x" * 60, b"y" * 40]
    assert server.receive() == []  # paused again by the callback
    follower.resume()
    assert server.receive() == [m.WindowUpdate(request.stream_id, 100)]


def test_follower_is_a_push_producer() -> None:
    """
    A transport the embedder writes output to can pause the follower.
    """
    client, server = connected_pair()
    sink = StringTransport()
    follower = client.follow(JOB, lambda fd, data: sink.write(data), window=100)
    sink.registerProducer(follower, True)
    request = server.receive_one(m.FollowRequest)
    server.send(m.OkResponse(request.request_id))
    sink.producer.pauseProducing()
    server.send(output(request, 0, b"z" * 100))
    assert sink.value() == b"" and server.receive() == []
    sink.producer.resumeProducing()
    assert sink.value() == b"z" * 100
    sink.producer.stopProducing()
    assert server.receive()[-1] == m.CancelStream(request.stream_id)


def test_cancel_sends_cancel_stream() -> None:
    client, server = connected_pair()
    follower, request, recorder = open_follow(client, server)
    server.send(output(request, 0, b"before"))
    follower.cancel()
    assert server.receive() == [m.CancelStream(request.stream_id)]
    # Output that crossed the cancellation on the wire is dropped.
    server.send(output(request, 6, b"after"))
    assert recorder.data == b"before"
    status = job_status(JOB, state=m.JobState.RUNNING)
    server.send(m.EndOfStream(request.stream_id, m.EndReason.CANCELLED, status))
    assert result_of(follower.done) == status
    assert follower.end_reason is m.EndReason.CANCELLED
    assert follower.offset == 6


def test_cancel_before_the_stream_opens() -> None:
    """
    The server ignores a cancellation of a stream it has not opened, so the
    client holds it back until the stream opens.
    """
    client, server = connected_pair()
    follower = client.follow(JOB, Recorder())
    request = server.receive_one(m.FollowRequest)
    follower.cancel()
    assert server.receive() == []
    server.send(m.OkResponse(request.request_id))
    assert server.receive() == [m.CancelStream(request.stream_id)]


def test_cancelling_done_cancels_the_stream() -> None:
    client, server = connected_pair()
    follower, request, _ = open_follow(client, server)
    follower.done.cancel()
    failure_of(follower.done, defer.CancelledError)
    assert server.receive() == [m.CancelStream(request.stream_id)]
    server.send(m.EndOfStream(request.stream_id, m.EndReason.CANCELLED, job_status(JOB)))


def test_cancel_while_paused_after_the_end_arrived() -> None:
    client, server = connected_pair()
    follower, request, recorder = open_follow(client, server)
    follower.pause()
    status = job_status(JOB)
    server.send(output(request, 0, b"held"), m.EndOfStream(request.stream_id, m.EndReason.JOB_ENDED, status))
    follower.cancel()
    assert result_of(follower.done) == status
    assert recorder.data == b""
    assert server.receive() == []  # the stream had ended: nothing to cancel


def test_failing_output_callback_fails_only_its_follower() -> None:
    client, server = connected_pair()

    def broken(fd: int, data: bytes) -> None:
        raise ZeroDivisionError("embedder bug")

    follower = client.follow(JOB, broken)
    request = server.receive_one(m.FollowRequest)
    server.send(m.OkResponse(request.request_id), output(request, 0, b"boom"), output(request, 4, b"more"))
    failure_of(follower.done, ZeroDivisionError)
    assert follower.offset == 0
    assert server.receive() == [m.CancelStream(request.stream_id)]
    server.send(m.EndOfStream(request.stream_id, m.EndReason.CANCELLED, job_status(JOB)))
    listed = client.list()
    server.send(m.ListResponse(server.receive_one(m.ListRequest).request_id, ()))
    assert result_of(listed) == ()


# -- connect(), without a network ------------------------------------------------------


class SilentEndpoint:
    """
    A client endpoint that never connects.
    """

    def __init__(self) -> None:
        self.cancelled = False

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        def cancel(_: Any) -> None:
            self.cancelled = True

        return defer.Deferred(cancel)


class StallingEndpoint:
    """
    A client endpoint that connects at once to a server that never answers.
    """

    def __init__(self) -> None:
        self.transport = StringTransport()

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(self.transport)
        return defer.succeed(protocol)


def test_connect_times_out_connecting(certs) -> None:
    clock = MemoryReactorClock()
    endpoint: Any = SilentEndpoint()  # a duck-typed IStreamClientEndpoint
    connecting = connect(
        clock, endpoint, ca=certs / "ca.pem", cert=certs / "alice.pem", key=certs / "alice.key",
        hostname="localhost", timeout=5,
    )
    clock.advance(4.9)
    assert not has_fired(connecting)
    clock.advance(0.2)
    failure_of(connecting, defer.TimeoutError)
    assert endpoint.cancelled


def test_connect_times_out_waiting_for_the_hello(certs) -> None:
    clock = MemoryReactorClock()
    endpoint: Any = StallingEndpoint()  # a duck-typed IStreamClientEndpoint
    connecting = connect(
        clock, endpoint, ca=certs / "ca.pem", cert=certs / "alice.pem", key=certs / "alice.key",
        hostname="localhost", timeout=5,
    )
    assert endpoint.transport.value()  # the TLS client hello
    clock.advance(5)
    failure_of(connecting, defer.TimeoutError)
    assert endpoint.transport.disconnecting


def test_connect_needs_a_hostname_with_an_endpoint(certs) -> None:
    endpoint: Any = SilentEndpoint()  # a duck-typed IStreamClientEndpoint
    with pytest.raises(ValueError, match="hostname"):
        connect(MemoryReactorClock(), endpoint, ca=certs / "ca.pem", cert=certs / "alice.pem", key=certs / "alice.key")


# -- keep-alive and long waits --------------------------------------------------------


def test_a_wait_has_no_time_limit() -> None:
    from twisted.internet import task

    clock = task.Clock()
    client, server = connected_pair(clock=clock, keepalive_interval=5)
    waiting = client.wait(JOB)
    request = server.receive_one(m.WaitRequest)
    for _ in range(3600):  # an hour of a quiet job, a server that answers pings
        clock.advance(1)
        for message in server.receive():
            assert isinstance(message, m.Ping)
            server.send(m.Pong(message.data))
    assert not has_fired(waiting)
    server.send(m.StatusResponse(request.request_id, job_status(JOB, exit_code=0)))
    assert result_of(waiting).exit_code == 0


def test_a_server_that_does_not_answer_pings_is_given_up() -> None:
    from twisted.internet import task

    clock = task.Clock()
    client, server = connected_pair(clock=clock, keepalive_interval=5)
    waiting = client.wait(JOB)
    server.receive_one(m.WaitRequest)
    follower, _, _ = open_follow(client, server)
    clock.advance(5)
    [ping] = server.receive()
    assert isinstance(ping, m.Ping)
    clock.advance(4.9)
    assert not has_fired(waiting)
    clock.advance(0.2)
    lost = failure_of(waiting, ClientConnectionLost)
    assert lost.code is ErrorCode.TIMEOUT and "keep-alive" in str(lost)
    assert failure_of(follower.done, ClientConnectionLost).code is ErrorCode.TIMEOUT
    [goaway] = server.receive()
    assert isinstance(goaway, m.GoAway) and goaway.code == ErrorCode.TIMEOUT


def test_any_bytes_from_the_server_count_as_life() -> None:
    from twisted.internet import task

    clock = task.Clock()
    client, server = connected_pair(clock=clock, keepalive_interval=5)
    follower, request, recorder = open_follow(client, server)
    for offset in range(20):
        clock.advance(4)
        server.send(output(request, offset, b"x"))
    assert [message for message in server.receive() if isinstance(message, m.Ping)] == []
    assert recorder.data == b"x" * 20


def test_the_client_answers_the_servers_ping() -> None:
    client, server = connected_pair()
    server.send(m.Ping(42))
    assert server.receive() == [m.Pong(42)]


def test_list_newest_first_asks_the_server_for_it() -> None:
    client, server = connected_pair()
    newer, older = job_status(created_at=20), job_status(created_at=10)
    listed = client.list(newest_first=True)
    page = server.receive_one(m.ListRequest)
    assert page.newest_first and (page.after_created_at, page.after_job_id) == (0, uuid.UUID(int=0))
    server.send(m.ListResponse(page.request_id, (newer,), more=True))
    page = server.receive_one(m.ListRequest)
    assert page.newest_first and (page.after_created_at, page.after_job_id) == (20, newer.job_id)
    server.send(m.ListResponse(page.request_id, (older,)))
    assert result_of(listed) == (newer, older)


def test_list_newest_first_of_a_version_3_server_is_sorted_here() -> None:
    """
    A version 3 server pages oldest first only: the client asks it so, and
    reverses the list once it has every page.
    """
    client, server = connected_pair(server_versions={3})
    assert client.conn.version == 3
    jobs = [job_status(created_at=10), job_status(created_at=20), job_status(created_at=20)]
    jobs.sort(key=lambda status: (status.created_at, status.job_id.int))
    listed = client.list(newest_first=True)
    page = server.receive_one(m.ListRequest)
    assert not page.newest_first
    server.send(m.ListResponse(page.request_id, tuple(jobs[:2]), more=True))
    page = server.receive_one(m.ListRequest)
    assert not page.newest_first and page.after_job_id == jobs[1].job_id
    server.send(m.ListResponse(page.request_id, tuple(jobs[2:])))
    assert result_of(listed) == tuple(reversed(jobs))


def test_list_reads_every_page_with_the_filters() -> None:
    client, server = connected_pair()
    first = job_status(owner="bob", created_at=10)
    second = job_status(owner="bob", created_at=20)
    listed = client.list(states=[m.JobState.EXITED], owner="bob")
    page = server.receive_one(m.ListRequest)
    assert (page.after_created_at, page.after_job_id, page.states, page.owner) == (
        0, uuid.UUID(int=0), 1 << m.JobState.EXITED, "bob",
    )
    server.send(m.ListResponse(page.request_id, (first,), more=True))
    assert not has_fired(listed)
    page = server.receive_one(m.ListRequest)
    assert (page.after_created_at, page.after_job_id) == (10, first.job_id)
    server.send(m.ListResponse(page.request_id, (second,)))
    assert result_of(listed) == (first, second)

