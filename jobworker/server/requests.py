"""
What the server answers to each request: one handler per request type
(L{HANDLERS}), the operation each is audited and authorized as
(L{OPERATIONS}), and what is sent in place of an answer that cannot be
encoded (L{fallback}).

A handler takes the connection and the request and returns the answer, or
a L{Deferred} of it for requests answered later (start, wait), or L{None}
when it has answered itself (follow answers C{Ok} before its stream's first
output).  It raises L{RequestError} for an answer that is an error; the
connection (L{jobworker.server.connection}) turns that, and anything
unexpected, into an C{ErrorResponse}, and writes the audit line.
Authorization is the job manager's (C{manager.get(identity, operation,
job_id)}).
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.python.failure import Failure

from jobworker.audit import log_value
from jobworker.errors import ErrorCode, RequestError
from jobworker.logs import Logger
from jobworker.policy import Operation
from jobworker.protocol import messages as m
from jobworker.protocol.listing import check_list_filters, list_page

if TYPE_CHECKING:
    from jobworker.server.connection import ServerProtocol

__all__ = ["HANDLERS", "OPERATIONS", "answer", "audit", "fallback", "minimal_status"]

log = Logger()

Handler = Callable[["ServerProtocol", Any], "m.Message | defer.Deferred[m.Message] | None"]


def _start(connection: ServerProtocol, request: m.StartRequest) -> defer.Deferred[m.Message]:
    assert connection.identity is not None
    started = connection.manager.start(connection.identity, request)
    return started.addCallback(lambda job: m.StartResponse(request.request_id, job.job_id))


def _stop(connection: ServerProtocol, request: m.StopRequest) -> m.Message:
    assert connection.identity is not None
    job = connection.manager.get(connection.identity, Operation.STOP, request.job_id)
    if job.is_final:
        raise RequestError(f"job {job.job_id} has already ended ({job.state.label})", ErrorCode.JOB_FINISHED)
    grace = 0.0 if request.force else request.grace_ms / 1000
    job.stop(connection.identity.name, grace)
    return m.OkResponse(request.request_id)


def _signal(connection: ServerProtocol, request: m.SignalRequest) -> m.Message:
    assert connection.identity is not None
    job = connection.manager.get(connection.identity, Operation.STOP, request.job_id)
    if request.signal not in m.SIGNALS_SENT:
        names = ", ".join(sorted(signal.Signals(number).name[3:] for number in m.SIGNALS_SENT))
        raise RequestError(f"signal {request.signal} cannot be sent to a job (only {names}; KILL is a forced stop)", ErrorCode.BAD_REQUEST)
    if job.is_final:
        raise RequestError(f"job {job.job_id} has already ended ({job.state.label})", ErrorCode.JOB_FINISHED)
    job.send_signal(request.signal)
    return m.OkResponse(request.request_id)


def _status(connection: ServerProtocol, request: m.StatusRequest) -> m.Message:
    assert connection.identity is not None
    job = connection.manager.get(connection.identity, Operation.STATUS, request.job_id)
    return m.StatusResponse(request.request_id, job.status())


def _list(connection: ServerProtocol, request: m.ListRequest) -> m.Message:
    assert connection.identity is not None
    check_list_filters(request)
    jobs = connection.manager.list(
        connection.identity, (request.after_created_at, request.after_job_id.int), request.newest_first
    )
    return list_page(jobs, request, connection.conn.peer_max_frame_size, _unlistable)


def _unlistable(job: Any, error: Exception) -> m.JobStatus:
    # One damaged job never breaks the list for everyone: it is listed
    # with what is certainly encodable.
    log.error("job {job_id} cannot be listed: {error}", job_id=job.job_id, error=error)
    return minimal_status(job.job_id, m.JobState.LOST, "the server cannot encode this job's status")


def _wait(connection: ServerProtocol, request: m.WaitRequest) -> defer.Deferred[m.Message]:
    assert connection.identity is not None
    job = connection.manager.get(connection.identity, Operation.WAIT, request.job_id)
    return job.when_ended().addCallback(lambda status: m.StatusResponse(request.request_id, status))


def _remove(connection: ServerProtocol, request: m.RemoveRequest) -> m.Message:
    assert connection.identity is not None
    job = connection.manager.get(connection.identity, Operation.REMOVE, request.job_id)
    connection.manager.remove(job)
    return m.OkResponse(request.request_id)


def _follow(connection: ServerProtocol, request: m.FollowRequest) -> None:
    assert connection.identity is not None
    job = connection.manager.get(connection.identity, Operation.LOGS, request.job_id)
    limits = connection.limits
    if len(connection.streams) >= limits.max_streams:
        raise RequestError(f"at most {limits.max_streams} output streams per connection", ErrorCode.TOO_MANY_STREAMS)
    if connection.factory.streams_of(connection.identity.name) >= limits.max_streams_per_identity:
        raise RequestError(
            f"at most {limits.max_streams_per_identity} output streams per identity, on all its connections",
            ErrorCode.TOO_MANY_STREAMS,
        )
    if request.offset > job.output.end and job.is_final:
        raise RequestError(
            f"offset {request.offset} is past the end of the output ({job.output.end} bytes)",
            ErrorCode.BAD_REQUEST,
        )
    offset = request.offset
    if request.since:
        # From the first byte read at or after `since` (spec 8.7).
        offset = max(offset, job.output.marks.offset_at(request.since, job.output.end))
    connection.respond(m.OkResponse(request.request_id))
    connection.open_stream(request.stream_id, job, offset, request.follow, request.timestamps)


HANDLERS: dict[type[m.Message], Handler] = {
    m.StartRequest: _start,
    m.StopRequest: _stop,
    m.SignalRequest: _signal,
    m.StatusRequest: _status,
    m.ListRequest: _list,
    m.WaitRequest: _wait,
    m.RemoveRequest: _remove,
    m.FollowRequest: _follow,
}

OPERATIONS: dict[type[m.Message], Operation] = {
    m.StartRequest: Operation.START,
    m.StopRequest: Operation.STOP,
    m.SignalRequest: Operation.STOP,
    m.StatusRequest: Operation.STATUS,
    m.ListRequest: Operation.LIST,
    m.WaitRequest: Operation.WAIT,
    m.RemoveRequest: Operation.REMOVE,
    m.FollowRequest: Operation.LOGS,
}


def answer(connection: ServerProtocol, message: m.Message) -> None:
    """
    Answer a request (now, or later for start and wait), and audit it.

    Every request gets exactly one answer: its handler's, its
    L{RequestError}'s, or C{INTERNAL} for anything unexpected (logged,
    never the connection's end).  One answered later is kept in
    C{connection.waiting} until then; cancelling it (the connection went)
    drops the answer.
    """
    handler = HANDLERS.get(type(message))
    assert handler is not None, message
    request_id = message.request_id  # type: ignore[attr-defined]
    operation = OPERATIONS[type(message)]
    job_id = getattr(message, "job_id", None)

    def internal_error(failure: Failure | None = None) -> None:
        # Anything unexpected is this request's INTERNAL error and a
        # logged failure, never the connection's end.
        log.failure(
            "internal error serving {operation} for {identity}",
            failure,
            operation=operation.value,
            identity=log_value(str(connection.identity)),
        )
        audit(connection, operation, job_id, "internal-error")
        if connection.conn.is_pending(request_id):
            connection.respond(m.ErrorResponse(request_id, int(ErrorCode.INTERNAL), "internal server error"))

    try:
        if connection.conn.pending_requests > connection.limits.max_pending_requests:
            raise RequestError(
                f"more than {connection.limits.max_pending_requests} requests pending on this connection",
                ErrorCode.TOO_MANY_REQUESTS,
            )
        result = handler(connection, message)
        if not isinstance(result, defer.Deferred):
            audit(connection, operation, job_id, "allow")
            if result is not None:
                connection.respond(result)
            return
    except RequestError as error:
        audit(connection, operation, job_id, error.code.name.lower())
        connection.respond(m.ErrorResponse(request_id, int(error.code), error.message))
        return
    except Exception:
        internal_error()
        return
    # Answered later (start, wait): audited when the verdict is known.
    connection.waiting[request_id] = result

    def done(response: m.Message) -> None:
        connection.waiting.pop(request_id, None)
        try:
            audit(connection, operation, getattr(response, "job_id", job_id), "allow")
            connection.respond(response)
        except Exception:
            internal_error()

    def failed(failure: Failure) -> None:
        connection.waiting.pop(request_id, None)
        if failure.check(defer.CancelledError):
            return
        try:
            if failure.check(RequestError):
                error = failure.value
                assert isinstance(error, RequestError)
                audit(connection, operation, job_id, error.code.name.lower())
                connection.respond(m.ErrorResponse(request_id, int(error.code), error.message))
                return
            internal_error(failure)
        except Exception:
            internal_error()

    result.addCallbacks(done, failed)


def audit(connection: ServerProtocol, operation: Operation, job_id: uuid.UUID | None, verdict: str) -> None:
    """
    One audit line, as C{key=value} pairs whose values cannot break the
    line (L{log_value}); at most C{audit_burst} per identity per
    C{audit_interval_s}, the rest summarized (L{ServerFactory.audit}).
    """
    name = connection.identity.name if connection.identity else ""
    if not connection.factory.audit(name, f"{operation.value} {verdict}"):
        return
    log.info(
        "audit identity={identity} role={role} peer={peer} operation={operation} job={job_id} verdict={verdict}",
        identity=log_value(name),
        role=connection.identity.role.value if connection.identity and connection.identity.role else '""',
        peer=log_value(connection.peer),
        operation=operation.value,
        job_id=str(job_id) if job_id else "-",
        verdict=verdict,
        audit=True,
    )


def minimal_status(job_id: uuid.UUID, state: m.JobState, error: str) -> m.JobStatus:
    """
    A status that can always be encoded, for a job whose own cannot.
    """
    return m.JobStatus(job_id=job_id, owner="", argv=(), state=state, error=error, abridged=True)


def fallback(response: m.Message) -> m.Message:
    """
    What to send in place of a response or stream end that cannot be
    encoded.
    """
    if isinstance(response, m.EndOfStream):
        state = response.status.state if isinstance(response.status.state, m.JobState) else m.JobState.LOST
        status = minimal_status(response.status.job_id, state, "the server cannot encode this job's status")
        return m.EndOfStream(response.stream_id, m.EndReason.SERVER_ERROR, status)
    request_id = getattr(response, "request_id", None)
    if request_id is None:
        raise ValueError(f"no fallback for {type(response).__name__}")
    return m.ErrorResponse(request_id, int(ErrorCode.INTERNAL), "internal server error: the response cannot be encoded")
