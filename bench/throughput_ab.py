#!/usr/bin/env python3
"""
Throughput of several revisions of jobworker side by side, interleaved, with
the CPU time and page faults per GiB of each side: for finding which change
costs what (the throughput benchmark in C{bench/run.py} measures only this
checkout).

    python3 bench/throughput_ab.py [--runs 5] [--size-mib 1024] [--mode run|logs] [--ssh]
                                   NAME=REV[,CLIENT_REV] ...

Each C{REV} (a commit, a branch, or C{.} for this working tree, edits
included) is checked out into a temporary git worktree and run from it with
its own code first on C{PYTHONPATH}, under this checkout's virtualenv: a
C{twistd jobworker} of C{REV} each, in a cgroup of its own, and C{jobcli} of
C{CLIENT_REV} (default: C{REV}; the two must speak a common protocol
version) against it.  Each round runs every variant once: C{jobcli run --
head -c SIZE /dev/zero > /dev/null} (or C{start} then C{logs -f}), and, with
C{--ssh}, the same through OpenSSH.  Per run it prints MB/s, the client's
CPU seconds per GiB (from wait4), the server's (its own utime and stime, all
threads) and both sides' minor page faults per GiB; then the medians and,
with C{--ssh}, each one's ratio against ssh's median.

Needs root, like C{bench/run.py}.  Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness.cgroups import ServerCgroup
from bench.harness.proc import proc_cpu_split
from bench.harness.processes import Workspace, check, free_port, run_timed, wait_listening
from bench.harness.servers import SshServer, make_pki
from bench.harness.settings import REPO, VENV_BIN

GiB = 1 << 30


def checkout(revision: str, into: str) -> str:
    """
    The tree of C{revision}: this checkout for C{.}, else a detached
    worktree under C{into}.
    """
    if revision == ".":
        return REPO
    path = tempfile.mkdtemp(prefix="tree-", dir=into)
    subprocess.run(["git", "-C", REPO, "worktree", "add", "-q", "--detach", path, revision], check=True)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="interleaved throughput of several jobworker revisions")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--mode", choices=("run", "logs"), default="run")
    parser.add_argument("--ssh", action="store_true", help="also ssh root@127.0.0.1 'head -c SIZE /dev/zero', each round")
    parser.add_argument("variants", nargs="+", metavar="NAME=REV[,CLIENT_REV]")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: the server isolates jobs")
    size = args.size_mib << 20
    per_gib = GiB / size
    head = ["head", "-c", str(size), "/dev/zero"]
    jobcli = os.path.join(VENV_BIN, "jobcli")
    workspace = Workspace()
    trees_root = tempfile.mkdtemp(prefix="jobworker-bench-ab-trees-")
    worktrees: list[str] = []
    servers: dict[str, tuple[subprocess.Popen[bytes], dict[str, str], str]] = {}
    ssh = None
    try:
        certs = make_pki(workspace)
        trees: dict[str, str] = {}
        for spec in args.variants:
            name, _, revisions = spec.partition("=")
            server_rev, _, client_rev = revisions.partition(",")
            for revision in (server_rev, client_rev or server_rev):
                if revision not in trees:
                    trees[revision] = checkout(revision, trees_root)
                    if trees[revision] != REPO:
                        worktrees.append(trees[revision])
            server_tree, client_tree = trees[server_rev], trees[client_rev or server_rev]
            port = free_port()
            state = workspace.path(f"state-{name}")
            os.makedirs(state)
            command = [
                os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "jobworker",
                "--listen", f"tcp:{port}:interface=127.0.0.1",
                "--ca", f"{certs}/ca.pem", "--cert", f"{certs}/server.pem", "--key", f"{certs}/server.key",
                "--state-dir", state, "--grace", "3",
            ]  # fmt: skip
            cgroup = ServerCgroup(f"jobworker-bench-ab-{os.getpid()}-{name}")
            workspace.cgroups.append(cgroup)
            log_path = workspace.path(f"server-{name}.log")
            with open(log_path, "ab") as log:
                process = workspace.spawn(
                    cgroup.wrap(command), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=server_tree, env=dict(os.environ, PYTHONPATH=server_tree),
                )  # fmt: skip
            wait_listening(port, process, f"server {name}", log_path)
            env = dict(
                os.environ, PYTHONPATH=client_tree, JOBWORKER_SERVER=f"127.0.0.1:{port}",
                JOBWORKER_CA=f"{certs}/ca.pem", JOBWORKER_CERT=f"{certs}/admin.pem", JOBWORKER_KEY=f"{certs}/admin.key",
            )  # fmt: skip
            # The client tree's own bench/clients.py prunes: it speaks that
            # tree's protocol and imports that tree's modules.
            servers[name] = (process, env, os.path.join(client_tree, "bench", "clients.py"))
        ssh = SshServer(workspace) if args.ssh else None
        results: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        if ssh is not None:
            results["ssh"] = []
        for _ in range(args.runs):
            for name, (process, env, clients) in servers.items():
                user0, system0, faults0 = proc_cpu_split(process.pid)
                began = time.perf_counter()
                if args.mode == "run":
                    timing = check(run_timed([jobcli, "run", "--", *head], env=env), "jobcli run")
                else:
                    started = check(run_timed([jobcli, "start", "--", *head], env=env, capture=True), "jobcli start")
                    job_id = started.stdout.decode().strip()
                    timing = check(run_timed([jobcli, "logs", "-f", job_id], env=env), "jobcli logs -f")
                wall = time.perf_counter() - began
                user1, system1, faults1 = proc_cpu_split(process.pid)
                run = {
                    "mb_per_s": size / wall / 1e6,
                    "client_cpu": (timing.user_s + timing.sys_s) * per_gib,
                    "client_sys": timing.sys_s * per_gib,
                    "server_cpu": (user1 - user0 + system1 - system0) * per_gib,
                    "server_sys": (system1 - system0) * per_gib,
                    "server_faults": (faults1 - faults0) * per_gib,
                    "client_faults": timing.minor_faults * per_gib,
                }
                results[name].append(run)
                print(
                    f"{name:10} {run['mb_per_s']:5.0f} MB/s  CPU s/GiB client {run['client_cpu']:.2f} (sys {run['client_sys']:.2f})"
                    f" server {run['server_cpu']:.2f} (sys {run['server_sys']:.2f})"
                    f"  faults/GiB server {run['server_faults']:.0f} client {run['client_faults']:.0f}",
                    flush=True,
                )
                subprocess.run([os.path.join(VENV_BIN, "python"), clients, "prune"], env=env, stdout=subprocess.DEVNULL, check=True)
            if ssh is not None:
                timing = check(run_timed(ssh.command(" ".join(head))), "ssh")
                results["ssh"].append({"mb_per_s": size / timing.wall_s / 1e6, "client_cpu": (timing.user_s + timing.sys_s) * per_gib})
                print(f"{'ssh':10} {results['ssh'][-1]['mb_per_s']:5.0f} MB/s", flush=True)
        print(f"\nmedians of {args.runs} (load average now {' '.join(f'{x:.2f}' for x in os.getloadavg())}):")
        reference = statistics.median(run["mb_per_s"] for run in results["ssh"]) if ssh is not None else None
        for name, runs in results.items():
            medians = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            ratio = f"  ratio to ssh {medians['mb_per_s'] / reference:.2f}" if reference and name != "ssh" else ""
            print(f"{name:10} " + "  ".join(f"{key} {value:.0f}" if value >= 100 else f"{key} {value:.2f}" for key, value in medians.items()) + ratio)
    finally:
        if ssh is not None:
            ssh.stop()
        workspace.close()  # the servers first: they run from the worktrees
        for path in worktrees:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", path], check=False)
        shutil.rmtree(trees_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
