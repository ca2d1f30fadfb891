"""
C{jobcli}: the command-line client.

Exit codes: C{run}, C{wait} and C{logs -f} exit with the job's own code
(128+N when signal N ended it, 127 command not found, 126 not executable)
and 125 for an error of jobcli itself (a usage error of C{run} included);
every other command exits 0 on success, 1 with a one-line message on
stderr on error, and 2 for a usage error (C{logs --since} in the future
or unparsable is one, with C{-f} too: no job's code is involved yet).
With several servers (C{--server a,b}) jobcli exits with the highest code
of them all.

C{run}, C{wait} and C{logs -f} wait as long as the job runs, however
quiet it is (like C{ssh} and C{docker logs -f}); a server that vanished is
noticed by keep-alive within twice C{--keepalive} seconds (default 30).

Which server and credentials are used: L{jobworker.clientside.config}
(C{--server}, the environment, C{~/.config/jobworker/config.toml});
C{jobcli config} shows the choice and why.

This module and what it imports stay clear of Twisted, so a one-shot
command starts fast (see L{jobworker.blocking}).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from jobworker import __version__
from jobworker.blocking import BlockingClient, ConnectionFailed, parse_address
from jobworker.clientside.config import ClientConfigError, Target, load_client_config, resolve_targets
from jobworker.errors import ErrorCode, JobworkerError
from jobworker.host.contract import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, EXIT_SETUP_FAILED
from jobworker.jobnames import NameError_, check_label_filter, check_labels, check_name
from jobworker.limits import LimitError, Limits, format_size, parse_count, parse_cpu, parse_duration, parse_size
from jobworker.protocol import messages as m
from jobworker.records import exit_status, status_to_dict

__all__ = ["main"]

# run/wait/logs -f: jobcli itself failed; the code of a job that could not
# start, as docker run does: in both the command did not run.
OWN_ERROR = EXIT_SETUP_FAILED
USAGE_ERROR = 2  # argparse's code, for every command but run
MAX_TEXT_BYTES = 65535  # one string on the wire (u16 length)
SHORT_ID = 12  # hex digits of a short id (as docker's)
# Connections open at once with --server a,b,c: enough to drive a rack in
# one go, few enough not to exhaust our descriptors or a shared bastion.
MAX_PARALLEL = 16
# A memory limit below this is taken for a forgotten unit (--memory 10):
# no job starts in 1 MiB, and the kernel would OOM-kill it at once.
MIN_MEMORY = 1 << 20


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """
    argparse with a per-command exit code for usage errors: C{run}'s is
    125 (jobcli's own failure, as its job's codes take the rest).
    """

    usage_exit = USAGE_ERROR

    def error(self, message: str) -> None:  # type: ignore[override]  # exits, as argparse's does
        self.print_usage(sys.stderr)
        self.exit(self.usage_exit, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="jobcli",
        description="Run and watch jobs on a jobworker server.",
        epilog="The server and credentials come from --server/--ca/--cert/--key, else JOBWORKER_SERVER, "
        "JOBWORKER_CA, JOBWORKER_CERT and JOBWORKER_KEY, else the client config file "
        "($XDG_CONFIG_HOME/jobworker/config.toml, or $JOBWORKER_CONFIG), else localhost:8443 and the "
        "development PKI in ./certs (admin). 'jobcli config' shows what would be used and why.",
    )
    parser.add_argument(
        "--server",
        default=None,
        metavar="NAME|ADDRESS[,...]",
        help="a server of the config file, HOST:PORT, or unix:PATH of a UNIX socket; several, comma-separated, run the command on each "
        "(env JOBWORKER_SERVER; default: the config file's default, else localhost:8443)",
    )
    parser.add_argument("--version", action="version", version=f"jobcli {__version__}")
    parser.add_argument("--ca", default=None, help="CA certificate (env JOBWORKER_CA; default: config file, else certs/ca.pem)")
    parser.add_argument("--cert", default=None, help="client certificate (env JOBWORKER_CERT; default: config file, else certs/admin.pem)")
    parser.add_argument("--key", default=None, help="client key (env JOBWORKER_KEY; default: config file, else certs/admin.key)")
    parser.add_argument(
        "--keepalive",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="ping a server silent for this long; give up when it does not answer within as long again "
        "(env JOBWORKER_KEEPALIVE; default 30; 0: never)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def json_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--json", action="store_true", help="machine-readable output")

    def job_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VAL", help="set an environment variable (repeatable)")
        sub.add_argument("--workdir", default="", help="working directory of the job (absolute; default /)")
        sub.add_argument("--user", default="", help="run as this user (admin only; default: the server's job user)")
        sub.add_argument("--network", choices=("none", "host"), default="none", help="none: loopback only (default); host: the host's network (admin only)")
        sub.add_argument("--cpu", type=_limit(parse_cpu), default=0, metavar="CORES", help="CPU limit in cores, e.g. 0.5 or 2")
        sub.add_argument("--memory", type=_limit(_parse_memory), default=0, metavar="BYTES", help="memory limit with a unit, e.g. 256M, 1G (K, M, G, T are binary; at least 1M)")
        sub.add_argument("--io-read-bps", type=_limit(lambda t: parse_size(t, what="io-read-bps")), default=0, metavar="BYTES", help="disk read bandwidth per second, e.g. 10M")
        sub.add_argument("--io-write-bps", type=_limit(lambda t: parse_size(t, what="io-write-bps")), default=0, metavar="BYTES", help="disk write bandwidth per second, e.g. 5M")
        sub.add_argument("--pids", type=_limit(parse_count), default=0, metavar="N", help="most processes and threads at once")
        sub.add_argument("--timeout", type=_limit(parse_duration), default=0, metavar="DURATION", help="stop the job after this long, e.g. 30s, 5m")
        sub.add_argument("--name", type=_job_name, default=None, metavar="NAME",
                         help="a name for the job, unique among your jobs not removed; usable wherever an id is "
                         "(letters, digits, _ . -; at most 128 bytes)")
        sub.add_argument("-l", "--label", action="append", default=[], type=_label, metavar="KEY=VALUE",
                         help="a label (repeatable; at most 32, 4 KiB in all); list --label filters on them")
        sub.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    start = commands.add_parser("start", help="start a job; print its id")
    json_option(start)
    job_options(start)
    run = commands.add_parser("run", help="start a job, stream its output, exit with its code")
    run.usage_exit = OWN_ERROR
    run.add_argument("-v", "--verbose", action="store_true", help="print the job's id on stderr first (also when stderr is a terminal)")
    job_options(run)

    stop = commands.add_parser("stop", help="stop jobs: SIGTERM, then SIGKILL after the grace period; wait until they ended")
    group = stop.add_mutually_exclusive_group()
    group.add_argument("--grace", type=_seconds, default=10.0, metavar="SECONDS", help="seconds between SIGTERM and SIGKILL (default 10)")
    group.add_argument("--force", action="store_true", help="SIGKILL at once")
    stop.add_argument("--no-wait", action="store_true", help="return once the stop has begun, without waiting for the end")
    json_option(stop)
    stop.add_argument("job_ids", nargs="+", metavar="ID")

    kill = commands.add_parser("kill", help="send one signal to a running job (default KILL: a forced stop)")
    kill.add_argument("-s", "--signal", type=_signal_number, default=signal.SIGKILL, metavar="SIGNAL",
                      help="HUP, INT, QUIT, USR1, USR2, TERM (sent to the command, the job goes on) or KILL (stops it); name or number")
    json_option(kill)
    kill.add_argument("job_ids", nargs="+", metavar="ID")

    status = commands.add_parser("status", help="show a job's status")
    json_option(status)
    status.add_argument("job_id", metavar="ID")

    logs = commands.add_parser("logs", help="print a job's output from its first byte")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends; exit with its code")
    where = logs.add_mutually_exclusive_group()
    where.add_argument(
        "--since-offset", type=_offset, default=0, metavar="N",
        help="start at byte offset N of the output, both streams counted together (jobcli status shows the end offset)",
    )
    where.add_argument("-n", "--tail", type=_lines, default=None, metavar="N", help="only the last N lines (of the streams shown)")
    logs.add_argument(
        "--since", type=_since, default=None, metavar="DURATION|TIME",
        help="only output the server read from this time on: a duration back from now (10m, 1h30m) or a time "
        "(2026-12-02T10:00:00Z, 2026-12-02 10:00; local time without a zone)",
    )
    logs.add_argument("-t", "--timestamps", action="store_true",
                      help="prefix each line with the time the server read its first byte (RFC 3339, UTC)")
    streams = logs.add_mutually_exclusive_group()
    streams.add_argument("--stdout", action="store_true", help="only the job's stdout")
    streams.add_argument("--stderr", action="store_true", help="only the job's stderr")
    logs.add_argument("job_id", metavar="ID")

    wait = commands.add_parser("wait", help="wait for a job to end; exit with its code")
    json_option(wait)
    wait.add_argument("job_id", metavar="ID")

    listing = commands.add_parser("list", help="list the jobs you may see, newest first")
    json_option(listing)
    listing.add_argument("-q", "--quiet", action="store_true", help="print job ids only")
    listing.add_argument("--no-trunc", action="store_true", help="whole ids and commands")
    listing.add_argument(
        "--state",
        action="append",
        default=[],
        type=_states,
        metavar="STATE[,STATE...]",
        help="only jobs in these states (" + ", ".join(state.label for state in m.JobState) + "; repeatable)",
    )
    listing.add_argument("--owner", default="", metavar="NAME", help="only jobs of this owner (certificate CN)")
    listing.add_argument("--name", type=_job_name, default=None, metavar="NAME", help="only the job of this name")
    listing.add_argument("-l", "--label", action="append", default=[], type=_label_filter, metavar="KEY[=VALUE]",
                         help="only jobs with this label (and value); repeatable, all must match")

    remove = commands.add_parser("rm", help="forget finished jobs and delete their output")
    remove.add_argument("-f", "--force", action="store_true", help="stop a job that still runs (SIGKILL) first")
    json_option(remove)
    remove.add_argument("job_ids", nargs="+", metavar="ID")

    whoami = commands.add_parser("whoami", help="show the identity and role the server sees")
    json_option(whoami)

    config = commands.add_parser("config", help="show which server and credentials would be used, and why")
    json_option(config)

    completion = commands.add_parser("completion", help="print a shell completion script (bash or zsh)")
    completion.add_argument("shell", choices=("bash", "zsh"))
    parser.set_defaults(_subcommands=commands.choices)
    return parser


def _limit(parse: Callable[[str], int]) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            return parse(text)
        except LimitError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _parse_memory(text: str) -> int:
    """
    A memory limit: a size with a unit.  A bare number is bytes (as for
    docker, systemd and the kernel), and one below L{MIN_MEMORY} is refused
    as a forgotten unit rather than started to be OOM-killed at once.
    """
    value = parse_size(text, what="memory")
    if value < MIN_MEMORY:
        raise LimitError(f"memory: {text!r} is {value} bytes, less than 1M: give a unit, e.g. {text.strip()}M")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= 4_000_000:  # the wire's grace is a u32 of milliseconds
        raise argparse.ArgumentTypeError(f"{text!r}: must be between 0 and 4000000")
    return value


def _signal_number(text: str) -> int:
    name = text.strip().upper()
    try:
        number = int(name)
    except ValueError:
        try:
            number = signal.Signals["SIG" + name.removeprefix("SIG")].value
        except KeyError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a signal name or number") from None
    if number != signal.SIGKILL and number not in m.SIGNALS_SENT:
        names = ", ".join(sorted(signal.Signals(n).name[3:] for n in (*m.SIGNALS_SENT, signal.SIGKILL)))
        raise argparse.ArgumentTypeError(f"{text!r}: a job can be sent only {names}")
    return number


def _offset(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte offset") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _lines(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of lines") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _job_name(text: str) -> str:
    try:
        name = check_name(text)
    except NameError_ as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not name:
        raise argparse.ArgumentTypeError("a job name must not be empty")
    return name


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text[:60]!r}: expected KEY=VALUE")
    try:
        check_labels([(key, value)])
    except NameError_ as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return key, value


def _label_filter(text: str) -> str:
    try:
        check_label_filter(text)
    except NameError_ as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_since(text: str, now: float) -> float:
    """
    A C{--since} value as seconds since the epoch: a duration back from
    C{now} (C{10m}, C{1h30m}, C{90}: seconds) or a time, RFC 3339 or ISO
    8601 (C{2026-12-02T10:00:00Z}, C{2026-12-02 10:00:00+01:00},
    C{2026-12-02}); a time without a zone is local time, as for docker.

    @raise ValueError: neither, or a time after C{now}.
    """
    import datetime

    stripped = text.strip()
    try:
        return now - parse_duration(stripped) / 1000
    except LimitError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(stripped.replace("z", "Z"))
    except ValueError:
        raise ValueError(
            f"{text[:60]!r} is neither a duration (10m, 1h30m) nor a time (2026-12-02T10:00:00Z)"
        ) from None
    when = moment.timestamp()  # a naive time is local time
    if when > now:
        raise ValueError(f"{text[:60]!r} is in the future: no output was read then yet")
    if when <= 0:
        raise ValueError(f"{text[:60]!r} is before 1970")
    return when


def _since(text: str) -> float:
    try:
        return parse_since(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_timestamp(microseconds: int | None) -> str:
    """
    An output time as C{jobcli logs -t} prints it: RFC 3339 in UTC with
    microseconds (C{2026-12-02T10:00:00.123456Z}); C{-} when unknown.
    """
    if microseconds is None:
        return "-"
    seconds, micros = divmod(microseconds, 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


class _Timestamper:
    """
    Puts the time the server read each line's first byte in front of the
    line (C{jobcli logs -t}), from the stream's time marks.  Each stream
    (stdout, stderr) has its own line starts; the time of a byte is that of
    the last mark at or before its offset.
    """

    def __init__(self) -> None:
        self._marks: list[tuple[int, int]] = []  # (offset, time), ascending, not yet passed
        self._time: int | None = None  # the mark in force
        self._line_start = {1: True, 2: True}

    def mark(self, offset: int, when: int) -> None:
        self._marks.append((offset, when))

    def _time_at(self, offset: int) -> int | None:
        marks = self._marks
        while marks and marks[0][0] <= offset:
            self._time = marks.pop(0)[1]
        return self._time

    def stamp(self, fd: int, offset: int, data: bytes | memoryview) -> bytes:
        data = bytes(data)
        if not data:
            return data
        pieces = []
        at = 0
        while at < len(data):
            if self._line_start[fd]:
                pieces.append(format_timestamp(self._time_at(offset + at)).encode() + b" ")
            newline = data.find(b"\n", at)
            end = len(data) if newline < 0 else newline + 1
            pieces.append(data[at:end])
            self._line_start[fd] = newline >= 0
            at = end
        # Marks of bytes passed go, so the list stays as short as a chunk's.
        self._time_at(offset + len(data) - 1)
        return b"".join(pieces)


def _states(text: str) -> list[m.JobState]:
    labels = {state.label: state for state in m.JobState}
    states = []
    for item in text.split(","):
        state = labels.get(item.strip().lower())
        if state is None:
            raise argparse.ArgumentTypeError(f"{item!r} is not a job state ({', '.join(labels)})")
        states.append(state)
    return states


def _keepalive(args: argparse.Namespace) -> float:
    if args.keepalive is not None:
        seconds: float = args.keepalive
        return seconds
    text = os.environ.get("JOBWORKER_KEEPALIVE") or "30"
    try:
        return _seconds(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"JOBWORKER_KEEPALIVE: {exc}") from None


def _targets(args: argparse.Namespace) -> list[Target]:
    try:
        config = load_client_config()
        return resolve_targets(config, server=args.server, ca=args.ca, cert=args.cert, key=args.key)
    except ClientConfigError as exc:
        raise UsageError(str(exc)) from None


def _connect(args: argparse.Namespace, target: Target) -> BlockingClient:
    from jobworker.blocking.tls import ClientTLSError, client_ssl_context

    try:
        address = parse_address(target.address.value)
    except ValueError:
        raise UsageError(
            f"{target.address.value!r} ({target.address.source}) is not a server of the config file "
            "nor an address (HOST[:PORT], [IPv6]:PORT)"
        ) from None
    try:
        context = client_ssl_context(target.ca.value, target.cert.value, target.key.value)
    except ClientTLSError as exc:
        raise UsageError(str(exc)) from None
    return BlockingClient(address, context, keepalive_interval=_keepalive(args))


def _start_options(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError(f"no command given (jobcli {args.command} -- CMD [ARG...])")
    env = []
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"-e {item!r}: expected KEY=VALUE")
        env.append((key, value))
    limits = Limits(
        cpu_millicores=args.cpu,
        memory_bytes=args.memory,
        io_read_bps=args.io_read_bps,
        io_write_bps=args.io_write_bps,
        pids=args.pids,
        timeout_ms=args.timeout,
    )
    for item in [*argv, *(k for k, _ in env), *(v for _, v in env), args.workdir]:
        size = len(item.encode("utf-8", "surrogateescape"))
        if size > MAX_TEXT_BYTES:
            raise UsageError(f"an argument or environment string of {size} bytes is longer than the protocol's {MAX_TEXT_BYTES}")
    network = m.Network.HOST if args.network == "host" else m.Network.NONE
    labels = tuple(args.label)
    try:
        check_labels(labels)
    except NameError_ as exc:
        raise UsageError(str(exc)) from None
    return argv, {
        "env": tuple(env),
        "workdir": args.workdir,
        "user": args.user,
        "network": network,
        "limits": limits,
        "name": args.name or "",
        "labels": labels,
    }


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Console:
    """
    Where a command's output goes: straight to our stdout and stderr, or,
    with several servers, line by line with the server's name in front
    (C{lab: ...}, as C{pdsh} does), whole lines only, under one lock so the
    lines of two servers never mix.
    """

    def __init__(self, prefix: str | None = None, lock: threading.Lock | None = None) -> None:
        self.prefix = prefix.encode("utf-8", "replace") + b": " if prefix is not None else None
        self._lock = lock or threading.Lock()
        self._pending = {1: b"", 2: b""}

    def write(self, fd: int, data: bytes) -> None:
        if self.prefix is None:
            (sys.stdout if fd == 1 else sys.stderr).flush()
            _write_all(fd, data)
            return
        text = self._pending[fd] + data
        lines = text.split(b"\n")
        self._pending[fd] = lines.pop()
        if lines:
            self._emit(fd, lines)

    def _emit(self, fd: int, lines: list[bytes]) -> None:
        assert self.prefix is not None
        block = b"".join(self.prefix + line + b"\n" for line in lines)
        with self._lock:
            (sys.stdout if fd == 1 else sys.stderr).flush()
            _write_all(fd, block)

    def out(self, text: str) -> None:
        """
        A line (or lines) of our own on stdout.
        """
        self.write(1, (text + "\n").encode("utf-8", "surrogateescape"))

    def err(self, text: str) -> None:
        self.write(2, (text + "\n").encode("utf-8", "surrogateescape"))

    def flush(self) -> None:
        """
        The last line of each stream, even without its newline.
        """
        for fd in (1, 2):
            if self.prefix is not None and self._pending[fd]:
                rest, self._pending[fd] = self._pending[fd], b""
                self._emit(fd, [rest])


class _OutputWriter:
    """
    Writes a stream's output to our stdout and stderr, in order, without
    ever letting a reader that stops reading hold up the main thread.

    A reader of our output that stops reading (C{jobcli logs -f ID | less},
    paused) would block a write for as long as it likes, while the main
    thread must go on reading the connection and answering the server's
    keep-alive pings, so the server does not take a slow reader for a dead
    one.  So the main thread writes only what the output takes at once
    (see L{_Sink}) and hands the rest, and everything after it, to a thread
    of its own, started the first time a write would block.  Once that
    thread has written everything it was given, the main thread writes
    directly again.

    Writing in the main thread matters for speed: handing every 64 KiB
    frame to a thread cost jobcli about as much CPU again as receiving it
    (GIL hand-overs, a wake-up per frame, and each frame kept alive in
    freshly allocated memory until written: 0.6 s per GiB, half the
    client's CPU).

    Credit: L{write} returns the bytes written at once, to be granted right
    away; what the thread writes is granted through L{take_written} when it
    wakes the main thread.  What waits in the queue is therefore at most
    the stream's window.
    """

    WAKE_BYTES = 1 << 20

    def __init__(self, fds: Sequence[int] = (1, 2)) -> None:
        """
        @param fds: the descriptors that L{write} is given (stdout and
            stderr; others in tests).
        """
        self._sinks = {fd: _Sink(fd) for fd in fds}
        self._queue: queue.SimpleQueue[tuple[int, bytes | memoryview, int] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._written = 0
        # Items handed to the thread and not yet written: while any are,
        # everything goes through the thread, so the order is kept.
        self._outstanding = 0
        self.error: BaseException | None = None
        # One byte per write done: wakes the main thread to grant credit.
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_w, False)
        self._thread: threading.Thread | None = None

    @property
    def threaded(self) -> bool:
        """
        Whether a write has had to go to the thread (it is started then).
        """
        return self._thread is not None

    def write(self, fd: int, data: bytes, credit: int = 0) -> int:
        """
        Write C{data} to C{fd}, at once as far as it goes without blocking,
        the rest from the thread.

        @param credit: the stream bytes that C{data} stands for (0 for a
            note of ours).
        @return: how much of C{credit} was written now; the rest is
            reported by L{take_written} once the thread has written it.
        @raise OSError: a write failed (a broken pipe), now or in the
            thread before.
        """
        if self.error is not None:
            raise self.error
        with self._lock:
            direct = not self._outstanding
        done = 0
        if direct:
            done = self._sinks[fd].write_now(data)
            if done == len(data):
                return credit
        rest = memoryview(data)[done:] if done else data
        # Never more credit than the data stands for (logs -t writes more
        # bytes than the stream's: the time in front of each line).
        later = min(len(rest), credit)
        self._hand_over(fd, rest, later)
        return credit - later

    def _hand_over(self, fd: int, data: bytes | memoryview, credit: int) -> None:
        with self._lock:
            self._outstanding += 1
        self._queue.put((fd, data, credit))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jobcli-output", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fd, data, credit = item
            try:
                _write_all(fd, data)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc
                self._wake()
                return
            with self._lock:
                self._outstanding -= 1
                self._written += credit
                unsignalled = self._written
                idle = not self._outstanding
            # Credit goes back in batches of half the window anyway:
            # wake the main thread per MiB written, or when idle.
            if credit and (unsignalled >= self.WAKE_BYTES or idle):
                self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the main thread has wake-ups enough to read

    def take_written(self) -> int:
        """
        Bytes the thread wrote since the last call (main thread).

        @raise BaseException: what a write raised (a broken pipe).
        """
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass
        if self.error is not None:
            raise self.error
        with self._lock:
            written, self._written = self._written, 0
        return written

    def finish(self) -> None:
        """
        Wait until everything handed over is written; raise what a write
        raised.
        """
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        for sink in self._sinks.values():
            sink.close()
        os.close(self.wake_fd)
        os.close(self._wake_w)
        if self.error is not None:
            raise self.error


class _Sink:
    """
    One of our output descriptors, written without blocking where the kind
    of file allows it, without changing the descriptor's own flags.

    C{O_NONBLOCK} on our stdout itself would be wrong: the flag belongs to
    the open file description, which we share with the shell and the other
    processes writing there, and would stay set if we died.  Instead:

      - a pipe, FIFO or terminal is opened again (C{/proc/self/fd/N}), a
        description of our own to set C{O_NONBLOCK} on;
      - a stream socket is written with C{MSG_DONTWAIT};
      - a regular file, a block device or C{/dev/null} is written directly:
        no reader can hold those up;
      - anything else (or a reopening that fails: no C{/proc}, no
        permission, a FIFO without a reader) takes nothing at once, so all
        of it goes through the output thread, as before.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._reopened: int | None = None
        self._socket: socket.socket | None = None
        self._direct = False
        try:
            mode = os.fstat(fd)
        except OSError:
            return  # closed: the thread's write reports it
        kind = mode.st_mode
        if stat.S_ISREG(kind) or stat.S_ISBLK(kind) or (stat.S_ISCHR(kind) and _is_dev_null(mode)):
            self._direct = True
        elif stat.S_ISFIFO(kind) or (stat.S_ISCHR(kind) and os.isatty(fd)):
            try:
                self._reopened = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            except OSError:
                pass
        elif stat.S_ISSOCK(kind):
            try:
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                return
            if sock.type == socket.SOCK_STREAM:
                self._socket = sock
            else:
                sock.close()

    def write_now(self, data: bytes | memoryview) -> int:
        """
        Write what goes without waiting; how many bytes that was (0 when
        the output is full, or cannot be written without blocking).

        @raise OSError: the write failed (a broken pipe).
        """
        try:
            if self._direct:
                _write_all(self.fd, data)
                return len(data)
            if self._reopened is not None:
                return os.write(self._reopened, data)
            if self._socket is not None:
                return self._socket.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        return 0

    def close(self) -> None:
        if self._reopened is not None:
            os.close(self._reopened)
            self._reopened = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _is_dev_null(mode: os.stat_result) -> bool:
    """
    Whether C{mode} (a character device's) is that of C{/dev/null}.
    """
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(null.st_mode) and mode.st_rdev == null.st_rdev


def _stream(
    client: BlockingClient,
    job_id: uuid.UUID,
    offset: int,
    follow: bool,
    console: _Console,
    fds: frozenset[int] = frozenset((1, 2)),
    timestamps: bool = False,
    since: float | None = None,
) -> m.JobStatus:
    """
    Copy the job's output from C{offset} to our stdout and stderr (only the
    streams in C{fds}); return the status that ended the stream.

    @param timestamps: each line prefixed with the time the server read it.
    @param since: seconds since the epoch: only output read from then on.
    """
    status = None
    stamper = _Timestamper() if timestamps else None
    gaps = dropped = 0
    # Straight to our own stdout, never blocking the main thread, so a slow
    # reader of ours never stalls keep-alive (see _OutputWriter); with a
    # prefix, whole lines through the console, credit as they are handled.
    writer = _OutputWriter() if console.prefix is None else None
    stream_id: list[int] = []

    def written() -> None:
        assert writer is not None
        size = writer.take_written()
        if size and stream_id:
            client.grant(stream_id[0], size)

    def note(text: str) -> None:
        if writer is not None:
            writer.write(2, f"jobcli: {text}\n".encode())
        else:
            console.err(f"jobcli: {text}")

    if writer is not None:
        client.wake_on(writer.wake_fd, written)
    try:
        messages = client.follow(
            job_id, offset=offset, follow=follow, auto_credit=False, timestamps=timestamps, since=since
        )
        for message in messages:
            if not stream_id:
                stream_id.append(message.stream_id)
            if isinstance(message, m.Output):
                data = message.data
                if stamper is not None and message.fd in fds:
                    data = stamper.stamp(message.fd, message.offset, data)
                if message.fd not in fds:
                    client.grant(message.stream_id, len(message.data))
                elif writer is not None:
                    done = writer.write(message.fd, data, len(message.data))
                    if done:
                        client.grant(message.stream_id, done)
                else:
                    console.write(message.fd, data)
                    client.grant(message.stream_id, len(message.data))
            elif isinstance(message, m.TimeMark):
                if stamper is not None:
                    stamper.mark(message.offset, message.time)
            elif isinstance(message, m.Gap):
                # The first gap is reported when it happens; the rest in one
                # total at the end, so a long lagging follow does not flood.
                if not gaps:
                    note(
                        f"{message.length} bytes of output at offset {message.offset} "
                        "were not kept by the server (its retention limit, a full disk or damage; see jobcli status)"
                    )
                gaps += 1
                dropped += message.length
            else:
                status = message.status
    except KeyboardInterrupt:
        # Leave at once, even with a write held up by our reader.
        client.wake_on(None)
        raise
    except BaseException:
        # What arrived before the error is still written out.
        client.wake_on(None)
        try:
            if writer is not None:
                writer.finish()
            console.flush()
        except Exception:
            pass
        raise
    client.wake_on(None)
    if writer is not None:
        writer.finish()
    console.flush()
    if gaps > 1:
        console.err(f"jobcli: in all, {dropped} bytes of output in {gaps} gaps were not kept by the server")
    assert status is not None
    return status


def _tail_offset(client: BlockingClient, job_id: uuid.UUID, lines: int, fds: frozenset[int]) -> int:
    """
    The offset from which the output of C{fds} holds its last C{lines}
    lines, as C{tail -n} counts them (a last line without its newline is a
    line).  Reads back from the end in growing windows (64 KiB, times 4),
    so a short tail of a long log costs little.
    """
    end = client.status(job_id).output_bytes
    if lines == 0:
        return end
    window = 64 << 10
    while True:
        start = max(0, end - window)
        chunks = [
            (message.offset, message.data)
            for message in client.follow(job_id, offset=start, follow=False)
            if isinstance(message, m.Output) and message.fd in fds
        ]
        # Newlines from the end; the one that ends the output is no separator.
        wanted = lines
        if chunks and chunks[-1][1].endswith(b"\n"):
            wanted += 1
        for chunk_offset, data in reversed(chunks):
            position = len(data)
            while wanted:
                position = data.rfind(b"\n", 0, position)
                if position < 0:
                    break
                wanted -= 1
                if not wanted:
                    return chunk_offset + position + 1
        if start == 0:
            return 0
        window *= 4


# -- formatting ----------------------------------------------------------------------------


def _short(job_id: uuid.UUID) -> str:
    return job_id.hex[:SHORT_ID]


def _duration(seconds: float) -> str:
    """
    A duration as people read it: C{850ms}, C{4.2s}, C{3m05s}, C{2h03m}, C{3d04h}.
    """
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _human_size(value: int) -> str:
    """
    Bytes as people read them: C{10 B}, C{1.8 KiB}, C{256 MiB} (binary
    units, three significant digits at most).
    """
    if value < 1024:
        return f"{value} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024  # type: ignore[assignment]  # bytes become a float of units
        if value < 1024 or unit == "EiB":
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def _age(microseconds: int, now: float) -> str:
    if not microseconds:
        return "-"
    return _duration(max(0.0, now - microseconds / 1e6)) + " ago"


def _run_time(status: m.JobStatus, now: float) -> float | None:
    """
    Seconds the job ran (or runs so far); None when it never started.
    """
    if not status.started_at:
        return None
    end = status.ended_at / 1e6 if status.ended_at else now
    return max(0.0, end - status.started_at / 1e6)


def _format_time(microseconds: int, now: float) -> str:
    if not microseconds:
        return "-"
    local = time.localtime(microseconds / 1e6)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", local) + f".{microseconds // 1000 % 1000:03d} " + time.strftime("%z", local)
    return f"{stamp} ({_age(microseconds, now)})"


def _status_json(status: m.JobStatus) -> dict[str, Any]:
    """
    C{status} for C{--json}; an abridged one (cut to fit a frame) says so.
    """
    data = status_to_dict(status)
    if status.abridged:
        data["abridged"] = True
    return data


def _signal_name(number: int) -> str:
    """C{SIGTERM} for 15; the number itself for one Python does not name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _describe(status: m.JobStatus) -> str:
    now = time.time()
    lines = [
        ("id", str(status.job_id)),
        *([("name", status.name)] if status.name else []),
        ("owner", status.owner),
        ("command", " ".join(status.argv)),
        ("state", status.state.label),
    ]
    if status.exit_code >= 0:
        lines.append(("exit code", str(status.exit_code)))
    if status.signal:
        lines.append(("signal", _signal_name(status.signal)))
    if status.error:
        lines.append(("error", status.error))
    if status.stopped_by:
        lines.append(("stopped by", status.stopped_by))
    ran = _run_time(status, now)
    lines += [
        ("created", _format_time(status.created_at, now)),
        ("started", _format_time(status.started_at, now)),
        ("ended", _format_time(status.ended_at, now)),
        ("duration", "-" if ran is None else _duration(ran) + ("" if status.state.is_final else " so far")),
        # "" is the server's default: a uid of the job's own.
        ("user", status.user or "(dynamic)"),
        *([("uid", str(status.uid))] if status.uid != m.UID_UNKNOWN else []),
        ("workdir", status.workdir),
        ("network", status.network.name.lower()),
    ]
    if status.labels:
        lines.append(("labels", " ".join(f"{key}={value}" for key, value in status.labels)))
    limits = status.limits
    described = []
    if limits.cpu_millicores:
        described.append(f"cpu={limits.cpu_millicores / 1000:g}")
    if limits.memory_bytes:
        described.append(f"memory={format_size(limits.memory_bytes)}")
    if limits.io_read_bps:
        described.append(f"io-read={format_size(limits.io_read_bps)}/s")
    if limits.io_write_bps:
        described.append(f"io-write={format_size(limits.io_write_bps)}/s")
    if limits.pids:
        described.append(f"pids={limits.pids}")
    if limits.timeout_ms:
        described.append(f"timeout={_duration(limits.timeout_ms / 1000)}")
    lines.append(("limits", " ".join(described) or "none"))
    usage = status.usage
    lines.append(
        (
            "usage",
            f"cpu={_duration(usage.cpu_usec / 1e6)} memory-peak={_human_size(usage.memory_peak_bytes)} "
            f"io-read={_human_size(usage.io_read_bytes)} io-write={_human_size(usage.io_write_bytes)} pids-peak={usage.pids_peak}",
        )
    )
    lines.append(
        (
            "output",
            f"{_human_size(status.output_bytes)}; end offset {status.output_bytes} "
            f"(jobcli logs -f --since-offset {status.output_bytes} resumes there)",
        )
    )
    if status.abridged:
        lines.append(("note", "texts and command cut to fit the connection's frame size"))
    return "\n".join(f"{key + ':':<12}{value}" for key, value in lines)


def _end_note(status: m.JobStatus) -> str | None:
    """
    One line for a job that did not end by itself (as C{systemd-run --wait}
    says), or None.
    """
    short = _short(status.job_id)
    state = status.state
    if state is m.JobState.OOM:
        limit = f" of {format_size(status.limits.memory_bytes)}" if status.limits.memory_bytes else ""
        return f"job {short} was killed by the kernel: out of memory (its memory limit{limit})"
    if state is m.JobState.TIMEOUT:
        limit = f" of {_duration(status.limits.timeout_ms / 1000)}" if status.limits.timeout_ms else ""
        return f"job {short} was stopped: it ran past its timeout{limit}"
    if state is m.JobState.STOPPED:
        return f"job {short} was stopped" + (f" by {status.stopped_by}" if status.stopped_by else "")
    if state is m.JobState.LOST:
        return f"job {short} was lost: the server went down while it ran, its end is unknown"
    if state is m.JobState.FAILED and status.error:
        return status.error
    return None


def _ended(status: m.JobStatus, console: _Console) -> int:
    note = _end_note(status)
    if note:
        console.err(f"jobcli: {note}")
    return exit_status(status)


# -- commands ------------------------------------------------------------------------------


class _Command:
    """
    One command against one server: its arguments, where its output goes,
    and the connection (opened on first use).
    """

    def __init__(self, args: argparse.Namespace, target: Target, console: _Console) -> None:
        self.args = args
        self.target = target
        self.console = console
        self.results: list[Any] = []  # what --json prints, one per result
        self._client: BlockingClient | None = None

    @property
    def client(self) -> BlockingClient:
        if self._client is None:
            client = _connect(self.args, self.target)
            client.connect()
            self._client = client
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def job_ids(self, texts: Sequence[str]) -> list[uuid.UUID]:
        return self.client.resolve_job_ids(texts)


def _cmd_start(cmd: _Command) -> int:
    argv, options = _start_options(cmd.args)
    job_id = cmd.client.start(argv, **options)
    if cmd.args.json:
        cmd.results.append({"id": str(job_id)})
    else:
        cmd.console.out(str(job_id))
    return 0


def _cmd_run(cmd: _Command) -> int:
    args = cmd.args
    argv, options = _start_options(args)
    client = cmd.client
    job_id = client.start(argv, **options)
    if args.verbose or (cmd.console.prefix is None and sys.stderr.isatty()):
        cmd.console.err(f"jobcli: job {job_id} (jobcli logs -f {_short(job_id)} resumes if the connection drops)")
    if threading.current_thread() is not threading.main_thread():
        return _ended(_stream(client, job_id, 0, True, cmd.console), cmd.console)
    stopping: list[str] = []

    def interrupted(signum: int, frame: object) -> None:
        if stopping:
            if stopping[0] == "sent":
                raise KeyboardInterrupt
            # Still sending the stop: leave once it is sent, not before,
            # or the job would be left running after all.
            stopping.append("again")
            return
        stopping.append("sending")
        sys.stderr.write(f"jobcli: stopping job {job_id} (interrupt again to stop waiting; the stop goes on)\n")
        try:
            # The stop goes on a second connection: this one is mid-stream.
            with _connect(args, cmd.target) as other:
                try:
                    other.stop(job_id)
                except JobworkerError:
                    pass
        finally:
            stopping[0] = "sent"
        if len(stopping) > 1:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        status = _stream(client, job_id, 0, True, cmd.console)
    finally:
        signal.signal(signal.SIGINT, previous)
    return _ended(status, cmd.console)


def _cmd_stop(cmd: _Command) -> int:
    args = cmd.args
    client = cmd.client
    code = 0
    stopped = []
    for _text, job_id in _each_job(cmd, args.job_ids):
        if job_id is None:
            code = 1
            continue
        try:
            client.stop(job_id, grace=args.grace, force=args.force)
        except JobworkerError as exc:
            # As docker stop: a job that has ended is stopped already.
            if getattr(exc, "code", None) is not ErrorCode.JOB_FINISHED:
                cmd.console.err(f"jobcli: {exc}")
                code = 1
                continue
        stopped.append(job_id)
    for job_id in stopped:
        try:
            final = client.status(job_id) if args.no_wait else client.wait(job_id)
        except JobworkerError as exc:
            cmd.console.err(f"jobcli: {exc}")
            code = 1
            continue
        if args.json:
            cmd.results.append(_status_json(final))
    return code


def _cmd_kill(cmd: _Command) -> int:
    args = cmd.args
    client = cmd.client
    code = 0
    for _text, job_id in _each_job(cmd, args.job_ids):
        if job_id is None:
            code = 1
            continue
        try:
            if args.signal == signal.SIGKILL:
                # SIGKILL to the helper would orphan the command: it is the
                # cgroup-wide kill of a forced stop.
                client.stop(job_id, force=True)
            else:
                client.signal(job_id, args.signal)
        except ConnectionFailed:
            raise
        except JobworkerError as exc:
            cmd.console.err(f"jobcli: {exc}")
            code = 1
            continue
        if args.json:
            cmd.results.append({"id": str(job_id), "signal": args.signal})
    return code


def _each_job(cmd: _Command, texts: Sequence[str]) -> list[tuple[str, uuid.UUID | None]]:
    """
    Each id or prefix with its whole id, or None (and a line on stderr)
    when it resolves to none; commands on several jobs go on with the rest.
    """
    found: list[tuple[str, uuid.UUID | None]] = []
    for text in texts:
        try:
            found.append((text, cmd.client.resolve_job_id(text)))
        except ConnectionFailed:
            raise
        except JobworkerError as exc:
            cmd.console.err(f"jobcli: {exc}")
            found.append((text, None))
    return found


def _cmd_rm(cmd: _Command) -> int:
    args = cmd.args
    client = cmd.client
    code = 0
    for _text, job_id in _each_job(cmd, args.job_ids):
        if job_id is None:
            code = 1
            continue
        try:
            if args.force:
                try:
                    client.stop(job_id, force=True)
                except JobworkerError as exc:
                    if getattr(exc, "code", None) is not ErrorCode.JOB_FINISHED:
                        raise
                client.wait(job_id)
            client.remove(job_id)
        except ConnectionFailed:
            raise
        except JobworkerError as exc:
            message = str(exc)
            if getattr(exc, "code", None) is ErrorCode.JOB_RUNNING:
                message += " (stop it first, or use rm -f)"
            cmd.console.err(f"jobcli: {message}")
            code = 1
            continue
        if args.json:
            cmd.results.append({"id": str(job_id), "removed": True})
    return code


def _cmd_status(cmd: _Command) -> int:
    status = cmd.client.status(cmd.client.resolve_job_id(cmd.args.job_id))
    if cmd.args.json:
        cmd.results.append(_status_json(status))
    else:
        cmd.console.out(_describe(status))
    return 0


def _cmd_logs(cmd: _Command) -> int:
    args = cmd.args
    client = cmd.client
    job_id = client.resolve_job_id(args.job_id)
    fds = frozenset((1,)) if args.stdout else frozenset((2,)) if args.stderr else frozenset((1, 2))
    offset = args.since_offset
    if args.tail is not None:
        # With --since too, the server starts at the later of the two: the
        # last N lines of what was read since then.
        offset = _tail_offset(client, job_id, args.tail, fds)
    status = _stream(client, job_id, offset, args.follow, cmd.console, fds, args.timestamps, args.since)
    return _ended(status, cmd.console) if args.follow else 0


def _cmd_wait(cmd: _Command) -> int:
    status = cmd.client.wait(cmd.client.resolve_job_id(cmd.args.job_id))
    if cmd.args.json:
        cmd.results.append(_status_json(status))
    return _ended(status, cmd.console)


def _cmd_list(cmd: _Command) -> int:
    args = cmd.args
    # Every page first: a refusal is then one line on stderr, not a table
    # header with nothing under it.  The server pages oldest first.
    jobs = list(
        cmd.client.list(
            states=[state for group in args.state for state in group], owner=args.owner, name=args.name or "", labels=args.label
        )
    )
    jobs.sort(key=lambda job: (job.created_at, job.job_id.int), reverse=True)
    if args.json:
        cmd.results.extend(_status_json(job) for job in jobs)
        return 0
    ident: Callable[[m.JobStatus], str] = (
        (lambda job: str(job.job_id)) if args.no_trunc else (lambda job: _short(job.job_id))
    )
    if args.quiet:
        for job in jobs:
            cmd.console.out(ident(job))
        return 0
    width = 36 if args.no_trunc else SHORT_ID
    now = time.time()
    names = [job.name if args.no_trunc or len(job.name) <= 20 else job.name[:19] + "…" for job in jobs]
    name_width = max([4, *map(len, names)])
    rows = [
        f"{'ID':<{width}}  {'OWNER':<12}  {'STATE':<9}  {'EXIT':>4}  {'CREATED':<12}  {'DURATION':<9}  "
        f"{'NAME':<{name_width}}  COMMAND"
    ]
    for job, name in zip(jobs, names):
        code = str(exit_status(job)) if job.state.is_final else ""
        command = " ".join(job.argv) + (" …" if job.abridged else "")
        if not args.no_trunc and len(command) > 60:
            command = command[:59] + "…"
        ran = _run_time(job, now)
        owner = job.owner if args.no_trunc else f"{job.owner:<12.12}"
        rows.append(
            f"{ident(job):<{width}}  {owner:<12}  {job.state.label:<9}  {code:>4}  "
            f"{_age(job.created_at, now):<12}  {'-' if ran is None else _duration(ran):<9}  {name or '-':<{name_width}}  {command}"
        )
    cmd.console.out("\n".join(rows))
    return 0


def _cmd_whoami(cmd: _Command) -> int:
    hello = cmd.client.hello
    assert hello is not None
    version = getattr(hello, "server_version", "")
    if cmd.args.json:
        cmd.results.append(
            {
                "identity": hello.identity,
                "role": hello.role or None,
                "server_name": hello.server_name,
                "server_version": version or None,
                "protocol_version": hello.version,
            }
        )
    else:
        cmd.console.out(f"{hello.identity} ({hello.role or 'no role'}) on {hello.server_name}" + (f" ({version})" if version else ""))
    return 0


def _certificate_identity(path: str) -> dict[str, Any] | None:
    """
    The subject CN and OU (identity and role) and end of validity of a PEM
    certificate, read by the standard library's own decoder; None when it
    cannot be read.
    """
    decode = getattr(getattr(__import__("ssl"), "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        decoded = decode(path)
    except Exception:  # noqa: BLE001 - any unreadable file: nothing to show
        return None
    subject = {key: value for rdn in decoded.get("subject", ()) for key, value in rdn}
    return {
        "identity": subject.get("commonName"),
        "role": subject.get("organizationalUnitName"),
        "not_after": decoded.get("notAfter"),
    }


def _cmd_config(cmd: _Command) -> int:
    target = cmd.target
    from jobworker.clientside.config import config_path

    path = config_path()
    found = os.path.isfile(path)
    identity = _certificate_identity(target.cert.value)
    if cmd.args.json:
        cmd.results.append(
            {
                "config_file": path,
                "config_file_found": found,
                "server": target.name,
                "configured": target.configured,
                **{item: {"value": getattr(target, item).value, "source": getattr(target, item).source} for item in ("address", "ca", "cert", "key")},
                "certificate": identity,
            }
        )
        return 0
    lines = [
        f"config file: {path}" + ("" if found else " (not found)"),
        f"server:      {target.name}" + (" (from the config file)" if target.configured else ""),
    ]
    for item in ("address", "ca", "cert", "key"):
        setting = getattr(target, item)
        lines.append(f"{item + ':':<13}{setting.value}  [{setting.source}]")
    if identity is None:
        lines.append("identity:    (the certificate cannot be read)")
    else:
        lines.append(
            f"identity:    {identity['identity']} (role {identity['role'] or 'none'}), certificate valid until {identity['not_after']}"
        )
    cmd.console.out("\n".join(lines))
    return 0


def _cmd_completion(cmd: _Command) -> int:
    from jobworker.cli.completion import completion_script

    cmd.console.out(completion_script(_parser(), cmd.args.shell))
    return 0


COMMANDS: dict[str, Callable[[_Command], int]] = {
    "start": _cmd_start,
    "run": _cmd_run,
    "stop": _cmd_stop,
    "rm": _cmd_rm,
    "kill": _cmd_kill,
    "status": _cmd_status,
    "logs": _cmd_logs,
    "wait": _cmd_wait,
    "list": _cmd_list,
    "whoami": _cmd_whoami,
    "config": _cmd_config,
    "completion": _cmd_completion,
}
# Commands that run on every server of --server a,b,c at once.
MULTI_HOST = {"run", "start", "status", "list", "stop"}
# Commands whose --json prints a list (several results) on one server.
JSON_LISTS = {"list", "stop", "rm", "kill"}


def _own_error(args: argparse.Namespace) -> int:
    return OWN_ERROR if args.command in ("run", "wait") or (args.command == "logs" and args.follow) else 1


def _execute(cmd: _Command) -> tuple[int, str | None]:
    """
    Run one command on one server; its exit code and, on error, the
    one-line message (already written to the console).
    """
    args = cmd.args
    try:
        return COMMANDS[args.command](cmd), None
    except (UsageError, JobworkerError) as exc:
        message = str(exc)
        cmd.console.flush()
        cmd.console.err(f"jobcli: {message}")
        if isinstance(exc, JobworkerError) and args.command == "run":
            code = getattr(exc, "code", None)
            if code is ErrorCode.COMMAND_NOT_FOUND:
                return EXIT_NOT_FOUND, message
            if code is ErrorCode.COMMAND_NOT_EXECUTABLE:
                return EXIT_NOT_EXECUTABLE, message
        return _own_error(args), message
    except (ValueError, UnicodeError) as exc:
        # A message the protocol cannot carry (for instance text that is not
        # valid UTF-8): say so in one line, never with a traceback.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        cmd.console.err(f"jobcli: {first[:300]}")
        return _own_error(args), first[:300]
    finally:
        cmd.close()


def _print_json(args: argparse.Namespace, results: list[Any]) -> None:
    if args.command in JSON_LISTS:
        print(json.dumps(results, indent=2))
    elif results:
        print(json.dumps(results[0], indent=2))


def _on_many(args: argparse.Namespace, targets: list[Target]) -> int:
    """
    The command on every server at once (at most L{MAX_PARALLEL}
    connections), each output line prefixed by the server's name; the
    highest exit code of all.  With C{--json}, one JSON object per server
    and line: C{{"server": NAME, "exit_code": N, "result": ..., "error": ...}}.
    """
    from concurrent.futures import ThreadPoolExecutor

    lock = threading.Lock()
    as_json = getattr(args, "json", False)

    def one(target: Target) -> int:
        console = _Console(target.name, lock)
        cmd = _Command(args, target, console)
        code, error = _execute(cmd)
        console.flush()
        if as_json:
            result: Any = cmd.results if args.command in JSON_LISTS else (cmd.results[0] if cmd.results else None)
            line = json.dumps({"server": target.name, "exit_code": code, "result": result, "error": error})
            with lock:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        return code

    pool = ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(targets)), thread_name_prefix="jobcli-host")
    try:
        codes = list(pool.map(one, targets))
    except KeyboardInterrupt:
        # The workers block in reads that a signal does not end: leave
        # without joining them (the jobs go on running).
        sys.stdout.flush()
        os._exit(130)
    pool.shutdown()
    return max(codes)


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(argv)
    if extra:
        # Reported by the command's own parser, with its exit code (125 for run).
        args._subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("start", "run"):
        try:
            # Each label was checked alone; together they have caps too.
            check_labels(args.label)
        except NameError_ as exc:
            args._subcommands[args.command].error(f"argument -l/--label: {exc}")
    try:
        try:
            targets = _targets(args)
        except UsageError as exc:
            sys.stderr.write(f"jobcli: {exc}\n")
            return _own_error(args)
        if len(targets) > 1:
            if args.command not in MULTI_HOST:
                sys.stderr.write(
                    f"jobcli: {args.command} works on one server at a time; several at once: {', '.join(sorted(MULTI_HOST))}\n"
                )
                return _own_error(args)
            return _on_many(args, targets)
        cmd = _Command(args, targets[0], _Console())
        code, _ = _execute(cmd)
        if getattr(args, "json", False) and (code == 0 or cmd.results):
            _print_json(args, cmd.results)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (jobcli logs ID | head).
        sys.stdout = None
        return 141


if __name__ == "__main__":
    sys.exit(main())
