"""
Write the golden vectors of the jobworker wire protocol.

The vectors in C{protocol-spec/vectors/} were generated once with this
script, from the reference implementation (L{jobworker.protocol.wire}), and
then reviewed against C{README.md} by hand.  They are now the reference: the
test suite (C{tests/unit/test_golden_vectors.py}) checks that the implementation
still produces and accepts exactly these bytes, so a change to the encoder
that alters a single byte fails the tests instead of silently changing the
protocol.

Usage, from the repository root::

    .venv/bin/python protocol-spec/make_vectors.py            # write missing files only
    .venv/bin/python protocol-spec/make_vectors.py --check    # compare, write nothing
    .venv/bin/python protocol-spec/make_vectors.py --force    # overwrite (a protocol change!)

Adding a vector: add it to L{VECTORS} and run without options; files that
already exist are never rewritten without C{--force}, so a new vector for a
new message type cannot alter the old ones by accident.  To add a vector to
an existing file, run with C{--force} and check with C{git diff} that only
the new entry appeared.

JSON conventions (the README's "Golden vectors" section says the same):
fields appear in wire order; integers and enumerations are JSON numbers
(their wire values); flags are C{true}/C{false}; job ids are UUID strings;
raw bytes (C{Output.data}) are lowercase hex; texts are JSON strings;
arrays are JSON arrays, an environment entry a C{[name, value]} pair; the
nested records (C{JobStatus}, C{Limits}, C{JobUsage}) are JSON objects.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from jobworker.errors import ErrorCode  # noqa: E402 - after the sys.path line above
from jobworker.limits import Limits  # noqa: E402 - after the sys.path line above
from jobworker.protocol import messages as m  # noqa: E402 - after the sys.path line above
from jobworker.protocol.wire import encode_message  # noqa: E402 - after the sys.path line above

VECTOR_DIR = HERE / "vectors"

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1
I32_MIN = -(2**31)
I32_MAX = 2**31 - 1
MAX_WINDOW = 2**31 - 1

# Fixed, recognisable values, so that a reader can find them in the hex.
JOB_A = uuid.UUID("0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0")
JOB_B = uuid.UUID("6ba7b810-9dad-41d1-80b4-00c04fd430c8")
JOB_NIL = uuid.UUID(int=0)
JOB_MAX = uuid.UUID(int=2**128 - 1)
# 2024-06-01T12:00:00Z in microseconds since the epoch.
T0 = 1_717_243_200_000_000


def _status(**changes: Any) -> m.JobStatus:
    base = m.JobStatus(
        job_id=JOB_A,
        owner="alice",
        argv=("/bin/sh", "-c", "echo hello"),
        state=m.JobState.RUNNING,
        exit_code=-1,
        signal=0,
        created_at=T0,
        started_at=T0 + 2_500,
        ended_at=0,
        error="",
        stopped_by="",
        limits=Limits(pids=1024),
        usage=m.JobUsage(cpu_usec=12_000, memory_peak_bytes=3 << 20, io_read_bytes=0, io_write_bytes=4096, pids_peak=2),
        output_bytes=6,
        workdir="/",
        user="nobody",
        network=m.Network.NONE,
        uid=65534,
    )
    return dataclasses.replace(base, **changes)


def _ended(state: m.JobState, **changes: Any) -> m.JobStatus:
    return _status(state=state, ended_at=T0 + 1_000_000, **changes)


EXITED = _ended(m.JobState.EXITED, exit_code=0)

# The earlier versions' layouts that differ from the current one: (version,
# message) -> the fields that version does not have.
EARLIER_LAYOUTS: dict[tuple[int, type[m.Message]], tuple[str, ...]] = {
    (3, m.ListRequest): ("newest_first",),
}

# (file stem, [(vector name, what it shows, message[, version]), ...]), in
# type order; a version only for a frame of an earlier version's layout
# (one of EARLIER_LAYOUTS), none for the current version's.
Vector = tuple[str, str, m.Message] | tuple[str, str, m.Message, int]
VECTORS: list[tuple[str, list[Vector]]] = [
    (
        "server_hello",
        [
            ("server_hello.basic", "the server's first frame for a client with CN alice, OU user",
             m.ServerHello(3, 1 << 20, "jobworker", "alice", "user", "jobworker 0.1.0")),
            ("server_hello.utf8_no_role", "non-ASCII texts; a certificate without an OU gives role \"\"",
             m.ServerHello(3, 16 << 20, "wörker-東京", "zoë", "", "")),
            ("server_hello.version_4", "a server that speaks version 4 at most (and 3: its hello names only the highest)",
             m.ServerHello(4, 1 << 20, "jobworker", "alice", "user", "jobworker 0.1.0")),
        ],
    ),
    (
        "client_hello",
        [
            ("client_hello.basic", "version 3, default maximum frame size of 1 MiB",
             m.ClientHello(3, 1 << 20)),
            ("client_hello.min_frame", "the smallest maximum frame size a peer may announce: 16 KiB",
             m.ClientHello(3, 16 << 10)),
            ("client_hello.version_4", "version 4, default maximum frame size of 1 MiB",
             m.ClientHello(4, 1 << 20)),
        ],
    ),
    (
        "go_away",
        [
            ("go_away.unsupported_version", "a hello with a version this end does not speak",
             m.GoAway(int(ErrorCode.UNSUPPORTED_VERSION), "protocol version 2 is not supported (this server speaks 3)")),
            ("go_away.timeout_empty_message", "an empty text is just its zero length",
             m.GoAway(int(ErrorCode.TIMEOUT), "")),
        ],
    ),
    (
        "ping",
        [
            ("ping.basic", "keep-alive after a quiet interval; the data is opaque", m.Ping(1)),
            ("ping.max_data", "the largest u64", m.Ping(U64_MAX)),
        ],
    ),
    (
        "pong",
        [
            ("pong.basic", "the answer to ping.basic: the same data", m.Pong(1)),
        ],
    ),
    (
        "start_request",
        [
            ("start_request.minimal", "only a command; everything else left to the server",
             m.StartRequest(1, ("/bin/true",))),
            ("start_request.full", "environment, workdir, user, host network and every limit set",
             m.StartRequest(
                 2,
                 ("/usr/bin/env", "python3", "-c", "print('hi')"),
                 env=(("LANG", "C.UTF-8"), ("GREETING", "grüß dich")),
                 workdir="/srv/work",
                 user="builder",
                 network=m.Network.HOST,
                 limits=Limits(
                     cpu_millicores=500,
                     memory_bytes=256 << 20,
                     io_read_bps=10 << 20,
                     io_write_bps=5 << 20,
                     pids=64,
                     timeout_ms=30_000,
                 ),
             )),
            ("start_request.limits_at_maximum", "every limit at the largest value a receiver accepts; request id 2^32-1",
             m.StartRequest(
                 U32_MAX,
                 ("sleep", "1"),
                 limits=Limits(
                     cpu_millicores=1_024_000,
                     memory_bytes=2**62,
                     io_read_bps=2**62,
                     io_write_bps=2**62,
                     pids=4_194_304,
                     timeout_ms=31_536_000_000,
                 ),
             )),
            ("start_request.empty_argv", "an empty argv encodes (count 0); the server answers BAD_REQUEST",
             m.StartRequest(3, ())),
            ("start_request.named_labelled", "a job named web-1 with two labels (version 3)",
             m.StartRequest(4, ("nginx",), name="web-1", labels=(("app", "web"), ("tier", "frönt")))),
        ],
    ),
    (
        "stop_request",
        [
            ("stop_request.default_grace", "SIGTERM, then SIGKILL after 10 s",
             m.StopRequest(4, JOB_A)),
            ("stop_request.force", "SIGKILL at once; force is the flag byte 0x01",
             m.StopRequest(5, JOB_B, grace_ms=0, force=True)),
            ("stop_request.max_grace", "the largest grace period the field holds, in ms",
             m.StopRequest(6, JOB_A, grace_ms=U32_MAX, force=False)),
        ],
    ),
    (
        "status_request",
        [
            ("status_request.basic", "status of one job", m.StatusRequest(7, JOB_A)),
            ("status_request.nil_job", "the all-zero UUID is an ordinary (unknown) id on the wire",
             m.StatusRequest(0, JOB_NIL)),
            ("status_request.max_ids", "largest request id and an all-ones UUID",
             m.StatusRequest(U32_MAX, JOB_MAX)),
        ],
    ),
    (
        "list_request",
        [
            # Version 3's layout (no newest_first): the bytes a version 3
            # client sends, which a version 4 server still reads.
            ("list_request.basic", "the first page, no filter, as many jobs as fit", m.ListRequest(8), 3),
            ("list_request.next_page_filtered",
             "the page after job A, at most 50 jobs, running or exited (bits 2 and 3), owned by bob",
             m.ListRequest(9, after_created_at=T0, after_job_id=JOB_A, max_jobs=50,
                           states=m.state_mask([m.JobState.RUNNING, m.JobState.EXITED]), owner="bob"), 3),
            ("list_request.name_and_labels", "only the job named web-1, if it has label app=web and a label tier",
             m.ListRequest(10, name="web-1", labels=("app=web", "tier")), 3),
            ("list_request.oldest_first", "the first page, oldest first, no filter, as many jobs as fit",
             m.ListRequest(11)),
            ("list_request.newest_first", "the first page newest first: from the newest job on",
             m.ListRequest(12, newest_first=True)),
            ("list_request.newest_first_next_page",
             "newest first, the page of jobs before job A, at most 50 jobs, owned by bob",
             m.ListRequest(13, after_created_at=T0, after_job_id=JOB_A, max_jobs=50, owner="bob", newest_first=True)),
        ],
    ),
    (
        "wait_request",
        [
            ("wait_request.basic", "answered with a StatusResponse once the job is final",
             m.WaitRequest(9, JOB_B)),
        ],
    ),
    (
        "follow_request",
        [
            ("follow_request.defaults", "from offset 0 with a 1 MiB window, following",
             m.FollowRequest(10, JOB_A, 1)),
            ("follow_request.resume_no_follow", "resume at byte 1 MiB + 5, largest window, stop at the current end",
             m.FollowRequest(11, JOB_A, 2, offset=(1 << 20) + 5, window=MAX_WINDOW, follow=False)),
            ("follow_request.max_values", "largest stream id and offset; window 0 (nothing flows until a WindowUpdate)",
             m.FollowRequest(12, JOB_B, U32_MAX, offset=U64_MAX, window=0, follow=True)),
            ("follow_request.timestamps_since", "with TimeMark frames, from the first byte read at T0 + 1 s or later",
             m.FollowRequest(13, JOB_A, 3, timestamps=True, since=T0 + 1_000_000)),
        ],
    ),
    (
        "window_update",
        [
            ("window_update.basic", "grant 512 KiB more on stream 1", m.WindowUpdate(1, 512 << 10)),
            ("window_update.max", "the largest increment a stream at window 0 may receive",
             m.WindowUpdate(U32_MAX, MAX_WINDOW)),
        ],
    ),
    (
        "cancel_stream",
        [
            ("cancel_stream.basic", "the server answers with EndOfStream(CANCELLED)", m.CancelStream(1)),
        ],
    ),
    (
        "remove_request",
        [
            ("remove_request.basic", "forget a finished job", m.RemoveRequest(13, JOB_B)),
        ],
    ),
    (
        "signal_request",
        [
            ("signal_request.usr1", "send SIGUSR1 (10) to the job's command; the job goes on",
             m.SignalRequest(14, JOB_A, 10)),
        ],
    ),
    (
        "start_response",
        [
            ("start_response.basic", "the new job's id", m.StartResponse(1, JOB_A)),
        ],
    ),
    (
        "status_response",
        [
            ("status_response.running", "a running job with live usage", m.StatusResponse(7, _status())),
            ("status_response.exited", "a job that exited with code 0", m.StatusResponse(7, EXITED)),
            ("status_response.named_labelled", "a running job with a name and two labels",
             m.StatusResponse(8, _status(name="web-1", labels=(("app", "web"), ("tier", "front"))))),
            ("status_response.signaled", "killed by SIGKILL (9) that nobody asked for; exit_code -1",
             m.StatusResponse(7, _ended(m.JobState.SIGNALED, signal=9))),
            ("status_response.stopped", "stopped by bob's request; it died of SIGTERM (15)",
             m.StatusResponse(7, _ended(m.JobState.STOPPED, signal=15, stopped_by="bob"))),
            ("status_response.failed", "the command was not found: exit_code 127 and an error text",
             m.StatusResponse(7, _ended(
                 m.JobState.FAILED, started_at=0, exit_code=127, argv=("no-such-command",),
                 error="no-such-command: command not found", usage=m.JobUsage(), output_bytes=0))),
            ("status_response.oom", "killed by the OOM killer at its 64 MiB limit",
             m.StatusResponse(7, _ended(
                 m.JobState.OOM, signal=9, error="killed by the OOM killer at the memory limit",
                 limits=Limits(memory_bytes=64 << 20, pids=1024)))),
            ("status_response.timeout", "stopped at its 30 s timeout",
             m.StatusResponse(7, _ended(
                 m.JobState.TIMEOUT, signal=15, stopped_by="timeout", error="ran past its timeout of 30 s",
                 limits=Limits(pids=1024, timeout_ms=30_000)))),
            ("status_response.extremes", "starting; i32 minimum exit code, u64 maxima, host network, non-ASCII",
             m.StatusResponse(U32_MAX, m.JobStatus(
                 job_id=JOB_MAX,
                 owner="Zoë Ångström",
                 argv=("printf", "%s", "naïve ☃ 😀"),
                 state=m.JobState.STARTING,
                 exit_code=I32_MIN,
                 signal=255,
                 created_at=U64_MAX,
                 started_at=U64_MAX,
                 ended_at=U64_MAX,
                 error="",
                 stopped_by="",
                 limits=Limits(),
                 usage=m.JobUsage(U64_MAX, U64_MAX, U64_MAX, U64_MAX, U32_MAX),
                 output_bytes=U64_MAX,
                 workdir="/tmp/ü",
                 user="",
                 network=m.Network.HOST,
                 uid=U32_MAX,
             ))),
            ("status_response.abridged", "a status cut to fit the client's frame: abridged = true",
             m.StatusResponse(7, m.abridge(_status(argv=("sh", "-c", "x" * 300))))),
        ],
    ),
    (
        "list_response",
        [
            ("list_response.empty", "no jobs: the u32 count 0, then more = false", m.ListResponse(8, ())),
            ("list_response.more", "one job, and more after it: ask again after this job",
             m.ListResponse(9, (EXITED,), more=True)),
            ("list_response.two_jobs", "a running job and a lost one with an empty argv, i32 maximum exit code and a uid of its own",
             m.ListResponse(8, (
                 _status(),
                 _ended(m.JobState.LOST, job_id=JOB_B, owner="bob", argv=(), exit_code=I32_MAX,
                        usage=m.JobUsage(), output_bytes=0, user="", uid=65519),
             ))),
        ],
    ),
    (
        "ok_response",
        [
            ("ok_response.basic", "e.g. the answer to a FollowRequest: the stream is open", m.OkResponse(10)),
        ],
    ),
    (
        "error_response",
        [
            ("error_response.not_found", "a missing job and another identity's job answer alike",
             m.ErrorResponse(7, int(ErrorCode.NOT_FOUND), "no job 0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0")),
            ("error_response.utf8", "a message with non-ASCII text",
             m.ErrorResponse(2, int(ErrorCode.BAD_REQUEST), "bad environment variable name 'ÄÖ='")),
        ],
    ),
    (
        "output",
        [
            ("output.stdout", "six bytes of stdout at the start of the output", m.Output(1, 1, 0, b"hello\n")),
            ("output.stderr", "stderr right after them", m.Output(1, 2, 6, b"oops\n")),
            ("output.empty", "no data at all: the frame is its 13-byte head", m.Output(3, 1, 42, b"")),
            ("output.binary", "NUL, 0xff and invalid UTF-8 are plain data", m.Output(2, 1, 7, b"\x00\xff\x00\xfe\xc3\x28\xff")),
            ("output.max_values", "largest stream id and offset", m.Output(U32_MAX, 2, U64_MAX, b"z")),
        ],
    ),
    (
        "gap",
        [
            ("gap.basic", "1000 bytes from offset 1 GiB were dropped by retention", m.Gap(1, 1 << 30, 1000)),
            ("gap.max_values", "largest stream id, offset and length", m.Gap(U32_MAX, U64_MAX, U64_MAX)),
        ],
    ),
    (
        "end_of_stream",
        [
            ("end_of_stream.job_ended", "every byte sent and the job is final", m.EndOfStream(1, m.EndReason.JOB_ENDED, EXITED)),
            ("end_of_stream.caught_up", "a non-follow read reached the end of the current output",
             m.EndOfStream(2, m.EndReason.CAUGHT_UP, _status())),
            ("end_of_stream.cancelled", "the client sent CancelStream", m.EndOfStream(3, m.EndReason.CANCELLED, _status())),
            ("end_of_stream.removed", "the job was removed while followed",
             m.EndOfStream(U32_MAX, m.EndReason.REMOVED, EXITED)),
            ("end_of_stream.server_error", "the server failed serving the stream; resume with a new follow",
             m.EndOfStream(4, m.EndReason.SERVER_ERROR, _status())),
            ("end_of_stream.abridged", "a final status abridged to fit a 16 KiB client frame",
             m.EndOfStream(5, m.EndReason.JOB_ENDED, m.abridge(_ended(m.JobState.EXITED, exit_code=0, argv=tuple(f"arg{i}" for i in range(20)))))),
        ],
    ),
    (
        "time_mark",
        [
            ("time_mark.first", "the output from offset 0 on was read 2.5 ms after T0", m.TimeMark(1, 0, T0 + 2_500)),
            ("time_mark.max_values", "largest stream id, offset and time", m.TimeMark(U32_MAX, U64_MAX, U64_MAX)),
        ],
    ),
]


def to_json(value: Any) -> Any:
    """
    The JSON description of a message or of one of its field values.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, enum.IntEnum):
        return int(value)
    if isinstance(value, (int, str)):
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, tuple):
        return [to_json(item) for item in value]
    if dataclasses.is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    raise TypeError(f"no JSON form for {value!r}")


