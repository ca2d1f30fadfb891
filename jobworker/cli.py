"""
C{jobcli}: the command-line client.

Exit codes: C{run}, C{wait} and C{logs -f} exit with the job's own code
(128+N when signal N ended it, 127 command not found, 126 not executable)
and 125 for an error of jobcli itself; every other command exits 0 on
success and 1 with a one-line message on stderr on error.

C{run}, C{wait} and C{logs -f} wait as long as the job runs, however
quiet it is (like C{ssh} and C{docker logs -f}); a server that vanished is
noticed by keep-alive within twice C{--keepalive} seconds (default 30).

This module and what it imports stay clear of Twisted, so a one-shot
command starts fast (see L{jobworker.blocking}).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import sys
import threading
import time
import uuid
from typing import Any, Callable, Sequence

from jobworker import __version__
from jobworker.blocking import BlockingClient, ConnectionFailed, parse_address
from jobworker.errors import JobworkerError
from jobworker.limits import LimitError, Limits, format_size, parse_count, parse_cpu, parse_duration, parse_size
from jobworker.protocol import messages as m
from jobworker.records import exit_status, status_to_dict

__all__ = ["main"]

OWN_ERROR = 125  # run/wait/logs -f: jobcli itself failed
MAX_TEXT_BYTES = 65535  # one string on the wire (u16 length)


class UsageError(Exception):
    pass


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jobcli",
        description="Run and watch jobs on a jobworker server.",
        epilog="Credentials default to the development PKI in ./certs (admin); set "
        "JOBWORKER_CA, JOBWORKER_CERT and JOBWORKER_KEY to use your own.",
    )
    parser.add_argument(
        "--server",
        default=_env("JOBWORKER_SERVER", "localhost:8443"),
        help="HOST:PORT of the server, or unix:PATH of its UNIX socket (env JOBWORKER_SERVER; default localhost:8443)",
    )
    parser.add_argument("--version", action="version", version=f"jobcli {__version__}")
    parser.add_argument("--ca", default=_env("JOBWORKER_CA", "certs/ca.pem"), help="CA certificate (env JOBWORKER_CA; default certs/ca.pem)")
    parser.add_argument("--cert", default=_env("JOBWORKER_CERT", "certs/admin.pem"), help="client certificate (env JOBWORKER_CERT; default certs/admin.pem)")
    parser.add_argument("--key", default=_env("JOBWORKER_KEY", "certs/admin.key"), help="client key (env JOBWORKER_KEY; default certs/admin.key)")
    parser.add_argument(
        "--keepalive",
        type=_seconds,
        # A string: argparse converts it with type=, so a bad environment
        # value is a usage error, not a traceback.
        default=_env("JOBWORKER_KEEPALIVE", "30"),
        metavar="SECONDS",
        help="ping a server silent for this long; give up when it does not answer within as long again "
        "(env JOBWORKER_KEEPALIVE; default 30; 0: never)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def job_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VAL", help="set an environment variable (repeatable)")
        sub.add_argument("--workdir", default="", help="working directory of the job (absolute; default /)")
        sub.add_argument("--user", default="", help="run as this user (admin only; default: the server's job user)")
        sub.add_argument("--network", choices=("none", "host"), default="none", help="none: loopback only (default); host: the host's network (admin only)")
        sub.add_argument("--cpu", type=_limit(parse_cpu), default=0, metavar="CORES", help="CPU limit in cores, e.g. 0.5 or 2")
        sub.add_argument("--memory", type=_limit(lambda t: parse_size(t, what="memory")), default=0, metavar="BYTES", help="memory limit, e.g. 256M, 1G")
        sub.add_argument("--io-read-bps", type=_limit(lambda t: parse_size(t, what="io-read-bps")), default=0, metavar="BYTES", help="disk read bandwidth per second, e.g. 10M")
        sub.add_argument("--io-write-bps", type=_limit(lambda t: parse_size(t, what="io-write-bps")), default=0, metavar="BYTES", help="disk write bandwidth per second, e.g. 5M")
        sub.add_argument("--pids", type=_limit(parse_count), default=0, metavar="N", help="most processes and threads at once")
        sub.add_argument("--timeout", type=_limit(parse_duration), default=0, metavar="DURATION", help="stop the job after this long, e.g. 30s, 5m")
        sub.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARG...]")

    start = commands.add_parser("start", help="start a job; print its id")
    job_options(start)
    run = commands.add_parser("run", help="start a job, stream its output, exit with its code")
    job_options(run)

    stop = commands.add_parser("stop", help="stop a job: SIGTERM, then SIGKILL after the grace period")
    group = stop.add_mutually_exclusive_group()
    group.add_argument("--grace", type=float, default=10.0, metavar="SECONDS", help="seconds between SIGTERM and SIGKILL (default 10)")
    group.add_argument("--force", action="store_true", help="SIGKILL at once")
    stop.add_argument("job_id", metavar="ID")

    status = commands.add_parser("status", help="show a job's status")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("job_id", metavar="ID")

    logs = commands.add_parser("logs", help="print a job's output from its first byte")
    logs.add_argument("-f", "--follow", action="store_true", help="follow until the job ends; exit with its code")
    logs.add_argument("--since-offset", type=int, default=0, metavar="N", help="start at byte offset N (resume)")
    logs.add_argument("job_id", metavar="ID")

    wait = commands.add_parser("wait", help="wait for a job to end; exit with its code")
    wait.add_argument("job_id", metavar="ID")

    listing = commands.add_parser("list", help="list the jobs you may see")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument(
        "--state",
        action="append",
        default=[],
        type=_states,
        metavar="STATE[,STATE...]",
        help="only jobs in these states (" + ", ".join(state.label for state in m.JobState) + "; repeatable)",
    )
    listing.add_argument("--owner", default="", metavar="NAME", help="only jobs of this owner (certificate CN)")

    remove = commands.add_parser("rm", help="forget a finished job and delete its output")
    remove.add_argument("job_id", metavar="ID")

    commands.add_parser("whoami", help="show the identity and role the server sees")
    return parser


def _limit(parse: Callable[[str], int]) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            return parse(text)
        except LimitError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < math.inf:  # NaN fails too; no socket timeout takes infinity
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite, non-negative number of seconds")
    return value


def _states(text: str) -> list[m.JobState]:
    labels = {state.label: state for state in m.JobState}
    states = []
    for item in text.split(","):
        state = labels.get(item.strip().lower())
        if state is None:
            raise argparse.ArgumentTypeError(f"{item!r} is not a job state ({', '.join(labels)})")
        states.append(state)
    return states


def _job_id(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise UsageError(f"{text!r} is not a job id") from None


def _connect(args: argparse.Namespace) -> BlockingClient:
    from jobworker.clienttls import ClientTLSError, client_ssl_context

    try:
        address = parse_address(args.server)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        context = client_ssl_context(args.ca, args.cert, args.key)
    except ClientTLSError as exc:
        raise UsageError(str(exc)) from None
    return BlockingClient(address, context, keepalive_interval=args.keepalive)


def _start_options(args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("no command given (jobcli start -- CMD [ARG...])")
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
    for index, item in enumerate([*argv, *(k for k, _ in env), *(v for _, v in env), args.workdir]):
        size = len(item.encode("utf-8", "surrogateescape"))
        if size > MAX_TEXT_BYTES:
            raise UsageError(f"an argument or environment string of {size} bytes is longer than the protocol's {MAX_TEXT_BYTES}")
    network = m.Network.HOST if args.network == "host" else m.Network.NONE
    return argv, {"env": tuple(env), "workdir": args.workdir, "user": args.user, "network": network, "limits": limits}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _OutputWriter:
    """
    Writes a stream's output to our stdout and stderr from a thread of its
    own, in order.

    A reader of our output that stops reading (C{jobcli logs -f ID | less},
    paused) blocks a write for as long as it likes.  Meanwhile the main
    thread goes on reading the connection and answering the server's
    keep-alive pings, so the server does not take a slow reader for a dead
    one.  Credit goes back to the server only for bytes written here, so
    what waits in this queue is at most the stream's window.
    """

    WAKE_BYTES = 1 << 20

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[int, bytes, int] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._written = 0
        self.error: BaseException | None = None
        # One byte per write done: wakes the main thread to grant credit.
        self.wake_fd, self._wake_w = os.pipe()
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="jobcli-output", daemon=True)
        self._thread.start()

    def write(self, fd: int, data: bytes, credit: int = 0) -> None:
        self._queue.put((fd, data, credit))

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
            if credit:
                with self._lock:
                    self._written += credit
                    unsignalled = self._written
                # Credit goes back in batches of half the window anyway:
                # wake the main thread per MiB written, or when idle.
                if unsignalled >= self.WAKE_BYTES or self._queue.empty():
                    self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the main thread has wake-ups enough to read

    def take_written(self) -> int:
        """
        Bytes written since the last call (main thread).

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
        Wait until everything queued is written; raise what a write raised.
        """
        self._queue.put(None)
        self._thread.join()
        os.close(self.wake_fd)
        os.close(self._wake_w)
        if self.error is not None:
            raise self.error


def _stream(client: BlockingClient, job_id: uuid.UUID, offset: int, follow: bool) -> m.JobStatus:
    status = None
    gaps = dropped = 0
    writer = _OutputWriter()
    stream_id: list[int] = []

    def written() -> None:
        size = writer.take_written()
        if size and stream_id:
            client.grant(stream_id[0], size)

    client.wake_on(writer.wake_fd, written)
    try:
        for message in client.follow(job_id, offset=offset, follow=follow, auto_credit=False):
            if not stream_id:
                stream_id.append(message.stream_id)
            if isinstance(message, m.Output):
                writer.write(message.fd, message.data, len(message.data))
            elif isinstance(message, m.Gap):
                # The first gap is reported when it happens; the rest in one
                # total at the end, so a long lagging follow does not flood.
                if not gaps:
                    writer.write(
                        2,
                        f"jobcli: {message.length} bytes of output at offset {message.offset} "
                        "were not kept by the server (its retention limit, a full disk or damage; see jobcli status)\n".encode(),
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
            writer.finish()
        except Exception:
            pass
        raise
    client.wake_on(None)
    writer.finish()
    if gaps > 1:
        sys.stderr.write(f"jobcli: in all, {dropped} bytes of output in {gaps} gaps were not kept by the server\n")
    assert status is not None
    return status


def _status_json(status: m.JobStatus) -> dict[str, Any]:
    """
    C{status} for C{--json}; an abridged one (cut to fit a frame) says so.
    """
    data = status_to_dict(status)
    if status.abridged:
        data["abridged"] = True
    return data


def _format_time(microseconds: int) -> str:
    if not microseconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(microseconds / 1e6)) + f".{microseconds // 1000 % 1000:03d}"


def _describe(status: m.JobStatus) -> str:
    lines = [
        ("id", str(status.job_id)),
        ("owner", status.owner),
        ("command", " ".join(status.argv)),
        ("state", status.state.label),
    ]
    if status.exit_code >= 0:
        lines.append(("exit code", str(status.exit_code)))
    if status.signal:
        name = signal.Signals(status.signal).name if status.signal in signal.Signals._value2member_map_ else str(status.signal)
        lines.append(("signal", name))
    if status.error:
        lines.append(("error", status.error))
    if status.stopped_by:
        lines.append(("stopped by", status.stopped_by))
    lines += [
        ("created", _format_time(status.created_at)),
        ("started", _format_time(status.started_at)),
        ("ended", _format_time(status.ended_at)),
        # "" is the server's default: a uid of the job's own.
        ("user", status.user or "(dynamic)"),
        *([("uid", str(status.uid))] if status.uid != m.UID_UNKNOWN else []),
        ("workdir", status.workdir),
        ("network", status.network.name.lower()),
    ]
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
        described.append(f"timeout={limits.timeout_ms / 1000:g}s")
    lines.append(("limits", " ".join(described) or "none"))
    usage = status.usage
    lines.append(
        (
            "usage",
            f"cpu={usage.cpu_usec / 1e6:.3f}s memory-peak={usage.memory_peak_bytes} "
            f"io-read={usage.io_read_bytes} io-write={usage.io_write_bytes} pids-peak={usage.pids_peak}",
        )
    )
    lines.append(("output", f"{status.output_bytes} bytes"))
    if status.abridged:
        lines.append(("note", "texts and command cut to fit the connection's frame size"))
    return "\n".join(f"{key + ':':<12}{value}" for key, value in lines)


def _run(args: argparse.Namespace, client: BlockingClient) -> int:
    argv, options = _start_options(args)
    job_id = client.start(argv, **options)
    stopping = []

    def interrupted(signum: int, frame: object) -> None:
        if stopping:
            raise KeyboardInterrupt
        stopping.append(signum)
        sys.stderr.write(f"jobcli: stopping job {job_id} (interrupt again to leave it running)\n")
        # The stop goes on a second connection: this one is mid-stream.
        with _connect(args) as other:
            try:
                other.stop(job_id)
            except JobworkerError:
                pass

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        status = _stream(client, job_id, 0, True)
    finally:
        signal.signal(signal.SIGINT, previous)
    if status.state is m.JobState.FAILED and status.error:
        sys.stderr.write(f"jobcli: {status.error}\n")
    return exit_status(status)


def _dispatch(args: argparse.Namespace) -> int:
    command = args.command
    with _connect(args) as client:
        if command == "start":
            argv, options = _start_options(args)
            print(client.start(argv, **options))
            return 0
        if command == "run":
            return _run(args, client)
        if command == "stop":
            client.stop(_job_id(args.job_id), grace_ms=max(0, round(args.grace * 1000)), force=args.force)
            return 0
        if command == "status":
            status = client.status(_job_id(args.job_id))
            print(json.dumps(_status_json(status), indent=2) if args.json else _describe(status))
            return 0
        if command == "logs":
            if args.since_offset < 0:
                raise UsageError("--since-offset must not be negative")
            status = _stream(client, _job_id(args.job_id), args.since_offset, args.follow)
            return exit_status(status) if args.follow else 0
        if command == "wait":
            return exit_status(client.wait(_job_id(args.job_id)))
        if command == "list":
            # Every page first: a refusal is then one line on stderr, not a
            # table header with nothing under it.
            jobs = client.list(states=[state for group in args.state for state in group], owner=args.owner)
            if args.json:
                print(json.dumps([_status_json(job) for job in jobs], indent=2))
            else:
                print(f"{'ID':<36}  {'OWNER':<12}  {'STATE':<9}  {'EXIT':>4}  COMMAND")
                for job in jobs:
                    code = str(exit_status(job)) if job.state.is_final else ""
                    command = " ".join(job.argv) + (" …" if job.abridged else "")
                    print(f"{job.job_id!s:<36}  {job.owner:<12.12}  {job.state.label:<9}  {code:>4}  {command}")
            return 0
        if command == "rm":
            client.remove(_job_id(args.job_id))
            return 0
        if command == "whoami":
            hello = client.hello
            assert hello is not None
            print(f"{hello.identity} ({hello.role or 'no role'}) on {hello.server_name}" + (f" ({hello.server_version})" if hello.server_version else ""))
            return 0
    raise UsageError(f"unknown command {command}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    own_error = OWN_ERROR if args.command in ("run", "wait") or (args.command == "logs" and args.follow) else 1
    try:
        return _dispatch(args)
    except (UsageError, JobworkerError) as exc:
        sys.stderr.write(f"jobcli: {exc}\n")
        if isinstance(exc, JobworkerError) and args.command == "run":
            code = getattr(exc, "code", None)
            if code is not None and code.name == "COMMAND_NOT_FOUND":
                return 127
            if code is not None and code.name == "COMMAND_NOT_EXECUTABLE":
                return 126
        return own_error
    except (ValueError, UnicodeError) as exc:
        # A message the protocol cannot carry (for instance text that is not
        # valid UTF-8): say so in one line, never with a traceback.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        sys.stderr.write(f"jobcli: {first[:300]}\n")
        return own_error
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (jobcli logs ID | head).
        try:
            sys.stdout = None  # type: ignore[assignment]
        finally:
            return 141


if __name__ == "__main__":
    sys.exit(main())
