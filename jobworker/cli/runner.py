"""
Running a parsed C{jobcli} command: on one server (L{execute}: its exit
code and one-line error message) or on several at once (L{run_on_many}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from typing import Any

from jobworker.cli.commands import COMMANDS
from jobworker.cli.output import Console
from jobworker.cli.parser import OWN_ERROR, UsageError
from jobworker.cli.session import Command
from jobworker.clientside.config import Target
from jobworker.errors import ErrorCode, JobworkerError
from jobworker.host.contract import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND

# Connections open at once with --server a,b,c: enough to drive a rack in
# one go, few enough not to exhaust our descriptors or a shared bastion.
MAX_PARALLEL = 16


# Commands that run on every server of --server a,b,c at once.
MULTI_HOST = {"run", "start", "status", "list", "stop"}
# Commands whose --json prints a list (several results) on one server.
JSON_LISTS = {"list", "stop", "rm", "kill"}


def own_error_code(args: argparse.Namespace) -> int:
    return OWN_ERROR if args.command in ("run", "wait") or (args.command == "logs" and args.follow) else 1


def execute(cmd: Command) -> tuple[int, str | None]:
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
        return own_error_code(args), message
    except (ValueError, UnicodeError) as exc:
        # A message the protocol cannot carry (for instance text that is not
        # valid UTF-8): say so in one line, never with a traceback.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        cmd.console.err(f"jobcli: {first[:300]}")
        return own_error_code(args), first[:300]
    finally:
        cmd.close()


def print_json(args: argparse.Namespace, results: list[Any]) -> None:
    if args.command in JSON_LISTS:
        print(json.dumps(results, indent=2))
    elif results:
        print(json.dumps(results[0], indent=2))


def run_on_many(args: argparse.Namespace, targets: list[Target]) -> int:
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
        console = Console(target.name, lock)
        cmd = Command(args, target, console)
        code, error = execute(cmd)
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
