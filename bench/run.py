#!/usr/bin/env python3
"""
jobworker's performance benchmarks, each measured against a reference run on
the same machine in the same run: OpenSSH on loopback, or a raw pipe.

    python3 bench/run.py [--quick] [--only NAME...] [--fanout-mode MODE]
                         [--py-spy PATH] [--scale-running N,N...]
                         [--scale-records N,N...]

Standard library only.  It uses the repository's virtualenv (C{.venv/bin}:
C{jobcli}, C{twistd}, C{jobworker-pki}, and its Python for
C{bench/clients.py}), makes its own development PKI, state directories and
OpenSSH server under a temporary directory, listens on 127.0.0.1 only, and
stops every process it started before it exits.  Raw results go to
C{bench/results/NAME.json}; the summary table to C{bench/results/summary.md}.
See C{bench/README.md} for what each benchmark measures and how to read it.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

# Run as a script (python3 bench/run.py): the harness and the benchmarks are
# the bench package of this checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.benchmarks import RUNNERS
from bench.harness.processes import BenchError, Workspace
from bench.harness.results import TABLE_HEAD, Row, say, write_json
from bench.harness.servers import Context, SshServer, make_pki
from bench.harness.settings import REPO, RESULTS, VENV_BIN, Settings

BENCHMARKS = tuple(RUNNERS)


def describe_environment(ctx: Context) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "quick": ctx.settings.quick,
    }
    version = subprocess.run(["ssh", "-V"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    env["ssh_version"] = version.stdout.decode().strip()
    negotiated = ctx.ssh.negotiated()
    env["ssh_kex"] = negotiated.get("kex", "?")
    env["ssh_cipher"] = negotiated.get("cipher", "?")
    env["ssh_mac"] = negotiated.get("mac", "?")
    env["sshd"] = ctx.ssh.installed
    git = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    env["jobworker_commit"] = git.stdout.decode().strip() or "?"
    probe = ctx.server("probe")
    try:
        tls = probe.clients("tls-info")
        env["jobworker_tls"] = f"{tls['version']} {tls['cipher']}"
        env["cgroup_driver"] = probe.cgroup_driver()
    finally:
        probe.stop()
    return env


def environment_lines(env: dict[str, Any]) -> list[str]:
    return [
        f"- when: {env['date']}; kernel {env['kernel']}, {env['cpus']} CPUs (client, server and job share them); Python {env['python']}",
        f"- load average (1, 5, 15 min) at start: {' '.join(f'{x:.2f}' for x in env['loadavg_start'])}"
        + (f"; at end: {' '.join(f'{x:.2f}' for x in env['loadavg_end'])}" if "loadavg_end" in env else ""),
        f"- jobworker {env['jobworker_commit']}: {env['jobworker_tls']}; cgroup driver {env['cgroup_driver']}",
        f"- {env['ssh_version']}; negotiated {env['ssh_kex']}, cipher {env['ssh_cipher']} (MAC {env['ssh_mac']})",
        f"- mode: {'quick (small sizes, few runs: not for reporting)' if env['quick'] else 'full'}",
    ]


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive: {text!r}")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="jobworker benchmarks against OpenSSH and a raw pipe on loopback.")
    parser.add_argument("--quick", action="store_true", help="small sizes and few runs (about a minute), for development")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME", help=f"run only these: {', '.join(BENCHMARKS)}")
    parser.add_argument(
        "--fanout-mode",
        choices=("threads", "jobcli"),
        default="threads",
        help="threads (default): followers are connections of a few Python processes using BlockingClient; "
        "jobcli: one `jobcli logs -f ID | sha256sum` pipeline per follower",
    )
    parser.add_argument("--py-spy", metavar="PATH", help="py-spy binary: profile server and client during one extra throughput run")
    parser.add_argument("--scale-running", type=_sizes, metavar="N,N...", help="scale: the numbers of running jobs measured (default 100,500,1000; --quick 20,100)")
    parser.add_argument("--scale-records", type=_sizes, metavar="N,N...", help="scale: the numbers of finished job records measured (default 1000,10000)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: the server isolates jobs and the benchmark starts its own sshd")
    for tool in ("twistd", "jobcli", "jobworker-pki", "python"):
        if not os.path.exists(os.path.join(VENV_BIN, tool)):
            parser.error(f"{VENV_BIN}/{tool} is missing: make the virtualenv first (python3 dev.py test)")
    settings = Settings.make(args.quick)
    settings.fanout_mode = args.fanout_mode
    settings.py_spy = args.py_spy
    if args.scale_running:
        settings.scale_running_sizes = args.scale_running
    if args.scale_records:
        settings.scale_record_sizes = args.scale_records
    selected = [name for name in BENCHMARKS if not args.only or name in args.only]

    # Stop cleanly on SIGTERM too: the finally clauses stop every process.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    workspace = Workspace()
    rows: list[Row] = []
    failures: list[str] = []
    began = time.monotonic()
    ssh = None
    try:
        certs = make_pki(workspace)
        ssh = SshServer(workspace)
        ctx = Context(settings, workspace, certs, ssh)
        ctx.environment = describe_environment(ctx)
        write_json("environment", {"environment": ctx.environment, "settings": asdict(settings)})
        for line in environment_lines(ctx.environment):
            say(line)
        for name in selected:
            say(f"\n## {name}")
            started = time.monotonic()
            try:
                bench_rows, document = RUNNERS[name](ctx)
            except BenchError as exc:
                failures.append(f"{name}: {exc}")
                say(f"bench: {name} FAILED: {exc}")
                rows.append(Row(name, "could not be measured", "error", "", "", "", False))
                write_json(name, {"benchmark": name, "error": str(exc)})
                continue
            document = {"benchmark": name, "elapsed_s": time.monotonic() - started, "settings": asdict(settings), "environment": ctx.environment, "rows": [asdict(row) for row in bench_rows], **document}
            write_json(name, document)
            say(TABLE_HEAD)
            for row in bench_rows:
                say(row.markdown())
            rows.extend(bench_rows)
        ctx.environment["loadavg_end"] = os.getloadavg()
        ctx.environment["elapsed_s"] = time.monotonic() - began
        summary = "\n".join(
            [
                "# jobworker benchmarks",
                "",
                *environment_lines(ctx.environment),
                f"- took {ctx.environment['elapsed_s']:.0f} s",
                "",
                TABLE_HEAD,
                *(row.markdown() for row in rows),
                "",
            ]
        )
        os.makedirs(RESULTS, exist_ok=True)
        with open(os.path.join(RESULTS, "summary.md"), "w") as handle:
            handle.write(summary)
        say("\n" + summary)
    except BenchError as exc:
        failures.append(f"set-up: {exc}")
    finally:
        if ssh is not None:
            ssh.stop()
        workspace.close()
    for failure in failures:
        say(f"bench: FAILED {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
