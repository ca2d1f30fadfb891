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

import sys
from collections.abc import Sequence

from jobworker.cli.output import Console, OutputWriter
from jobworker.cli.parser import OWN_ERROR, USAGE_ERROR, UsageError, build_parser, command_usage_error, parse_since
from jobworker.cli.runner import MULTI_HOST, execute, own_error_code, print_json, run_on_many
from jobworker.cli.session import Command, keepalive_seconds, targets_from_args
from jobworker.cli.streaming import format_timestamp
from jobworker.jobnames import NameError_, check_labels

# main is the entry point (jobworker.cli:main); the rest is re-exported for
# tests and tools that drive jobcli's parts directly.
__all__ = [
    "main",
    "Command",
    "Console",
    "MULTI_HOST",
    "OWN_ERROR",
    "OutputWriter",
    "USAGE_ERROR",
    "UsageError",
    "build_parser",
    "execute",
    "format_timestamp",
    "keepalive_seconds",
    "own_error_code",
    "parse_since",
    "print_json",
    "run_on_many",
    "targets_from_args",
]


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        # Reported by the command's own parser, with its exit code (125 for run).
        command_usage_error(args, f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("start", "run"):
        try:
            # Each label was checked alone; together they have caps too.
            check_labels(args.label)
        except NameError_ as exc:
            command_usage_error(args, f"argument -l/--label: {exc}")
    try:
        try:
            targets = targets_from_args(args)
        except UsageError as exc:
            sys.stderr.write(f"jobcli: {exc}\n")
            return own_error_code(args)
        if len(targets) > 1:
            if args.command not in MULTI_HOST:
                sys.stderr.write(
                    f"jobcli: {args.command} works on one server at a time; several at once: {', '.join(sorted(MULTI_HOST))}\n"
                )
                return own_error_code(args)
            return run_on_many(args, targets)
        cmd = Command(args, targets[0], Console())
        code, _ = execute(cmd)
        if getattr(args, "json", False) and not cmd.json_printed and (code == 0 or cmd.results):
            print_json(args, cmd.results)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of our output went away (jobcli logs ID | head).
        sys.stdout = None
        return 141


if __name__ == "__main__":
    sys.exit(main())
