"""
The server's connection handling (L{jobworker.server.connection.ServerProtocol})
without a network, a reactor or real jobs: a L{StringTransport}, a
L{task.Clock} and a scripted job manager.  A client's sans-IO L{Connection}
encodes what the test sends and decodes, and checks, what the server wrote.

These are the protocol-conformance rules of the spec at the level of one
connection: GoAway, the pending-request cap, idle and keep-alive timing,
statuses of any size, paged lists, and unexpected errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

import jobworker.server.connection as server_module
from jobworker.errors import ErrorCode, RequestError
from jobworker.output.log import MemorySpool, OutputLog
from jobworker.policy import Identity, Operation, Verdict, authorize, may_see
from jobworker.protocol import messages as m
from jobworker.protocol.connection import DEFAULT_MAX_FRAME_SIZE, MIN_FRAME_SIZE, Connection, Role
from jobworker.protocol.listing import ListIndex, list_order
from jobworker.server.factory import ServerFactory, ServerLimits

T0 = 1_717_243_200_000_000


class FakeJob:
    def __init__(self, owner: str = "alice", argv: tuple[str, ...] = ("sleep", "1000"), *,
                 state: m.JobState = m.JobState.RUNNING, created_at: int = T0, **fields: Any) -> None:
        self.job_id = uuid.uuid4()
        self.owner = owner
        self.argv = argv
        self.state = state
        self.created_at = created_at
        self.fields = fields
        self.output = OutputLog(MemorySpool())
        self.ended: list[defer.Deferred[m.JobStatus]] = []
        self.broken = False  # status() raises
        if state.is_final:
            self.output.close()

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    def status(self) -> m.JobStatus:
        if self.broken:
            raise RuntimeError("the record is damaged")
        return m.JobStatus(self.job_id, self.owner, self.argv, self.state, created_at=self.created_at,
                           output_bytes=self.output.end, **self.fields)

    def when_ended(self) -> defer.Deferred[m.JobStatus]:
        if self.is_final:
            return defer.succeed(self.status())
        waiter: defer.Deferred[m.JobStatus] = defer.Deferred(lambda d: self.ended.remove(d))
        self.ended.append(waiter)
        return waiter

    def end(self, exit_code: int = 0) -> None:
        self.state = m.JobState.EXITED
        self.fields["exit_code"] = exit_code
        self.output.close()
        for waiter in list(self.ended):
            waiter.callback(self.status())
        self.ended.clear()


class FakeManager:
    """
    The part of L{JobManager} the server uses, with the real policy.
    """

    def __init__(self) -> None:
        self.jobs: dict[uuid.UUID, FakeJob] = {}
        self.get_raises: Exception | None = None
        self.removal_observers: list[Any] = []
        self.index: ListIndex[FakeJob] = ListIndex()

    def add(self, *args: Any, **kwargs: Any) -> FakeJob:
        job = FakeJob(*args, **kwargs)
        self.jobs[job.job_id] = job
        return job

    def get(self, identity: Identity, operation: Operation, job_id: uuid.UUID) -> FakeJob:
        if self.get_raises is not None:
            raise self.get_raises
        if authorize(identity, operation) is Verdict.DENIED:
            raise RequestError("permission denied", ErrorCode.PERMISSION_DENIED)
        job = self.jobs.get(job_id)
        if job is None or authorize(identity, operation, job.owner) is not Verdict.ALLOW:
            raise RequestError(f"no job {job_id}", ErrorCode.NOT_FOUND)
        return job

    def list(self, identity: Identity, after: tuple[int, int] = (0, 0), newest_first: bool = False) -> Iterator[FakeJob]:
        jobs = list(self.jobs.values())
        found = self.index.before(jobs, after) if newest_first else self.index.after(jobs, after)
        return (job for job in found if may_see(identity, job.owner))

    def start(self, identity: Identity, request: m.StartRequest) -> Any:
        raise RequestError("not in these tests", ErrorCode.START_FAILED)

    def remove(self, job: FakeJob) -> None:
        del self.jobs[job.job_id]
        for observer in list(self.removal_observers):
            observer(job)

    def on_removed(self, observer: Any) -> Any:
        self.removal_observers.append(observer)
        return lambda: self.removal_observers.remove(observer)


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} with the TLS transport's extra methods.
    """

    aborted = False

    def getPeerCertificate(self) -> object:
        return object()

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


