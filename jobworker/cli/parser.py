"""
C{jobcli}'s command line: the argparse parser, its value parsers (sizes,
durations, signals, labels, C{--since}) and the exit codes of a usage error.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Callable

from jobworker import __version__
from jobworker.host.contract import EXIT_SETUP_FAILED
from jobworker.jobnames import NameError_, check_label_filter, check_labels, check_name
from jobworker.limits import LimitError, parse_count, parse_cpu, parse_duration, parse_size
from jobworker.protocol import messages as m

# run/wait/logs -f: jobcli itself failed; the code of a job that could not
# start, as docker run does: in both the command did not run.
OWN_ERROR = EXIT_SETUP_FAILED
USAGE_ERROR = 2  # argparse's code, for every command but run
MAX_TEXT_BYTES = 65535  # one string on the wire (u16 length)
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


def build_parser() -> argparse.ArgumentParser:
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
        type=parse_seconds,
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
    group.add_argument("--grace", type=parse_seconds, default=10.0, metavar="SECONDS", help="seconds between SIGTERM and SIGKILL (default 10)")
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
    listing.add_argument(
        "--names",
        action="store_true",
        help="print the names of named jobs only, one a line; with -q, the ids too (what shell completion offers)",
    )
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


def parse_seconds(text: str) -> float:
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


def _states(text: str) -> list[m.JobState]:
    labels = {state.label: state for state in m.JobState}
    states = []
    for item in text.split(","):
        state = labels.get(item.strip().lower())
        if state is None:
            raise argparse.ArgumentTypeError(f"{item!r} is not a job state ({', '.join(labels)})")
        states.append(state)
    return states


def command_usage_error(args: argparse.Namespace, message: str) -> None:
    """
    Report a usage error of the parsed command C{args.command} the way its
    own parser does (its usage line and exit code: 125 for C{run}, else 2);
    does not return.
    """
    args._subcommands[args.command].error(message)
