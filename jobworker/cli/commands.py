"""
C{jobcli}'s commands (C{start}, C{run}, C{logs}, ... one function each)
and L{COMMANDS}, the table from a command's name to its function.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from jobworker.blocking import ConnectionFailed
from jobworker.cli.formatting import (
    SHORT_ID,
    describe,
    end_note,
    format_age,
    format_duration,
    run_time,
    short_id,
    status_json,
)
from jobworker.cli.output import Console, JsonArray
from jobworker.cli.parser import MAX_TEXT_BYTES, UsageError, build_parser
from jobworker.cli.session import Command, connect_target
from jobworker.cli.streaming import stream_output, tail_offset
from jobworker.errors import ErrorCode, JobworkerError
from jobworker.jobnames import NameError_, check_labels
from jobworker.limits import Limits
from jobworker.protocol import messages as m
from jobworker.records import exit_status


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


def _ended(status: m.JobStatus, console: Console) -> int:
    note = end_note(status)
    if note:
        console.err(f"jobcli: {note}")
    return exit_status(status)


def _cmd_start(cmd: Command) -> int:
    argv, options = _start_options(cmd.args)
    job_id = cmd.client.start(argv, **options)
    if cmd.args.json:
        cmd.results.append({"id": str(job_id)})
    else:
        cmd.console.out(str(job_id))
    return 0


def _cmd_run(cmd: Command) -> int:
    args = cmd.args
    argv, options = _start_options(args)
    client = cmd.client
    job_id = client.start(argv, **options)
    if args.verbose or (cmd.console.prefix is None and sys.stderr.isatty()):
        cmd.console.err(f"jobcli: job {job_id} (jobcli logs -f {short_id(job_id)} resumes if the connection drops)")
    if threading.current_thread() is not threading.main_thread():
        return _ended(stream_output(client, job_id, 0, True, cmd.console), cmd.console)
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
            with connect_target(args, cmd.target) as other:
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
        status = stream_output(client, job_id, 0, True, cmd.console)
    finally:
        signal.signal(signal.SIGINT, previous)
    return _ended(status, cmd.console)


def _cmd_stop(cmd: Command) -> int:
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
            cmd.results.append(status_json(final))
    return code


def _cmd_kill(cmd: Command) -> int:
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


def _each_job(cmd: Command, texts: Sequence[str]) -> list[tuple[str, uuid.UUID | None]]:
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


def _cmd_rm(cmd: Command) -> int:
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


def _cmd_status(cmd: Command) -> int:
    status = cmd.client.status(cmd.client.resolve_job_id(cmd.args.job_id))
    if cmd.args.json:
        cmd.results.append(status_json(status))
    else:
        cmd.console.out(describe(status))
    return 0


def _cmd_logs(cmd: Command) -> int:
    args = cmd.args
    client = cmd.client
    job_id = client.resolve_job_id(args.job_id)
    fds = frozenset((1,)) if args.stdout else frozenset((2,)) if args.stderr else frozenset((1, 2))
    offset = args.since_offset
    if args.tail is not None:
        # With --since too, the server starts at the later of the two: the
        # last N lines of what was read since then.
        offset = tail_offset(client, job_id, args.tail, fds)
    status = stream_output(client, job_id, offset, args.follow, cmd.console, fds, args.timestamps, args.since)
    return _ended(status, cmd.console) if args.follow else 0


def _cmd_wait(cmd: Command) -> int:
    status = cmd.client.wait(cmd.client.resolve_job_id(cmd.args.job_id))
    if cmd.args.json:
        cmd.results.append(status_json(status))
    return _ended(status, cmd.console)


# The NAME column of jobcli list: its width, and longer names are cut (to
# one less, and an ellipsis) unless --no-trunc.  Fixed, so that the rows of
# every page line up, whatever names the later pages hold.
LIST_NAME_WIDTH = 20
# The jobs of jobcli list's first page: the later ones hold what fits a
# frame (thousands), this one comes, and is printed, at once.
LIST_FIRST_PAGE = 100


def _cmd_list(cmd: Command) -> int:
    args = cmd.args
    # Each page is printed as it comes, the newest job first: a long list
    # starts at once and is never held whole.  Nothing before the first
    # page: a refusal is then one line on stderr, not a table header with
    # nothing under it.
    pages = cmd.client.iter_pages(
        states=[state for group in args.state for state in group],
        owner=args.owner,
        name=args.name or "",
        labels=args.label,
        newest_first=True,
        first_page_size=LIST_FIRST_PAGE,
    )
    if args.json:
        if cmd.console.prefix is not None:
            # Several servers: each one's list is one line of JSON.
            for page in pages:
                cmd.results.extend(status_json(job) for job in page)
            return 0
        array = JsonArray(cmd.console)
        cmd.json_printed = True
        try:
            for page in pages:
                array.extend(status_json(job) for job in page)
        finally:
            array.close()
        return 0
    ident: Callable[[m.JobStatus], str] = (
        (lambda job: str(job.job_id)) if args.no_trunc else (lambda job: short_id(job.job_id))
    )
    if args.quiet or args.names:
        for page in pages:
            lines = []
            for job in page:
                if args.quiet:
                    lines.append(ident(job))
                if args.names and job.name:
                    lines.append(job.name)
            if lines:
                cmd.console.out("\n".join(lines))
        return 0
    width = 36 if args.no_trunc else SHORT_ID
    now = time.time()
    header = (
        f"{'ID':<{width}}  {'OWNER':<12}  {'STATE':<9}  {'EXIT':>4}  {'CREATED':<12}  {'DURATION':<9}  "
        f"{'NAME':<{LIST_NAME_WIDTH}}  COMMAND"
    )
    for number, page in enumerate(pages):
        rows = [header] if number == 0 else []
        for job in page:
            name = job.name
            if not args.no_trunc and len(name) > LIST_NAME_WIDTH:
                name = name[: LIST_NAME_WIDTH - 1] + "…"
            code = str(exit_status(job)) if job.state.is_final else ""
            command = " ".join(job.argv) + (" …" if job.abridged else "")
            if not args.no_trunc and len(command) > 60:
                command = command[:59] + "…"
            ran = run_time(job, now)
            owner = job.owner if args.no_trunc else f"{job.owner:<12.12}"
            rows.append(
                f"{ident(job):<{width}}  {owner:<12}  {job.state.label:<9}  {code:>4}  "
                f"{format_age(job.created_at, now):<12}  {'-' if ran is None else format_duration(ran):<9}  "
                f"{name or '-':<{LIST_NAME_WIDTH}}  {command}"
            )
        if rows:
            cmd.console.out("\n".join(rows))
    return 0


def _cmd_whoami(cmd: Command) -> int:
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


def _cmd_config(cmd: Command) -> int:
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


def _cmd_completion(cmd: Command) -> int:
    from jobworker.cli.completion import completion_script

    cmd.console.out(completion_script(build_parser(), cmd.args.shell))
    return 0


COMMANDS: dict[str, Callable[[Command], int]] = {
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