def render_vector(vector: Vector) -> dict[str, Any]:
    """
    The JSON of one vector: in an earlier version's layout, with its
    C{version} and without the fields that version lacks.
    """
    name, description, message = vector[:3]
    fields = to_json(message)
    described: dict[str, Any] = {"name": name, "description": description}
    if len(vector) == 4:
        version = vector[3]
        omitted = EARLIER_LAYOUTS[(version, type(message))]
        for field in omitted:
            if fields.pop(field) != to_json(getattr(type(message), field)):
                raise ValueError(f"{name}: version {version} has no {field}; leave it at its default")
        described["version"] = version
    else:
        version = m.PROTOCOL_VERSION
    described["fields"] = fields
    described["frame"] = encode_message(message, version).hex()
    return described


def render(stem: str, vectors: list[Vector]) -> str:
    classes = {type(vector[2]) for vector in vectors}
    if len(classes) != 1:
        raise ValueError(f"{stem}: one message type per file")
    cls = classes.pop()
    document = {
        "message": cls.__name__,
        "type": cls.TYPE,
        "vectors": [render_vector(vector) for vector in vectors],
    }
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="compare the files with the implementation; write nothing")
    mode.add_argument("--force", action="store_true", help="overwrite existing files (this changes the reference)")
    options = parser.parse_args(argv)

    names = [vector[0] for _, vectors in VECTORS for vector in vectors]
    if len(names) != len(set(names)):
        raise SystemExit("vector names must be unique")
    VECTOR_DIR.mkdir(exist_ok=True)
    differ = 0
    for stem, vectors in VECTORS:
        path = VECTOR_DIR / f"{stem}.json"
        text = render(stem, vectors)
        exists = path.exists()
        current = path.read_text(encoding="utf-8") if exists else None
        if current == text:
            continue
        if options.check or (exists and not options.force):
            differ += 1
            print(f"{path.relative_to(HERE.parent)}: {'differs' if exists else 'missing'}", file=sys.stderr)
            continue
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(HERE.parent)}")
    if differ and not options.check:
        print("existing vectors are the reference; rerun with --force only for a deliberate protocol change",
              file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