class Session:
    """
    One connection to a L{ServerProtocol}, played by the test as the client.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, identity: tuple[str, str] = ("admin", "admin"),
                 client_max: int = DEFAULT_MAX_FRAME_SIZE, hello: bool = True,
                 versions: frozenset[int] = m.SUPPORTED_VERSIONS, **limits: Any) -> None:
        monkeypatch.setattr(server_module, "peer_names", lambda certificate: identity)
        self.clock = task.Clock()
        self.manager = FakeManager()
        self.factory = ServerFactory(self.manager, self.clock, limits=ServerLimits(**limits))  # type: ignore[arg-type]  # a stand-in manager
        self.protocol = self.factory.buildProtocol(None)
        self.transport = TLSStringTransport()
        self.client = Connection(Role.CLIENT, max_frame_size=client_max, versions=versions)
        self.protocol.makeConnection(self.transport)
        self.protocol.handshakeCompleted()
        [server_hello] = self.received()
        assert isinstance(server_hello, m.ServerHello)
        if hello:
            self.write(m.ClientHello(self.client.version, client_max))

    def write(self, *messages: m.Message) -> None:
        """
        Send C{messages} to the server in one read, and let it serve them
        all (it serves INBOX_TURN per turn of the reactor).
        """
        self.protocol.dataReceived(b"".join(self.client.send(message) for message in messages))
        self.serve()

    def serve(self) -> None:
        """
        Let the server's turns for what it has read run.
        """
        while self.protocol._inbox_turn is not None and self.protocol._inbox_turn.active():
            self.clock.advance(0)

    def write_raw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        self.serve()

    def received(self) -> list[m.Message]:
        data = self.transport.value()
        self.transport.clear()
        return self.client.receive_data(data)

    def pump(self) -> list[m.Message]:
        """
        Let the stream pump run; what the server sent meanwhile.
        """
        for _ in range(50):
            self.clock.advance(0)
        return self.received()

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting

    def lose(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.protocol.connectionLost(Failure(ConnectionDone()))


def errors_of(messages: list[m.Message]) -> dict[int, int]:
    return {message.request_id: message.code for message in messages if isinstance(message, m.ErrorResponse)}


# -- GoAway ------------------------------------------------------------------------


def test_client_goaway_closes_the_connection_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A client's GoAway is the end: the server closes at once, sends nothing
    more (no "handshake timeout" a minute later), and drops its waits.
    """
    session = Session(monkeypatch)
    job = session.manager.add()
    session.write(m.WaitRequest(1, job.job_id))
    assert job.ended
    session.write(m.GoAway(int(ErrorCode.PROTOCOL_ERROR), "the client gives up"))
    assert session.closing
    assert session.received() == []
    assert job.ended == []  # the wait was cancelled
    session.clock.advance(3600)
    assert session.transport.value() == b""


def test_frames_after_a_goaway_in_the_same_read_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    job = session.manager.add()
    goaway = session.client.send(m.GoAway(int(ErrorCode.PROTOCOL_ERROR), "bye"))
    from jobworker.protocol.wire import encode_message

    session.write_raw(goaway + encode_message(m.StatusRequest(1, job.job_id)))
    assert session.closing and session.received() == []


# -- the pending-request cap -------------------------------------------------------


def test_the_129th_wait_of_one_read_is_the_one_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    job = session.manager.add()
    session.write(*(m.WaitRequest(i, job.job_id) for i in range(1, 130)))
    assert errors_of(session.received()) == {129: ErrorCode.TOO_MANY_REQUESTS}
    assert len(job.ended) == 128
    # One answered, one more may wait.
    job.ended[0].callback(job.status())
    session.received()
    session.write(m.WaitRequest(500, job.job_id))
    assert errors_of(session.received()) == {}


