"""
The embeddable Twisted client: L{Deferred}-returning requests and a
flow-controlled follow API, for Twisted programs that drive jobworker.

It is a thin layer over the sans-IO L{Connection}, the same core the server
and the blocking client (L{jobworker.blocking}) use; this module only moves
bytes between that core and a Twisted transport and turns responses into
fired L{Deferred}s.

    from twisted.internet import defer, task
    from jobworker.client import connect

    async def main(reactor):
        client = await connect(reactor, "jobs.example.org:8443",
                               ca="ca.pem", cert="alice.pem", key="alice.key")
        job_id = await client.start(["echo", "hi"])
        follower = client.follow(job_id, lambda fd, data: print(fd, data))
        status = await follower.done
        print(status.state.label, status.exit_code)
        await client.close()

    task.react(lambda reactor: defer.ensureDeferred(main(reactor)))

Design
======

Requests are answered in any order; each carries a request id, and a table
maps every id still unanswered to the L{Deferred} its caller holds (as in
Twisted AMP).  When the connection ends for any reason (the transport drops,
the server sends C{GoAway}, the server breaks the protocol, or we close it)
every pending L{Deferred} and every open follower fails with one
L{ClientConnectionLost}, so no caller waits forever.

No request has a time limit: a wait or a follow lasts as long as its job.
A server that vanished without closing the connection is noticed by
keep-alive (L{jobworker.protocol.keepalive}): after C{keepalive_interval}
seconds without a byte from the server the client pings it, and ends the
connection (every pending L{Deferred} fails with L{ClientConnectionLost},
code C{TIMEOUT}) when the ping goes unanswered for as long again.

Cancelling a request's L{Deferred} only stops waiting for it: the protocol
has no way to withdraw a request, and its answer, when it comes, is dropped.
Cancelling a follower's C{done} cancels its stream.

Output of a follow arrives on a stream whose window the client grants (see
L{jobworker.protocol.flow}): credit for a chunk is given back only after the
embedder's output callback has returned, so a slow callback slows that one
stream down on the server, never the connection or the job.
L{Follower.pause} stops callbacks and credit altogether.
"""

from __future__ import annotations

import uuid
from collections import deque
from os import PathLike
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IPushProducer, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from jobworker.logs import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from jobworker.blocking import DEFAULT_WINDOW, JobRef, as_job_id, parse_address, since_microseconds
from jobworker.errors import ErrorCode, JobworkerError, ProtocolError, RequestError
from jobworker.limits import Limits
from jobworker.protocol import messages as m
from jobworker.protocol.connection import DEFAULT_MAX_FRAME_SIZE, Connection, Role
from jobworker.protocol.keepalive import DEFAULT_KEEPALIVE_INTERVAL, KeepAlive, Verdict

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTCP, IReactorTime

__all__ = [
    "ClientConnectionLost",
    "Follower",
    "connect_configured",
    "JobworkerClientProtocol",
    "OutputReceiver",
    "connect",
    "DEFAULT_WINDOW",
]

log = Logger()

StrPath = str | PathLike[str]

# The hello exchange (and the TCP and TLS set-up before it) must end within
# this many seconds, as for the blocking client.
DEFAULT_CONNECT_TIMEOUT = 30.0


class ClientConnectionLost(JobworkerError, ConnectionClosed):
    """
    The connection ended before a request was answered or a stream ended.

    It is both a L{JobworkerError} and Twisted's L{ConnectionClosed}, so
    C{failure.check(ConnectionClosed)} finds it as it finds Twisted's own.

    @ivar code: the code of the server's C{GoAway} or of the protocol error
        that ended the connection; L{ErrorCode.INTERNAL} when the transport
        just went away.
    @ivar reason: the underlying cause, when there is one (the exception of
        the transport's C{connectionLost}, a TLS error for instance).
    """

    def __init__(
        self, message: str, code: ErrorCode | None = None, reason: BaseException | None = None
    ) -> None:
        super().__init__(message, code)
        self.reason = reason

    def __str__(self) -> str:
        return self.message


