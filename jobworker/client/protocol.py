"""
One connection of the Twisted client (L{JobworkerClientProtocol}): the
requests, the table of those pending, keep-alive, and the end of the
connection; see L{jobworker.client} for the design.  One cohesive thing
(about 480 lines): every request method is a few lines over the same
pending-request table, and splitting them from the table would only move
that table's invariants into two files.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from jobworker.client.errors import ClientConnectionLost
from jobworker.client.follower import Follower, GapCallback, OutputCallback, OutputReceiver, TimeMarkCallback
from jobworker.clientside.jobref import JobRef, as_job_id
from jobworker.clientside.since import since_microseconds
from jobworker.errors import ErrorCode, ProtocolError, RequestError
from jobworker.limits import Limits
from jobworker.logs import Logger
from jobworker.protocol import messages as m
from jobworker.protocol.connection import DEFAULT_MAX_FRAME_SIZE, Connection, Role
from jobworker.protocol.flow import DEFAULT_WINDOW
from jobworker.protocol.keepalive import DEFAULT_KEEPALIVE_INTERVAL, KeepAlive, Verdict

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = ["JobworkerClientProtocol"]

log = Logger()

# What a start asks for unless told otherwise: no limits of its own (the
# server applies its defaults and caps).  Limits is frozen, so one is shared.
_NO_LIMITS = Limits()


class JobworkerClientProtocol(Protocol):
    """
    One connection to a jobworker server, over a transport that is already
    TLS (see L{connect}, which makes one).

    Requests may be made once C{ready} has fired; before that they raise
    L{ValueError}.  After the connection has ended they fail with
    L{ClientConnectionLost}.  A request whose arguments cannot be encoded
    (an over-long argv, say) fails with L{ValueError}.

    @ivar conn: the sans-IO protocol core.
    @ivar ready: fires with the server's L{ServerHello} once the hello
        exchange has ended; fails with L{ClientConnectionLost} if the
        connection ends first.  Cancelling it aborts the connection.
        L{connect} waits on it, which leaves its result C{None} (as
        chaining a Deferred does): read C{hello} instead.
    @ivar hello: the server's hello, once it has come: the identity and role
        the server sees this client as.

    @param clock: where keep-alive timers run (the reactor); without one
        there is no keep-alive.
    @param keepalive_interval: seconds without a byte from the server before
        it is pinged; the connection ends when nothing comes back within as
        long again.  0 or None: no keep-alive.
    """

    # The TLS transport from connectionMade on, which can also abort;
    # Twisted's Protocol types it Optional[ITransport].
    transport: Any

    def __init__(
        self,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        clock: IReactorTime | None = None,
        keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
    ) -> None:
        self.conn = Connection(Role.CLIENT, max_frame_size=max_frame_size)
        self._clock = clock
        self._keepalive_interval = keepalive_interval or None
        self._keepalive: KeepAlive | None = None
        self._keepalive_call: Any = None
        self.ready: defer.Deferred[m.ServerHello] = defer.Deferred(lambda _: self._abort())
        self.hello: m.ServerHello | None = None
        # request id -> (the caller's Deferred, the response type expected,
        # what to fire it with).
        self._pending: dict[int, tuple[defer.Deferred[Any], type[m.Message], Callable[[Any], Any]]] = {}
        # stream id -> follower, from the follow request to the stream's end.
        self._followers: dict[int, Follower] = {}
        self._lost: ClientConnectionLost | None = None
        self._on_lost: list[defer.Deferred[None]] = []
        self._disconnected = False

    # -- Twisted's side ------------------------------------------------------------

    def connectionMade(self) -> None:
        # Requests are small and each one waits for its answer: without
        # TCP_NODELAY, Nagle's algorithm holds them for a delayed ACK.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except (OSError, AttributeError):
                pass

    def dataReceived(self, data: bytes) -> None:
        if self._lost is not None:
            return
        if self._keepalive is not None:
            self._keepalive.received(self._clock.seconds())  # type: ignore[union-attr]
        try:
            messages = self.conn.receive_data(data)
        except ProtocolError as error:
            self._protocol_error(error)
            return
        for message in messages:
            if self._ended():
                break  # a callback closed the connection; drop the rest
            self._dispatch(message)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._disconnected = True
        self._stop_keepalive()
        if self._lost is None:
            text = "the connection to the server ended"
            if self.hello is None:
                text += " before the server's hello"
            if reason is not None:
                text += f": {reason.getErrorMessage()}"
            cause = reason.value if reason is not None else None
            self._fail_all(ClientConnectionLost(text, ErrorCode.INTERNAL, cause))
        waiters, self._on_lost = self._on_lost, []
        for waiter in waiters:
            waiter.callback(None)

    # -- requests --------------------------------------------------------------------

    def start(
        self,
        argv: list[str] | tuple[str, ...],
        *,
        env: tuple[tuple[str, str], ...] | dict[str, str] = (),
        workdir: str = "",
        user: str = "",
        network: m.Network = m.Network.NONE,
        limits: Limits = _NO_LIMITS,
        name: str = "",
        labels: tuple[tuple[str, str], ...] | dict[str, str] = (),
    ) -> defer.Deferred[uuid.UUID]:
        """
        Start a job; fires with its id once it runs (the server reports a
        command that cannot start as a L{RequestError}).

        @param env: extra environment variables, as pairs or a mapping.
        @param workdir: "" for the server's default.
        @param user: the user to run as, "" for the server's default.
        """
        pairs = tuple(env.items()) if isinstance(env, dict) else tuple(tuple(pair) for pair in env)
        label_pairs = tuple(labels.items()) if isinstance(labels, dict) else tuple(tuple(pair) for pair in labels)
        request = m.StartRequest(
            self.conn.next_request_id(), tuple(argv), pairs, workdir, user, network, limits,  # type: ignore[arg-type]
            name, label_pairs,  # type: ignore[arg-type]
        )
        return self._request(request, m.StartResponse, lambda response: response.job_id)

    def stop(self, job_id: JobRef, *, grace: float = 10.0, force: bool = False) -> defer.Deferred[None]:
        """
        Stop a job: SIGTERM, then SIGKILL of all its processes after
        C{grace} seconds (at once with C{force}).  Fires when the server has
        begun to stop it; L{wait} tells when it has ended.
        """
        if not 0 <= grace <= 0xFFFFFFFF / 1000:
            return defer.fail(ValueError(f"grace must be between 0 and {0xFFFFFFFF // 1000} seconds"))
        request = m.StopRequest(self.conn.next_request_id(), as_job_id(job_id), round(grace * 1000), force)
        return self._request(request, m.OkResponse, _nothing)

    def signal(self, job_id: JobRef, signum: int) -> defer.Deferred[None]:
        """
        Send one signal (one of C{messages.SIGNALS_SENT}) to the running
        job's command, without stopping it; fires once it was sent.
        """
        request = m.SignalRequest(self.conn.next_request_id(), as_job_id(job_id), signum)
        return self._request(request, m.OkResponse, _nothing)

    def status(self, job_id: JobRef) -> defer.Deferred[m.JobStatus]:
        request = m.StatusRequest(self.conn.next_request_id(), as_job_id(job_id))
        return self._request(request, m.StatusResponse, lambda response: response.status)

    def wait(self, job_id: JobRef) -> defer.Deferred[m.JobStatus]:
        """
        Fires with the job's final status once it has ended.
        """
        request = m.WaitRequest(self.conn.next_request_id(), as_job_id(job_id))
        return self._request(request, m.StatusResponse, lambda response: response.status)

    def list(
        self,
        *,
        states: Iterable[m.JobState] = (),
        owner: str = "",
        page_size: int = 0,
        name: str = "",
        labels: Iterable[str] = (),
        newest_first: bool = False,
    ) -> defer.Deferred[tuple[m.JobStatus, ...]]:
        """
        Every job this client may see, oldest first (newest first with
        C{newest_first}); only those in one of
        C{states} (all by default), owned by C{owner} ("" for any), named
        C{name} ("" for any) and matching every label filter of C{labels}
        (C{"KEY"} or C{"KEY=VALUE"}); the server filters.
        The server sends the list in pages of what fits one frame (or of
        C{page_size} jobs); this asks for one after the other.  A server
        that speaks a protocol version before L{m.NEWEST_FIRST_VERSION}
        pages oldest first only: for C{newest_first}, its list is reversed
        here once every page has come.
        """
        mask = m.state_mask(states)
        label_filters = tuple(labels)
        reverse = newest_first and self.conn.version < m.NEWEST_FIRST_VERSION
        jobs: list[m.JobStatus] = []
        listed: defer.Deferred[tuple[m.JobStatus, ...]] = defer.Deferred()

        def page(after_created_at: int, after_job_id: uuid.UUID) -> None:
            request = m.ListRequest(
                self.conn.next_request_id(), after_created_at, after_job_id, page_size, mask, owner,
                name, label_filters, newest_first and not reverse,
            )
            answer = self._request(request, m.ListResponse, lambda response: response)
            answer.addCallbacks(arrived, listed.errback)

        def arrived(response: m.ListResponse) -> None:
            jobs.extend(response.jobs)
            if not response.more or not response.jobs:
                if reverse:
                    jobs.sort(key=lambda job: (job.created_at, job.job_id.int), reverse=True)
                listed.callback(tuple(jobs))
                return
            last = response.jobs[-1]
            page(last.created_at, last.job_id)

        page(0, uuid.UUID(int=0))
        return listed

    def remove(self, job_id: uuid.UUID) -> defer.Deferred[None]:
        """
        Forget an ended job and its output.
        """
        request = m.RemoveRequest(self.conn.next_request_id(), job_id)
        return self._request(request, m.OkResponse, _nothing)

    def follow(
        self,
        job_id: uuid.UUID,
        output: OutputCallback | OutputReceiver,
        *,
        gap: GapCallback | None = None,
        offset: int = 0,
        follow: bool = True,
        window: int = DEFAULT_WINDOW,
        timestamps: bool = False,
        since: float | None = None,
        time_mark: TimeMarkCallback | None = None,
    ) -> Follower:
        """
        Stream a job's output, from absolute byte C{offset}.

        @param output: called as C{output(fd, data)} for each chunk, in the
            job's order (fd 1 stdout, 2 stderr); or an L{OutputReceiver},
            whose C{output} and C{gap} methods are used.
        @param gap: called as C{gap(offset, length)} for output the server
            dropped by its retention limit; without it a gap is skipped
            silently (L{Follower.offset} still moves past it).
        @param follow: C{False} to stop at the end of the output that exists
            now (L{EndReason.CAUGHT_UP}) rather than when the job ends.
        @param window: bytes the server may send before we grant more
            (at most 2 GiB - 1); credit is granted back in batches of half.
        @param timestamps: ask for the times the server read the output:
            C{time_mark(offset, seconds)} is called before the output at
            C{offset}, and L{Follower.time} holds the last time.
        @param since: seconds since the epoch: start at the first byte the
            server read at this time or later (or at C{offset}, if later).
        @param time_mark: see C{timestamps}; without it, an
            L{OutputReceiver}'s C{time_mark} method if it has one.
        """
        if not callable(output):
            receiver = output
            output = receiver.output
            if gap is None:
                gap = getattr(receiver, "gap", None)
            if time_mark is None:
                time_mark = getattr(receiver, "time_mark", None)
        self._check_usable()
        stream_id = self.conn.next_stream_id()
        follower = Follower(_Channel(self), as_job_id(job_id), stream_id, offset, output, gap, time_mark)
        request = m.FollowRequest(
            self.conn.next_request_id(), as_job_id(job_id), stream_id, offset, window, follow,
            timestamps, since_microseconds(since),
        )
        self._followers[stream_id] = follower
        opened = self._request(request, m.OkResponse, _nothing)
        opened.addCallbacks(follower.opened, follower.failed)
        return follower

    def close(self) -> defer.Deferred[None]:
        """
        Close the connection; every pending request and open follower fails
        with L{ClientConnectionLost}.  Fires once the transport has closed.
        """
        closed: defer.Deferred[None] = defer.Deferred()
        if self._disconnected:
            closed.callback(None)
            return closed
        self._on_lost.append(closed)
        if self._lost is None:
            self._fail_all(ClientConnectionLost("the connection was closed by this client"))
        self.transport.loseConnection()
        return closed

    # -- internals ------------------------------------------------------------------

    def _ended(self) -> bool:
        # A method, so that the type checker does not take _lost for fixed
        # across the callbacks that may end the connection.
        return self._lost is not None

    def _check_usable(self) -> None:
        if self._lost is None and not self.conn.is_open:
            raise ValueError("requests may be made only once the hello exchange has ended (see .ready)")

    def _request(
        self, request: m.Message, expected: type[m.Message], result: Callable[[Any], Any]
    ) -> defer.Deferred[Any]:
        self._check_usable()
        if self._lost is not None:
            return defer.fail(self._lost)
        try:
            data = self.conn.send(request)
        except ValueError:
            return defer.fail()
        waiting: defer.Deferred[Any] = defer.Deferred()
        self._pending[request.request_id] = (waiting, expected, result)  # type: ignore[attr-defined]
        self.transport.write(data)
        return waiting

    def _send(self, message: m.Message) -> None:
        if self._lost is None and not self.conn.is_closed:
            self.transport.write(self.conn.send(message))

    def _grant(self, stream_id: int, size: int) -> None:
        if self._lost is None and not self.conn.is_closed:
            update = self.conn.consumed(stream_id, size)
            if update:
                self.transport.write(update)

    def _forget(self, stream_id: int) -> None:
        self._followers.pop(stream_id, None)

    def _dispatch(self, message: m.Message) -> None:
        if isinstance(message, m.ServerHello):
            self.hello = message
            self.transport.write(self.conn.send(m.ClientHello(self.conn.version, self.conn.max_frame_size)))
            if self._clock is not None and self._keepalive_interval:
                self._keepalive = KeepAlive(self._keepalive_interval, self._clock.seconds())
                self._schedule_keepalive()
            self.ready.callback(message)
        elif isinstance(message, m.Ping):
            self._send(m.Pong(message.data))
        elif isinstance(message, m.Pong):
            pass  # any bytes are a sign of life; dataReceived noted them
        elif isinstance(message, m.GoAway):
            try:
                code = ErrorCode(message.code)
            except ValueError:
                code = ErrorCode.PROTOCOL_ERROR
            self._shut_down(ClientConnectionLost(f"the server closed the connection: {message.message}", code))
        elif isinstance(message, (m.Output, m.Gap, m.EndOfStream, m.TimeMark)):
            follower = self._followers.get(message.stream_id)
            if follower is not None:
                follower.received(message)
        else:
            self._answer(message)

    def _answer(self, response: m.Message) -> None:
        # The core has checked that the request id is one of ours, pending.
        entry = self._pending.pop(response.request_id)  # type: ignore[attr-defined]
        waiting, expected, result = entry
        if isinstance(response, m.ErrorResponse):
            try:
                code = ErrorCode(response.code)
            except ValueError:
                code = ErrorCode.INTERNAL
            waiting.errback(RequestError(response.message, code))
        elif not isinstance(response, expected):
            self._pending[response.request_id] = entry  # type: ignore[attr-defined]
            self._protocol_error(
                ProtocolError(f"{type(response).__name__} in answer to a request expecting {expected.__name__}")
            )
        else:
            waiting.callback(result(response))

    def _schedule_keepalive(self) -> None:
        assert self._keepalive is not None and self._clock is not None
        delay = max(0.0, self._keepalive.deadline() - self._clock.seconds())
        self._keepalive_call = self._clock.callLater(delay, self._keepalive_due)

    def _keepalive_due(self) -> None:
        self._keepalive_call = None
        keepalive = self._keepalive
        if keepalive is None or self._lost is not None or self.conn.is_closed:
            return
        verdict = keepalive.check(self._clock.seconds())  # type: ignore[union-attr]
        if verdict is Verdict.DEAD:
            log.warn("the server did not answer a keep-alive ping within {interval} s", interval=keepalive.interval)
            self.transport.write(self.conn.goaway(ProtocolError("keep-alive timeout", ErrorCode.TIMEOUT)))
            self._fail_all(
                ClientConnectionLost(
                    f"the server did not answer a keep-alive ping within {keepalive.interval:g} s; "
                    "it is gone or unreachable",
                    ErrorCode.TIMEOUT,
                )
            )
            # Nobody answers on the other side: do not wait for TLS to close.
            self._abort()
            return
        if verdict is Verdict.PING:
            self._send(m.Ping(keepalive.ping_data()))
        self._schedule_keepalive()

    def _stop_keepalive(self) -> None:
        if self._keepalive_call is not None and self._keepalive_call.active():
            self._keepalive_call.cancel()
        self._keepalive_call = None
        self._keepalive = None

    def _protocol_error(self, error: ProtocolError) -> None:
        log.warn("the server broke the protocol: {error}", error=error.message)
        # The core is closed already when the error was in what it received;
        # the GoAway that tells the server why is still ours to send.
        self.transport.write(self.conn.goaway(error))
        self._shut_down(ClientConnectionLost(f"the server broke the protocol: {error.message}", error.code))

    def _shut_down(self, error: ClientConnectionLost) -> None:
        self._fail_all(error)
        self.transport.loseConnection()

    def _abort(self) -> None:
        if self.transport is not None and not self._disconnected:
            self.transport.abortConnection()

    def _fail_all(self, error: ClientConnectionLost) -> None:
        """
        Fail everything that waits on this connection.  The tables are
        emptied first: a callback that makes a new request gets a failure at
        once rather than an entry nobody will ever answer.
        """
        self._lost = error
        pending, self._pending = self._pending, {}
        followers, self._followers = self._followers, {}
        if not self.ready.called:
            self.ready.errback(Failure(error))
        for waiting, _, _ in pending.values():
            waiting.errback(Failure(error))
        for follower in followers.values():
            follower.failed(Failure(error))


class _Channel:
    """
    What a L{Follower} may do on its connection (L{StreamChannel
    <jobworker.client.follower.StreamChannel>}), and no more.
    """

    def __init__(self, protocol: JobworkerClientProtocol) -> None:
        self._protocol = protocol

    def send(self, message: m.Message) -> None:
        self._protocol._send(message)

    def grant(self, stream_id: int, size: int) -> None:
        self._protocol._grant(stream_id, size)

    def forget(self, stream_id: int) -> None:
        self._protocol._forget(stream_id)


def _nothing(_: object) -> None:
    return None