def test_a_burst_of_follows_is_refused_only_beyond_the_stream_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    job = session.manager.add()
    session.write(*(m.FollowRequest(i, job.job_id, i) for i in range(1, 301)))
    messages = session.received()
    oks = [message.request_id for message in messages if isinstance(message, m.OkResponse)]
    assert oks == list(range(1, 257))
    assert errors_of(messages) == {i: ErrorCode.TOO_MANY_STREAMS for i in range(257, 301)}


def test_a_burst_of_status_requests_is_never_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    job = session.manager.add()
    session.write(*(m.StatusRequest(i, job.job_id) for i in range(1, 1001)))
    messages = session.received()
    assert len(messages) == 1000 and errors_of(messages) == {}


# -- idle ------------------------------------------------------------------------


def test_an_idle_connection_is_closed_after_the_idle_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch, idle_timeout_s=10, keepalive_interval_s=0)
    session.clock.advance(9.9)
    assert not session.closing
    session.clock.advance(0.2)
    [goaway] = session.received()
    assert isinstance(goaway, m.GoAway) and goaway.code == ErrorCode.TIMEOUT and "idle" in goaway.message
    assert session.closing


def test_the_idle_timeout_counts_afresh_after_a_long_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A wait that outlasts the idle timeout keeps the connection; once it is
    answered, the connection is idle again and is closed one idle timeout
    later (it used to stay open for ever).
    """
    session = Session(monkeypatch, idle_timeout_s=10, keepalive_interval_s=0)
    job = session.manager.add()
    session.write(m.WaitRequest(1, job.job_id))
    session.clock.advance(35)
    assert not session.closing and session.received() == []
    job.end(3)
    [answer] = session.received()
    assert isinstance(answer, m.StatusResponse) and answer.status.exit_code == 3
    session.clock.advance(9.9)
    assert not session.closing
    session.clock.advance(0.2)
    assert session.closing
    assert [type(message) for message in session.received()] == [m.GoAway]


def test_the_idle_timeout_counts_afresh_after_a_long_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch, idle_timeout_s=10, keepalive_interval_s=0)
    job = session.manager.add()
    session.write(m.FollowRequest(1, job.job_id, 1))
    session.clock.advance(25)
    job.output.append(1, b"late\n")
    session.clock.advance(25)
    job.end()
    messages = session.pump()
    assert isinstance(messages[-1], m.EndOfStream)
    session.clock.advance(9.9)
    assert not session.closing
    session.clock.advance(0.2)
    assert session.closing


@pytest.mark.parametrize("kind", ["ping", "window-update", "cancel", "partial-frame"])
def test_traffic_that_is_not_a_request_does_not_end_idleness(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    session = Session(monkeypatch, idle_timeout_s=10, keepalive_interval_s=0)
    if kind == "partial-frame":
        frame = session.client.send(m.StatusRequest(1, uuid.uuid4()))
    for step in range(4):
        session.clock.advance(2.4)
        if kind == "ping":
            session.write(m.Ping(step))
        elif kind == "window-update":
            session.write(m.WindowUpdate(1, 100))
        elif kind == "cancel":
            session.write(m.CancelStream(1))
        else:
            session.write_raw(frame[step : step + 1])
    assert not session.closing
    session.clock.advance(0.5)
    assert session.closing


def test_a_request_restarts_the_idle_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch, idle_timeout_s=10, keepalive_interval_s=0)
    job = session.manager.add()
    session.clock.advance(8)
    session.write(m.StatusRequest(1, job.job_id))
    session.clock.advance(8)
    assert not session.closing
    session.clock.advance(2.1)
    assert session.closing


# -- keep-alive --------------------------------------------------------------------


def test_a_silent_client_is_pinged_and_dropped_when_it_does_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch, keepalive_interval_s=5)
    job = session.manager.add()
    session.write(m.WaitRequest(1, job.job_id))  # busy: not idle-closed
    session.clock.advance(4.9)
    assert session.received() == []
    session.clock.advance(0.2)
    [ping] = session.received()
    assert isinstance(ping, m.Ping)
    session.clock.advance(4.8)
    assert not session.closing
    session.clock.advance(0.3)
    [goaway] = session.received()
    assert isinstance(goaway, m.GoAway) and goaway.code == ErrorCode.TIMEOUT and "keep-alive" in goaway.message
    assert session.closing


def test_a_client_that_answers_pings_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch, keepalive_interval_s=5)
    job = session.manager.add()
    session.write(m.WaitRequest(1, job.job_id))
    for _ in range(100):  # 500 s of a quiet job
        session.clock.advance(1)
        for message in session.received():
            if isinstance(message, m.Ping):
                session.write(m.Pong(message.data))
    assert not session.closing
    job.end()
    assert isinstance(session.received()[0], m.StatusResponse)


def test_the_server_answers_a_ping(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    session.write(m.Ping(0xDEADBEEF))
    assert session.received() == [m.Pong(0xDEADBEEF)]


def test_keepalive_off(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch, keepalive_interval_s=0, idle_timeout_s=1e9)
    session.clock.advance(1e6)
    assert session.received() == [] and not session.closing


# -- every stream ends, every status is sent -------------------------------------


def test_end_of_stream_of_a_large_job_fits_a_small_client_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch, client_max=MIN_FRAME_SIZE)
    job = session.manager.add(argv=("sh", "-c", "x" * 20_000), state=m.JobState.EXITED, exit_code=4)
    session.write(m.FollowRequest(1, job.job_id, 1), m.StatusRequest(2, job.job_id))
    messages = session.received() + session.pump()
    ends = [message for message in messages if isinstance(message, m.EndOfStream)]
    [status] = [message for message in messages if isinstance(message, m.StatusResponse)]
    assert len(ends) == 1 and ends[0].reason is m.EndReason.JOB_ENDED
    assert ends[0].status.abridged and ends[0].status.exit_code == 4
    assert status.status.abridged and status.status.argv[:2] == ("sh", "-c")
    assert not session.closing


# -- lists -------------------------------------------------------------------------


def list_all(session: Session, **filters: Any) -> tuple[list[m.JobStatus], int]:
    jobs: list[m.JobStatus] = []
    after = (0, uuid.UUID(int=0))
    pages = 0
    while True:
        session.write(m.ListRequest(100 + pages, after[0], after[1], **filters))
        [page] = session.received()
        assert isinstance(page, m.ListResponse), page
        pages += 1
        jobs += page.jobs
        if not page.more:
            return jobs, pages
        assert page.jobs
        after = (page.jobs[-1].created_at, page.jobs[-1].job_id)


def test_five_jobs_with_the_largest_argv_are_listed_in_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    big = tuple("y" * 65_000 for _ in range(4))  # 260 KB: the most a start may carry
    made = [session.manager.add(argv=big, created_at=T0 + i) for i in range(5)]
    listed, pages = list_all(session)
    assert [status.job_id for status in listed] == [job.job_id for job in made]
    assert all(status.argv == big and not status.abridged for status in listed)
    assert pages >= 2


def test_a_list_works_whatever_the_client_frame_size(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch, client_max=MIN_FRAME_SIZE)
    made = [session.manager.add(argv=("x" * 60_000,), created_at=T0 + i) for i in range(3)]
    made += [session.manager.add(created_at=T0 + 10 + i) for i in range(200)]
    listed, pages = list_all(session)
    assert [status.job_id for status in listed] == [job.job_id for job in made]
    assert [status.abridged for status in listed[:3]] == [True] * 3
    assert not any(status.abridged for status in listed[3:])


def test_list_filters_by_state_and_owner(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    running = session.manager.add(owner="alice", created_at=T0)
    exited = session.manager.add(owner="alice", state=m.JobState.EXITED, created_at=T0 + 1)
    bobs = session.manager.add(owner="bob", state=m.JobState.FAILED, created_at=T0 + 2)
    by_state, _ = list_all(session, states=m.state_mask([m.JobState.EXITED, m.JobState.FAILED]))
    assert [status.job_id for status in by_state] == [exited.job_id, bobs.job_id]
    by_owner, _ = list_all(session, owner="alice")
    assert [status.job_id for status in by_owner] == [running.job_id, exited.job_id]
    both, _ = list_all(session, owner="alice", states=m.state_mask([m.JobState.RUNNING]))
    assert [status.job_id for status in both] == [running.job_id]
    page_of_one, pages = list_all(session, max_jobs=1)
    assert len(page_of_one) == 3 and pages == 3


def test_jobs_with_the_same_creation_time_are_paged_without_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    made = [session.manager.add(created_at=T0) for _ in range(7)]
    listed, pages = list_all(session, max_jobs=2)
    assert sorted(status.job_id for status in listed) == sorted(job.job_id for job in made)
    assert len(listed) == 7 and pages == 4


def test_newest_first_pages_run_from_the_newest_job_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    Newest first, each page holds the jobs just before the cursor's, and
    ties of creation time are broken by id, in reverse as well: pages of 2
    list every job once, in the reverse of the oldest-first order.
    """
    session = Session(monkeypatch)
    for index in range(9):
        session.manager.add(owner="alice" if index % 3 else "bob", created_at=T0 + index // 2)
    oldest_first, _ = list_all(session)
    newest_first, pages = list_all(session, max_jobs=2, newest_first=True)
    assert [status.job_id for status in newest_first] == [status.job_id for status in reversed(oldest_first)]
    assert pages == 5
    alices, _ = list_all(session, max_jobs=2, owner="alice", newest_first=True)
    assert alices == [status for status in newest_first if status.owner == "alice"]


def test_a_version_3_client_is_answered_as_a_version_3_server_did(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A version 3 client's list (its requests without the newest_first flag)
    gets the pages, oldest first, in the very bytes a version 4 client gets
    for an oldest-first list, which are those version 3 defined.
    """
    sessions = [Session(monkeypatch, versions=frozenset({3})), Session(monkeypatch)]
    assert sessions[0].protocol.conn.version == 3 and sessions[1].protocol.conn.version == 4
    jobs = [FakeJob(created_at=T0 + index % 4, argv=("x" * 5000,)) for index in range(12)]
    answers = []
    for session in sessions:
        session.manager.jobs.update((job.job_id, job) for job in jobs)
        # The first page, as version 3 encodes it (list_request.basic).
        session.write_raw(bytes.fromhex("000000291300000008" + "00" * 36) if session is sessions[0] else
                          session.client.send(m.ListRequest(8)))
        answers.append(session.transport.value())
        session.transport.clear()
        listed, pages = list_all(session, max_jobs=5)
        assert [status.job_id for status in listed] == [job.job_id for job in sorted(jobs, key=list_order)]
        assert pages == 3
    assert answers[0] == answers[1] and answers[0]
    with pytest.raises(ValueError, match="version 4"):
        sessions[0].client.send(m.ListRequest(9, newest_first=True))


def test_a_user_lists_only_its_own_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch, identity=("alice", "user"))
    mine = session.manager.add(owner="alice")
    session.manager.add(owner="bob")
    listed, _ = list_all(session, owner="bob")
    assert listed == []
    listed, _ = list_all(session)
    assert [status.job_id for status in listed] == [mine.job_id]


# -- unexpected errors -------------------------------------------------------------


def failures(logged: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [event for event in logged if "log_failure" in event]


def test_an_exception_in_a_handler_is_that_requests_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    job = session.manager.add()
    session.manager.get_raises = KeyError("boom")
    with capturedLogs() as logged:
        session.write(m.StatusRequest(1, job.job_id))
    assert errors_of(session.received()) == {1: ErrorCode.INTERNAL}
    assert failures(logged)
    session.manager.get_raises = None
    session.write(m.StatusRequest(2, job.job_id))
    assert isinstance(session.received()[0], m.StatusResponse)
    assert not session.closing


def test_an_unencodable_status_is_an_internal_error_not_a_dropped_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    bad = session.manager.add(signal=300)  # a damaged record: no u8 holds it
    good = session.manager.add(created_at=T0 + 1)
    with capturedLogs() as logged:
        session.write(m.StatusRequest(1, bad.job_id), m.StatusRequest(2, good.job_id))
    messages = session.received()
    assert errors_of(messages) == {1: ErrorCode.INTERNAL}
    assert any(isinstance(message, m.StatusResponse) and message.request_id == 2 for message in messages)
    assert failures(logged) and not session.closing


def test_an_unencodable_status_does_not_break_the_list(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    bad = session.manager.add(exit_code=2**40, created_at=T0)
    good = session.manager.add(created_at=T0 + 1)
    with capturedLogs():
        listed, _ = list_all(session)
    assert [status.job_id for status in listed] == [bad.job_id, good.job_id]
    assert listed[0].abridged and listed[0].error


def test_a_wait_answered_with_an_unencodable_status(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    job = session.manager.add()
    session.write(m.WaitRequest(1, job.job_id))
    job.created_at = 10**30  # out of range for a u64
    with capturedLogs() as logged:
        job.end()
    assert errors_of(session.received()) == {1: ErrorCode.INTERNAL}
    assert failures(logged) and not session.closing


def test_a_stream_whose_status_cannot_be_read_still_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    job = session.manager.add()
    session.write(m.FollowRequest(1, job.job_id, 1))
    session.received()
    job.end()
    job.broken = True
    with capturedLogs() as logged:
        messages = session.pump()
    [end] = [message for message in messages if isinstance(message, m.EndOfStream)]
    assert end.reason is m.EndReason.SERVER_ERROR and end.status.job_id == job.job_id
    assert failures(logged) and not session.closing


def test_a_stream_that_fails_mid_way_ends_and_others_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session(monkeypatch)
    bad = session.manager.add()
    good = session.manager.add()
    session.write(m.FollowRequest(1, bad.job_id, 1), m.FollowRequest(2, good.job_id, 2))
    session.received()

    def broken_read(offset: int, limit: int) -> Any:
        raise OSError("spool gone")

    bad.output.append(1, b"x")
    bad.output.read = broken_read  # type: ignore[method-assign]  # made to fail
    good.output.append(1, b"fine\n")
    with capturedLogs() as logged:
        messages = session.pump()
    [end] = [message for message in messages if isinstance(message, m.EndOfStream)]
    assert end.stream_id == 1 and end.reason is m.EndReason.SERVER_ERROR
    assert [message.data for message in messages if isinstance(message, m.Output)] == [b"fine\n"]
    assert failures(logged) and not session.closing


# -- string rules of a start request (the manager's check, no process) ------------


BAD_FIELDS = [
    dict(argv=("tr\0ue",)),
    dict(argv=("echo", "a\0b")),
    dict(argv=("",)),
    dict(argv=()),
    dict(env=(("A\0B", "x"),)),
    dict(env=(("A", "x\0y"),)),
    dict(env=(("A=B", "x"),)),
    dict(env=(("", "x"),)),
    dict(workdir="/tm\0p"),
    dict(workdir="relative"),
    dict(user="no\0body"),
]


@pytest.mark.parametrize("fields", BAD_FIELDS, ids=repr)
def test_every_string_rule_of_a_start_is_a_bad_request(fields: dict[str, Any]) -> None:
    from jobworker.jobs.admission import check_request

    request = m.StartRequest(1, **{"argv": ("true",), **fields})
    with pytest.raises(RequestError) as refused:
        check_request(request)
    assert refused.value.code is ErrorCode.BAD_REQUEST


def test_a_start_within_the_rules_passes_the_check() -> None:
    from jobworker.jobs.admission import check_request

    check_request(m.StartRequest(1, ("echo", "ünïcode"), (("A", "b=c"),), "/tmp", "nobody"))
