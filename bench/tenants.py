#!/usr/bin/env python3
"""
What tenant isolation (issue 11) costs: start latency and memory per running
job of this checkout against a baseline revision without it, in one run.

    python3 bench/tenants.py [--baseline REV] [--runs 20] [--jobs 20]

The baseline (default: the parent of the commit that added
C{jobworker/host/uids.py}, i.e. the tree just before the tenant work) is checked
out in a temporary git worktree and run with this checkout's virtualenv, its
own code first on C{PYTHONPATH}, for the server, C{jobcli} and
C{bench/clients.py} alike, so that each side speaks its own protocol.  Both
servers run at once, as root, with their defaults; the two latencies are
measured interleaved (one run each per round), so that the machine's other
load falls on both alike.

  - start latency: wall time of C{jobcli run -- true}, median of C{--runs}.
  - memory per running job: C{--jobs} jobs of C{sleep 300}; (PSS of the
    helper processes + the server's RSS growth) / jobs, as C{bench/run.py
    overhead} counts it; and the memory charged to the jobs' cgroups (the
    kernel's side: namespaces, mounts), per job.

Prints a small table and writes C{bench/results/tenants.json}.  Standard
library only; loopback only; stops what it started.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)

sys.path.insert(0, REPO)

from bench.harness.proc import descendants, proc_comm, proc_status_kib, smaps_rollup_kib, wait_for_sleeps
from bench.harness.processes import BenchError, Workspace, check, free_port, run_timed, wait_listening
from bench.harness.results import interleaved, mib
from bench.harness.servers import make_pki
from bench.harness.settings import CLIENTS, RESULTS, VENV_BIN, KiB


def default_baseline() -> str:
    # --follow: the file was added as jobworker/uids.py, then moved; the
    # commit that moved it is not the one to measure against.
    added = subprocess.run(
        ["git", "log", "--follow", "--diff-filter=A", "--format=%H", "--", "jobworker/host/uids.py"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    if not added:
        raise SystemExit("bench/tenants.py: no commit adds jobworker/host/uids.py; give --baseline")
    return f"{added[-1]}^"


class Server:
    """
    A C{twistd -n jobworker} of one source tree on 127.0.0.1.
    """

    def __init__(self, workspace: Workspace, certs: str, name: str, tree: str, *extra: str) -> None:
        self.name = name
        self.tree = tree
        self.port = free_port()
        self.state_dir = workspace.path(f"state-{name}")
        os.makedirs(self.state_dir)
        self.log_path = workspace.path(f"server-{name}.log")
        self.env = dict(os.environ, PYTHONPATH=tree)
        command = [
            os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "jobworker",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--ca", os.path.join(certs, "ca.pem"), "--cert", os.path.join(certs, "server.pem"),
            "--key", os.path.join(certs, "server.key"), "--state-dir", self.state_dir, *extra,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = workspace.spawn(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tree, env=self.env)
        wait_listening(self.port, self.process, f"server {name}", self.log_path)
        self.env.update(
            JOBWORKER_SERVER=f"127.0.0.1:{self.port}",
            JOBWORKER_CA=os.path.join(certs, "ca.pem"),
            JOBWORKER_CERT=os.path.join(certs, "admin.pem"),
            JOBWORKER_KEY=os.path.join(certs, "admin.key"),
        )

    def run_true(self) -> float:
        timing = run_timed([os.path.join(VENV_BIN, "jobcli"), "run", "--", "true"], env=self.env, capture=True)
        return check(timing, f"jobcli run -- true ({self.name})").wall_s

    def clients(self, *args: str) -> Any:
        result = subprocess.run(
            [os.path.join(VENV_BIN, "python"), CLIENTS, *args],
            env=self.env, stdin=subprocess.DEVNULL, capture_output=True, timeout=300,
        )  # fmt: skip
        if result.returncode != 0:
            raise BenchError(f"clients.py {args[0]} ({self.name}): {result.stderr.decode(errors='replace')[-2000:]}")
        return json.loads(result.stdout)

    def job_uid(self) -> str:
        """
        C{id -u} in a job: shows which tree the server runs (a uid of its
        own, or nobody's).
        """
        timing = run_timed([os.path.join(VENV_BIN, "jobcli"), "run", "--", "id", "-u"], env=self.env, capture=True)
        return check(timing, f"jobcli run -- id -u ({self.name})").stdout.decode().strip()


def job_cgroup_bytes(job_id: str) -> int:
    """
    Memory charged to one job's cgroup (v1 memory.usage_in_bytes or v2
    memory.current); 0 when there is none.
    """
    for pattern in (f"/sys/fs/cgroup/memory/**/job-{job_id}/memory.usage_in_bytes", f"/sys/fs/cgroup/**/job-{job_id}/memory.current"):
        for path in glob.glob(pattern, recursive=True):
            with open(path) as handle:
                return int(handle.read())
    return 0


def memory_per_job(server: Server, jobs: int) -> dict[str, Any]:
    rss_before = proc_status_kib(server.process.pid, "VmRSS") * KiB
    job_ids = server.clients("start", "--count", str(jobs), "--", "sleep", "300")
    try:
        server.clients("running", *job_ids)
        wait_for_sleeps(server.process.pid, jobs)
        time.sleep(1.0)
        rss_after = proc_status_kib(server.process.pid, "VmRSS") * KiB
        pss = 0
        for pid in descendants(server.process.pid):
            if proc_comm(pid) == "sleep":
                continue
            try:
                pss += smaps_rollup_kib(pid).get("Pss", 0) * KiB
            except OSError:
                pass
        charged = [job_cgroup_bytes(job_id) for job_id in job_ids]
    finally:
        server.clients("stop", *job_ids)
    return {
        "jobs": jobs,
        "per_job_bytes": (pss + rss_after - rss_before) / jobs,
        "helper_pss_bytes": pss,
        "server_rss_growth_bytes": rss_after - rss_before,
        "cgroup_charged_per_job_bytes": statistics.median(charged) if charged else 0,
    }


def namespace_setup_s(workspace: Workspace, runs: int) -> dict[str, list[float]]:
    """
    The helper's set-up steps alone, in a forked child, with and without
    the tenant ones: fork, unshare, mounts, loopback, exit (which tears the
    namespaces down), reaped.  Interleaved, C{runs} each: a precise figure
    where the end-to-end latency is dominated by Python start-ups and noise.
    """
    sys.path.insert(0, REPO)
    from jobworker.host import isolate

    state = workspace.path("setup-state")
    os.makedirs(state, exist_ok=True)
    key = workspace.path("setup.key")
    blank = workspace.path("setup-inaccessible")
    for path in (key, blank):
        open(path, "w").close()
    os.chmod(blank, 0)

    def steps(tenants: bool) -> Callable[[], float]:
        def body() -> None:
            flags = isolate.CLONE_NEWNS | isolate.CLONE_NEWPID | isolate.CLONE_NEWNET
            if tenants:
                flags |= isolate.CLONE_NEWIPC
            isolate.c_call("unshare", flags)
            isolate.make_mounts_private()
            if tenants:
                isolate.make_root_read_only()
                isolate.hide_paths([state, key, os.path.dirname(key)], blank)
                isolate.mount_scratch(1 << 30)
            isolate.bring_up_loopback()
            if tenants:
                isolate.mount_sys()

        def measure() -> float:
            began = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                try:
                    body()
                    os._exit(0)
                except BaseException as exc:
                    os.write(2, f"set-up failed: {exc!r}\n".encode())
                    os._exit(1)
            _, status = os.waitpid(pid, 0)
            if status:
                raise BenchError("the set-up steps failed")
            return time.perf_counter() - began

        return measure

    return interleaved(runs, {"tenants": steps(True), "baseline": steps(False)}, warmup=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=None, help="revision without tenant isolation (default: before jobworker/host/uids.py)")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--setup-runs", type=int, default=200)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/tenants.py: run as root (jobs get namespaces and uids only then)")
    baseline = args.baseline or default_baseline()
    revision = subprocess.run(["git", "rev-parse", "--short", baseline], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    current = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    tree = tempfile.mkdtemp(prefix="jobworker-baseline-")
    subprocess.run(["git", "worktree", "add", "--detach", "-q", tree, baseline], cwd=REPO, check=True)
    workspace = Workspace()
    try:
        certs = make_pki(workspace)
        servers = {
            "tenants": Server(workspace, certs, f"tenants-{current}", REPO),
            "baseline": Server(workspace, certs, f"baseline-{revision}", tree),
        }
        uids = {name: server.job_uid() for name, server in servers.items()}
        times = interleaved(args.runs, {name: server.run_true for name, server in servers.items()})
        memory = {name: memory_per_job(server, args.jobs) for name, server in servers.items()}
        setup = namespace_setup_s(workspace, args.setup_runs)
    finally:
        workspace.close()
        subprocess.run(["git", "worktree", "remove", "--force", tree], cwd=REPO, check=False)
        shutil.rmtree(tree, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    added_ms = (medians["tenants"] - medians["baseline"]) * 1000
    # The fastest quarter is what the machine's other load disturbs least.
    quartiles = {name: statistics.quantiles(values, n=4)[0] for name, values in times.items()}
    document = {
        "current": current,
        "baseline": revision,
        "runs": args.runs,
        "start_latency_s": times,
        "median_start_latency_s": medians,
        "added_ms": added_ms,
        "first_quartile_start_latency_s": quartiles,
        "job_uid": uids,
        "memory": memory,
        "setup_s": setup,
        "median_setup_s": {name: statistics.median(values) for name, values in setup.items()},
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "tenants.json"), "w") as handle:
        json.dump(document, handle, indent=2)
    print(f"a job runs as uid {uids['tenants']} (tenants) and {uids['baseline']} (baseline)")
    print(f"jobcli run -- true, median of {args.runs}: {current} (tenants) {medians['tenants'] * 1000:.1f} ms, "
          f"{revision} (baseline) {medians['baseline'] * 1000:.1f} ms, added {added_ms:+.1f} ms (goal <= +5 ms); "
          f"first quartile {quartiles['tenants'] * 1000:.1f} vs {quartiles['baseline'] * 1000:.1f} ms, "
          f"added {(quartiles['tenants'] - quartiles['baseline']) * 1000:+.1f} ms")
    setup_ms = {name: statistics.median(values) * 1000 for name, values in setup.items()}
    print(f"namespace set-up and teardown alone, median of {args.setup_runs}: {setup_ms['tenants']:.2f} ms with the tenant steps, "
          f"{setup_ms['baseline']:.2f} ms without, added {setup_ms['tenants'] - setup_ms['baseline']:+.2f} ms")
    for name, found in memory.items():
        print(f"memory per running job ({name}, {found['jobs']} x sleep 300): {mib(found['per_job_bytes'])} "
              f"(helpers' PSS + server RSS growth); charged to the job's cgroup: {mib(found['cgroup_charged_per_job_bytes'])}")


if __name__ == "__main__":
    main()