class OutputReceiver(TypingProtocol):
    """
    What L{JobworkerClientProtocol.follow} may deliver output to, instead
    of a plain callable.
    """

    def output(self, fd: int, data: bytes) -> None:
        """
        C{data} of the job's output, from C{fd} 1 (stdout) or 2 (stderr).
        """

    def gap(self, offset: int, length: int) -> None:
        """
        C{length} bytes from C{offset} were dropped by the server's
        retention limit and will never be delivered.
        """

    # Optional, for follows with timestamps=True:
    #   def time_mark(self, offset: int, time: float) -> None:
    #       the output from C{offset} on (up to the next mark) was read by
    #       the server at C{time} (seconds since the epoch); called before
    #       the output that holds byte C{offset} is delivered.


OutputCallback = Callable[[int, bytes], None]
GapCallback = Callable[[int, int], None]
# (offset, seconds since the epoch): see OutputReceiver's time_mark.
TimeMarkCallback = Callable[[int, float], None]


@implementer(IPushProducer)
class Follower:
    """
    One output stream of a job, opened by L{JobworkerClientProtocol.follow}.

    It is also an L{IPushProducer}, so an embedder writing the output to a
    transport may register it there and let the transport pause it.

    @ivar job_id: the job followed.
    @ivar stream_id: the stream's id on the connection.
    @ivar done: fires with the job's L{JobStatus} of the C{EndOfStream}
        record, after every byte before it has been delivered; fails with
        L{RequestError} when the server refuses the follow (unknown job,
        denied), with L{ClientConnectionLost} when the connection ends
        first, and with the exception of the output or gap callback if one
        raises (the stream is then cancelled).  Cancelling it cancels the
        stream.
    @ivar offset: the absolute byte offset of the next byte not yet
        delivered: pass it as C{offset} to a new follow to resume after a
        lost connection without losing or repeating output.
    @ivar end_reason: why the stream ended (L{EndReason}), once it has.
    """

    def __init__(
        self,
        protocol: JobworkerClientProtocol,
        job_id: uuid.UUID,
        stream_id: int,
        offset: int,
        output: OutputCallback,
        gap: GapCallback | None,
        time_mark: TimeMarkCallback | None = None,
    ) -> None:
        self.job_id = job_id
        # Seconds since the epoch when the server read the output at
        # `offset` (the last TimeMark received); None without timestamps, or
        # when the server does not know (output spooled before version 3).
        self.time: float | None = None
        self._time_mark = time_mark
        self.stream_id = stream_id
        self.offset = offset
        self.end_reason: m.EndReason | None = None
        self.done: defer.Deferred[m.JobStatus] = defer.Deferred(self._done_cancelled)
        self._protocol = protocol
        self._output = output
        self._gap = gap
        self._open = False  # the server accepted the follow
        self._finished = False  # EndOfStream handled, or failed
        self._cancelled = False  # no more callbacks; CancelStream sent or due
        self._paused = False
        self._draining = False
        # Messages that arrived while paused, in order; at most the window
        # of output bytes, since the server may not send more without credit.
        self._held: deque[m.Output | m.Gap | m.EndOfStream | m.TimeMark] = deque()
        # Bytes processed while paused, granted back on resume.
        self._ungranted = 0

    def __repr__(self) -> str:
        return f"<Follower job={self.job_id} stream={self.stream_id} offset={self.offset}>"

    # -- the embedder's controls -------------------------------------------------

    def pause(self) -> None:
        """
        Deliver nothing more and grant no more credit until L{resume}.

        The server stops sending on this stream once the window it already
        has is spent; what arrives meanwhile (at most the window) is held
        here and delivered, in order, on L{resume}.  C{done} does not fire
        while paused.
        """
        self._paused = True

    def resume(self) -> None:
        """
        Deliver what was held and grant credit again.
        """
        self._paused = False
        if self._draining:
            return  # called from a callback during the drain below; it goes on
        self._draining = True
        try:
            while self._held and not self._paused and not self._cancelled:
                self._handle(self._held.popleft())
        finally:
            self._draining = False
        if not self._paused and self._ungranted:
            ungranted, self._ungranted = self._ungranted, 0
            self._protocol._grant(self.stream_id, ungranted)

    def cancel(self) -> None:
        """
        Stop following: no callback is called any more, and C{CancelStream}
        is sent (once the server has opened the stream, if it has not yet).
        C{done} fires with the job's status when the server confirms, with
        L{end_reason} L{EndReason.CANCELLED} (or C{JOB_ENDED} if the end
        crossed the cancellation on the wire).
        """
        if self._finished or self._cancelled:
            return
        self._cancelled = True
        held, self._held = self._held, deque()
        end = [message for message in held if isinstance(message, m.EndOfStream)]
        if end:
            # The server has ended the stream already; nothing to cancel.
            self._end(end[0])
        elif self._open:
            self._protocol._send(m.CancelStream(self.stream_id))

    def _done_cancelled(self, done: defer.Deferred[m.JobStatus]) -> None:
        self.cancel()
        if not done.called:
            # done will fail with CancelledError; whatever the server sends
            # on this stream from now on is dropped.
            self._finished = True
            self._protocol._forget(self.stream_id)

    # IPushProducer, in Twisted's names.
    def pauseProducing(self) -> None:
        self.pause()

    def resumeProducing(self) -> None:
        self.resume()

    def stopProducing(self) -> None:
        self.cancel()

    # -- driven by the protocol ----------------------------------------------------

    def _opened(self, _: object) -> None:
        self._open = True
        if self._cancelled:
            self._protocol._send(m.CancelStream(self.stream_id))

    def _received(self, message: m.Output | m.Gap | m.EndOfStream | m.TimeMark) -> None:
        if self._finished:
            return
        if self._cancelled:
            # Output in flight when we cancelled is dropped; only the end counts.
            if isinstance(message, m.EndOfStream):
                self._end(message)
            return
        if self._paused or self._held:
            self._held.append(message)
            return
        self._handle(message)

    def _handle(self, message: m.Output | m.Gap | m.EndOfStream | m.TimeMark) -> None:
        if isinstance(message, m.EndOfStream):
            self._end(message)
            return
        try:
            if isinstance(message, m.TimeMark):
                self.time = message.time / 1e6
                if self._time_mark is not None:
                    self._time_mark(message.offset, message.time / 1e6)
                return
            if isinstance(message, m.Output):
                self._output(message.fd, message.data)
                self.offset = message.offset + len(message.data)
            else:
                if self._gap is not None:
                    self._gap(message.offset, message.length)
                self.offset = message.offset + message.length
        except Exception:
            self._callback_failed(Failure())
            return
        if isinstance(message, m.Output) and message.data:
            if self._paused:
                self._ungranted += len(message.data)
            else:
                self._protocol._grant(self.stream_id, len(message.data))

    def _callback_failed(self, failure: Failure) -> None:
        # The embedder's exception goes to done, not to Twisted's
        # dataReceived, which would drop the whole connection for it.
        self._finished = self._cancelled = True
        self._held.clear()
        self._protocol._forget(self.stream_id)
        # Output still in flight is dropped: the stream is no longer known.
        self._protocol._send(m.CancelStream(self.stream_id))
        self.done.errback(failure)

    def _end(self, message: m.EndOfStream) -> None:
        self.end_reason = message.reason
        self._finished = True
        self._protocol._forget(self.stream_id)
        self.done.callback(message.status)

    def _failed(self, failure: Failure) -> None:
        """
        The follow was refused, or the connection ended.
        """
        self._held.clear()
        self._protocol._forget(self.stream_id)
        if not self._finished:
            self._finished = True
            self.done.errback(failure)


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
            if self._lost is not None:
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
        limits: Limits = Limits(),
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
    ) -> defer.Deferred[tuple[m.JobStatus, ...]]:
        """
        Every job this client may see, oldest first; only those in one of
        C{states} (all by default), owned by C{owner} ("" for any), named
        C{name} ("" for any) and matching every label filter of C{labels}
        (C{"KEY"} or C{"KEY=VALUE"}); the server filters.
        The server sends the list in pages of what fits one frame (or of
        C{page_size} jobs); this asks for one after the other.
        """
        mask = m.state_mask(states)
        label_filters = tuple(labels)
        jobs: list[m.JobStatus] = []
        listed: defer.Deferred[tuple[m.JobStatus, ...]] = defer.Deferred()

        def page(after_created_at: int, after_job_id: uuid.UUID) -> None:
            request = m.ListRequest(
                self.conn.next_request_id(), after_created_at, after_job_id, page_size, mask, owner,
                name, label_filters,
            )
            answer = self._request(request, m.ListResponse, lambda response: response)
            answer.addCallbacks(arrived, listed.errback)

        def arrived(response: m.ListResponse) -> None:
            jobs.extend(response.jobs)
            if not response.more or not response.jobs:
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
        follower = Follower(self, as_job_id(job_id), stream_id, offset, output, gap, time_mark)
        request = m.FollowRequest(
            self.conn.next_request_id(), as_job_id(job_id), stream_id, offset, window, follow,
            timestamps, since_microseconds(since),
        )
        self._followers[stream_id] = follower
        opened = self._request(request, m.OkResponse, _nothing)
        opened.addCallbacks(follower._opened, follower._failed)
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
                follower._received(message)
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
            follower._failed(Failure(error))


