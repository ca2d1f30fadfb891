"""
The messages of the jobworker wire protocol, as frozen dataclasses.

Each message class carries its one-byte wire type in C{TYPE}.  The byte
layout of each lives in L{jobworker.protocol.wire}; the meaning of every
field and the rules for when a message may be sent are specified in
C{protocol-spec/README.md}.

Conventions shared by every message:
  - job ids are 16-byte UUIDs (L{uuid.UUID} here);
  - times are microseconds since the Unix epoch, 0 when not (yet) known;
  - optional numbers use 0 (or -1 for exit codes) for "none".

Why it is one module of over 400 lines: it is the protocol's vocabulary,
one small dataclass per message of the spec, kept together so that the
catalogue can be read (and checked against the spec) in one place.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import ClassVar

from jobworker.host.contract import FORWARDED_SIGNALS
from jobworker.limits import Limits

__all__ = [
    "PROTOCOL_VERSION",
    "UID_UNKNOWN",
    "JobState",
    "Network",
    "EndReason",
    "InvalidLimits",
    "JobUsage",
    "JobStatus",
    "Message",
    "ServerHello",
    "ClientHello",
    "GoAway",
    "Ping",
    "Pong",
    "StartRequest",
    "StopRequest",
    "StatusRequest",
    "ListRequest",
    "WaitRequest",
    "FollowRequest",
    "RemoveRequest",
    "SignalRequest",
    "SIGNALS_SENT",
    "WindowUpdate",
    "CancelStream",
    "StartResponse",
    "StatusResponse",
    "ListResponse",
    "OkResponse",
    "ErrorResponse",
    "Output",
    "Gap",
    "EndOfStream",
    "TimeMark",
    "REQUEST_TYPES",
    "SUPPORTED_VERSIONS",
    "NEWEST_FIRST_VERSION",
    "state_mask",
    "abridge",
    "ABRIDGED_ARGV_ITEMS",
    "ABRIDGED_TEXT_BYTES",
]

# The highest protocol version this implementation speaks, and every version
# it speaks.  Version 2 added keep-alive (Ping/Pong), paged and filtered
# lists, JobStatus.uid, abridged statuses and EndReason.SERVER_ERROR.
# Version 3 added job names and labels (StartRequest, JobStatus, the list
# filters) and output times (FollowRequest.timestamps and .since, the
# TimeMark message).  Version 4 added ListRequest.newest_first.  Versions 2
# and 3 differ in many layouts, so version 2 is refused at the hello (spec
# section 5.4); versions 3 and 4 differ only in the ListRequest's last
# byte, so a connection speaks the one negotiated at the hello, and a
# version 3 client is served as before.
PROTOCOL_VERSION = 4
SUPPORTED_VERSIONS = frozenset({3, 4})
# The first version with ListRequest.newest_first.
NEWEST_FIRST_VERSION = 4

# JobStatus.uid when the uid is not known: (uid_t)-1, which Linux never
# gives a user.
UID_UNKNOWN = 2**32 - 1


class JobState(IntEnum):
    """
    The life cycle of a job.  Values are wire codes; never renumber.
    """

    STARTING = 1
    RUNNING = 2
    EXITED = 3  # the command ended by itself; exit_code is set
    SIGNALED = 4  # killed by a signal nobody asked for; signal is set
    STOPPED = 5  # ended by a stop request; stopped_by is set
    FAILED = 6  # could not start; error says why
    OOM = 7  # killed by the kernel's OOM killer inside its memory limit
    TIMEOUT = 8  # stopped because it ran past its timeout
    LOST = 9  # was running when the server died; its end is unknown

    @property
    def is_final(self) -> bool:
        return self not in (JobState.STARTING, JobState.RUNNING)

    @property
    def label(self) -> str:
        return self.name.lower()


class Network(IntEnum):
    """
    The network a job sees.
    """

    NONE = 0  # its own network namespace with only loopback, up
    HOST = 1  # the host's network (admin only)


class EndReason(IntEnum):
    """
    Why an output stream ended.
    """

    JOB_ENDED = 0  # every byte was sent and the job is final
    CAUGHT_UP = 1  # a non-follow read reached the end of what exists now
    CANCELLED = 2  # the client cancelled the stream
    REMOVED = 3  # the job was removed while followed
    SERVER_ERROR = 4  # the server failed serving the stream (it logged why)


@dataclass(frozen=True)
class InvalidLimits:
    """
    Limits a client sent that are out of range, in place of a L{Limits}.

    The frame itself was well formed, so this is one request's error
    (C{INVALID_LIMITS}), not the connection's: the decoder keeps the reason
    and the server answers the request with it.
    """

    reason: str


@dataclass(frozen=True)
class JobUsage:
    """
    Resources a job has used; live while it runs, frozen when it ends.
    """

    cpu_usec: int = 0
    memory_peak_bytes: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    pids_peak: int = 0


@dataclass(frozen=True)
class JobStatus:
    """
    Everything a client may learn about one job.
    """

    job_id: uuid.UUID
    owner: str
    argv: tuple[str, ...]
    state: JobState
    exit_code: int = -1  # -1: none (not exited)
    signal: int = 0  # 0: none
    created_at: int = 0  # microseconds since the epoch
    started_at: int = 0
    ended_at: int = 0
    error: str = ""
    stopped_by: str = ""
    limits: Limits = field(default_factory=Limits)
    usage: JobUsage = field(default_factory=JobUsage)
    output_bytes: int = 0  # bytes of output produced so far (stdout + stderr)
    workdir: str = ""
    user: str = ""
    network: Network = Network.NONE
    uid: int = UID_UNKNOWN  # the uid the command runs as
    # True when the texts and argv above were cut to fit a frame (spec
    # section 6.2, "Abridged statuses"); the full status is not lost, only
    # not sent in this frame.
    abridged: bool = False
    name: str = ""  # "" = no name (jobworker.jobnames has the syntax)
    labels: tuple[tuple[str, str], ...] = ()  # (key, value), in the order given


# An abridged status (spec section 6.2) keeps at most this many argv items
# and this many bytes of each text: with the fixed fields, about 5.6 KB, so
# it fits the smallest frame a peer may announce (16 KiB) with room for the
# message around it.
ABRIDGED_ARGV_ITEMS = 16
ABRIDGED_TEXT_BYTES = 256


def _cut(text: str) -> str:
    data = text.encode("utf-8")
    if len(data) <= ABRIDGED_TEXT_BYTES:
        return text
    # Never half a character: the incomplete tail sequence is dropped.
    return data[:ABRIDGED_TEXT_BYTES].decode("utf-8", "ignore")


def abridge(status: JobStatus) -> JobStatus:
    """
    C{status} with its argv cut to L{ABRIDGED_ARGV_ITEMS} items and every
    text to L{ABRIDGED_TEXT_BYTES} bytes, marked C{abridged}; sent in place
    of a status that does not fit the peer's frame.
    """
    return replace(
        status,
        owner=_cut(status.owner),
        argv=tuple(_cut(item) for item in status.argv[:ABRIDGED_ARGV_ITEMS]),
        error=_cut(status.error),
        stopped_by=_cut(status.stopped_by),
        workdir=_cut(status.workdir),
        user=_cut(status.user),
        abridged=True,
    )


def state_mask(states: Iterable[JobState]) -> int:
    """
    The C{ListRequest.states} bit mask of C{states}: bit C{n} set for the
    state whose code is C{n}; 0 (no filter) for no states.
    """
    mask = 0
    for state in states:
        mask |= 1 << int(state)
    return mask


class Message:
    """
    Base class of every message; C{TYPE} is the wire type byte.
    """

    TYPE: ClassVar[int]


# -- Connection set-up and teardown -------------------------------------------


@dataclass(frozen=True)
class ServerHello(Message):
    """
    First message on every connection, sent by the server.
    """

    TYPE: ClassVar[int] = 0x01
    version: int
    max_frame_size: int  # bytes the server accepts in one frame
    server_name: str
    identity: str  # the client's identity as the server saw it (certificate CN)
    role: str  # the client's role (certificate OU), "" when none
    server_version: str = ""  # the server software and its version, for display ("jobworker 0.1.0")


@dataclass(frozen=True)
class ClientHello(Message):
    """
    The client's first message, sent after it has read the server's hello.
    """

    TYPE: ClassVar[int] = 0x02
    version: int
    max_frame_size: int  # bytes the client accepts in one frame


@dataclass(frozen=True)
class GoAway(Message):
    """
    A fatal error: the sender closes the connection after this message.
    """

    TYPE: ClassVar[int] = 0x03
    code: int
    message: str


@dataclass(frozen=True)
class Ping(Message):
    """
    Keep-alive: "are you there?"  The receiver answers with a L{Pong}
    carrying the same C{data} (spec section 5.7).  Either end may send it.
    """

    TYPE: ClassVar[int] = 0x04
    data: int  # opaque u64, echoed in the Pong


@dataclass(frozen=True)
class Pong(Message):
    """
    The answer to a L{Ping}, with its C{data}.
    """

    TYPE: ClassVar[int] = 0x05
    data: int


# -- Requests (client to server), each with a request id ----------------------


@dataclass(frozen=True)
class StartRequest(Message):
    TYPE: ClassVar[int] = 0x10
    request_id: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = ""  # "" = the server's default
    user: str = ""  # "" = the server's default job user
    network: Network = Network.NONE
    limits: Limits | InvalidLimits = field(default_factory=Limits)
    name: str = ""  # "" = no name; unique among the owner's jobs otherwise
    labels: tuple[tuple[str, str], ...] = ()  # (key, value), keys distinct


@dataclass(frozen=True)
class StopRequest(Message):
    TYPE: ClassVar[int] = 0x11
    request_id: int
    job_id: uuid.UUID
    grace_ms: int = 10_000  # SIGTERM, then SIGKILL after this long
    force: bool = False  # SIGKILL at once


# The signals a SignalRequest may send (spec section 6.1): those a job's
# isolation helper catches and forwards to the command's process group
# (jobworker.host.contract), so each reaches the command and never the
# helper: HUP INT QUIT USR1 USR2 TERM, {1, 2, 3, 10, 12, 15}.  SIGKILL is a
# stop with force (StopRequest), SIGSTOP cannot be caught.
SIGNALS_SENT = frozenset(FORWARDED_SIGNALS)


@dataclass(frozen=True)
class SignalRequest(Message):
    """
    Send one signal to a running job's command (its process group), without
    stopping it: the job's state follows from what the command then does.
    """

    TYPE: ClassVar[int] = 0x19
    request_id: int
    job_id: uuid.UUID
    signal: int  # one of SIGNALS_SENT (Linux numbers)


@dataclass(frozen=True)
class StatusRequest(Message):
    TYPE: ClassVar[int] = 0x12
    request_id: int
    job_id: uuid.UUID


@dataclass(frozen=True)
class ListRequest(Message):
    """
    One page of the jobs the caller may see, in (created_at, job_id) order,
    starting after the job (C{after_created_at}, C{after_job_id}): the
    zeros for the first page, the last job of a page for the next one.

    With C{newest_first} (protocol version 4 on), in the reverse order:
    the page starts with the newest job (zeros) or the one just before the
    cursor's job.
    """

    TYPE: ClassVar[int] = 0x13
    request_id: int
    after_created_at: int = 0  # microseconds since the epoch
    after_job_id: uuid.UUID = uuid.UUID(int=0)
    max_jobs: int = 0  # most jobs in the page; 0 = as many as fit a frame
    states: int = 0  # bit mask, bit n = JobState n; 0 = every state
    owner: str = ""  # "" = every owner the caller may see
    name: str = ""  # "" = any name; else only the job of this name
    # Each "KEY" (the job has the label) or "KEY=VALUE" (with this value);
    # a job must match them all.
    labels: tuple[str, ...] = ()
    # True: (created_at, job_id) descending, the cursor meaning "before";
    # only on a connection of version NEWEST_FIRST_VERSION or later.
    newest_first: bool = False


@dataclass(frozen=True)
class WaitRequest(Message):
    TYPE: ClassVar[int] = 0x14
    request_id: int
    job_id: uuid.UUID


@dataclass(frozen=True)
class FollowRequest(Message):
    """
    Open output stream C{stream_id} on a job's output, from C{offset}.
    """

    TYPE: ClassVar[int] = 0x15
    request_id: int
    job_id: uuid.UUID
    stream_id: int
    offset: int = 0  # absolute byte offset into the job's output
    window: int = 1 << 20  # initial credit, bytes
    follow: bool = True  # False: stop at the end of what exists now
    timestamps: bool = False  # True: send TimeMark frames with the output
    # Microseconds since the epoch; 0 = none.  Otherwise the stream starts
    # at the first byte read at or after this time (or at C{offset}, if
    # that is later); see spec section 8.7.
    since: int = 0


@dataclass(frozen=True)
class RemoveRequest(Message):
    TYPE: ClassVar[int] = 0x18
    request_id: int
    job_id: uuid.UUID


@dataclass(frozen=True)
class WindowUpdate(Message):
    """
    The client grants C{increment} more bytes of output on a stream.
    """

    TYPE: ClassVar[int] = 0x16
    stream_id: int
    increment: int


@dataclass(frozen=True)
class CancelStream(Message):
    TYPE: ClassVar[int] = 0x17
    stream_id: int


# -- Responses (server to client) ---------------------------------------------


@dataclass(frozen=True)
class StartResponse(Message):
    TYPE: ClassVar[int] = 0x20
    request_id: int
    job_id: uuid.UUID


@dataclass(frozen=True)
class StatusResponse(Message):
    TYPE: ClassVar[int] = 0x21
    request_id: int
    status: JobStatus


@dataclass(frozen=True)
class ListResponse(Message):
    TYPE: ClassVar[int] = 0x22
    request_id: int
    jobs: tuple[JobStatus, ...]
    more: bool = False  # jobs after the last one of this page match too


@dataclass(frozen=True)
class OkResponse(Message):
    TYPE: ClassVar[int] = 0x23
    request_id: int


@dataclass(frozen=True)
class ErrorResponse(Message):
    TYPE: ClassVar[int] = 0x24
    request_id: int
    code: int
    message: str


@dataclass(frozen=True)
class Output(Message):
    """
    Bytes of a job's output: C{fd} 1 is stdout, 2 is stderr.
    """

    TYPE: ClassVar[int] = 0x30
    stream_id: int
    fd: int
    offset: int  # absolute offset of data[0] in the job's output
    data: bytes


@dataclass(frozen=True)
class Gap(Message):
    """
    C{length} bytes from C{offset} were dropped by the retention limit.
    """

    TYPE: ClassVar[int] = 0x31
    stream_id: int
    offset: int
    length: int


@dataclass(frozen=True)
class EndOfStream(Message):
    TYPE: ClassVar[int] = 0x32
    stream_id: int
    reason: EndReason
    status: JobStatus


@dataclass(frozen=True)
class TimeMark(Message):
    """
    The output from C{offset} on (up to the next mark) was read by the
    server at C{time}; sent only on streams opened with C{timestamps}, before
    the first L{Output} frame that holds byte C{offset}.
    """

    TYPE: ClassVar[int] = 0x33
    stream_id: int
    offset: int  # absolute output offset
    time: int  # microseconds since the epoch


REQUEST_TYPES = (
    StartRequest,
    StopRequest,
    StatusRequest,
    ListRequest,
    WaitRequest,
    FollowRequest,
    RemoveRequest,
    SignalRequest,
)