def _nothing(_: object) -> None:
    return None


def connect(
    reactor: IReactorTCP | IReactorTime | Any,
    endpoint_or_address: IStreamClientEndpoint | tuple[str, int] | str,
    *,
    ca: StrPath,
    cert: StrPath,
    key: StrPath,
    hostname: str | None = None,
    timeout: float = DEFAULT_CONNECT_TIMEOUT,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
) -> defer.Deferred[JobworkerClientProtocol]:
    """
    Connect to a server over mutual TLS 1.3; fires with the client once the
    hello exchange has ended.

    @param endpoint_or_address: C{"HOST:PORT"} (C{"[::1]:8443"} for IPv6;
        the port defaults to 8443), a C{(host, port)} pair, or a plain
        (not TLS) client endpoint, which is wrapped in TLS here.
    @param ca: PEM file of the CA certificates the server's certificate must
        chain to.
    @param cert: PEM file of this client's certificate.
    @param key: PEM file of its unencrypted private key.
    @param hostname: the name or address the server's certificate must
        carry; defaults to the host dialled, and is required with an
        endpoint.
    @param timeout: seconds for TCP, TLS and the hello together; requests
        have no time limit.
    @param keepalive_interval: see L{JobworkerClientProtocol}; default 30 s.
    @raise CredentialError: (synchronously) a CA, certificate or key file
        cannot be used.
    @return: fails with L{ClientConnectionLost} when the server closes the
        connection before its hello (a refused certificate, say), with
        L{TimeoutError} after C{timeout}, or with the endpoint's error when
        the server cannot be reached.
    """
    from jobworker.tls import client_tls_options

    if isinstance(endpoint_or_address, (str, tuple)):
        host, port = (
            parse_address(endpoint_or_address)
            if isinstance(endpoint_or_address, str)
            else endpoint_or_address
        )
        endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
        if hostname is None:
            hostname = host
    else:
        endpoint = endpoint_or_address
        if hostname is None:
            raise ValueError("hostname is required with an endpoint: the server's certificate must name it")
    options = client_tls_options(ca, cert, key, hostname)
    protocol = JobworkerClientProtocol(
        max_frame_size=max_frame_size, clock=reactor, keepalive_interval=keepalive_interval
    )
    connecting = connectProtocol(wrapClientTLS(options, endpoint), protocol)
    # While this waits on ready, a cancellation (the timeout's) reaches
    # ready, whose canceller aborts the connection.
    connecting.addCallback(lambda _: protocol.ready)
    connecting.addCallback(lambda _: protocol)
    connecting.addTimeout(timeout, reactor)
    return connecting


def connect_configured(
    reactor: IReactorTCP | IReactorTime | Any,
    server: str | None = None,
    *,
    config_path: StrPath | None = None,
    **options: Any,
) -> defer.Deferred[JobworkerClientProtocol]:
    """
    L{connect} to the server C{server} names, with the credentials
    C{jobcli} would use (L{jobworker.clientconfig}: flags aside, the
    environment, then the configuration file at C{config_path}, default
    C{$XDG_CONFIG_HOME/jobworker/config.toml}).  C{options} are those of
    L{connect}.

    @raise jobworker.clientconfig.ClientConfigError: (synchronously) a bad
        file, or C{server} names several servers.
    """
    from jobworker.clientconfig import ClientConfigError, load_client_config, resolve_targets

    targets = resolve_targets(load_client_config(config_path), server=server)
    if len(targets) != 1:
        raise ClientConfigError(f"{server!r} names {len(targets)} servers; a client talks to one")
    target = targets[0]
    return connect(
        reactor, target.address.value, ca=target.ca.value, cert=target.cert.value, key=target.key.value, **options
    )
