#!/usr/bin/env python3
"""
Jobs across crashes of the server (issue 16): how many are taken back, how
many bytes are lost, and how long a new server takes to take back N
running jobs, beside the start-up of the same server on an empty state
directory in the same run.

    python3 bench/restore.py [--jobs 100] [--cycles 5] [--ticking 5]

Each cycle: start a server on one state directory, check that every job is
running, C{kill -9} the server, let the jobs run a moment with no server.
C{--ticking} of the jobs print a counter every 5 ms throughout; at the end
each one's output must be exactly 0, 1, 2, ... (no byte lost or doubled);
the others are C{sleep}.  The take-back time is from the new server's spawn
to the moment every job reads C{running} through it, minus nothing: the
reference row is the same measure (spawn to a first answer) with an empty
state directory.  Medians over the cycles.  Needs root (isolated jobs).
Standard library and this checkout only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.join(REPO, ".venv", "bin")
CLIENTS = os.path.join(REPO, "bench", "clients.py")
TICKER = "import sys, time\ni = 0\nwhile True:\n    print(i, flush=True)\n    i += 1\n    time.sleep(0.005)\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, certs: str, state_dir: str, log_path: str) -> None:
        self.port = free_port()
        self.env = dict(
            os.environ,
            JOBWORKER_SERVER=f"127.0.0.1:{self.port}",
            JOBWORKER_CA=os.path.join(certs, "ca.pem"),
            JOBWORKER_CERT=os.path.join(certs, "admin.pem"),
            JOBWORKER_KEY=os.path.join(certs, "admin.key"),
        )
        command = [
            os.path.join(VENV_BIN, "twistd"), "-n", "--pidfile=", "jobworker",
            "--listen", f"tcp:{self.port}:interface=127.0.0.1",
            "--ca", os.path.join(certs, "ca.pem"), "--cert", os.path.join(certs, "server.pem"),
            "--key", os.path.join(certs, "server.key"), "--state-dir", state_dir, "--grace", "1",
            "--max-jobs-per-identity", "100000",
        ]  # fmt: skip
        self.began = time.monotonic()
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)

    def clients(self, *args: str) -> object:
        result = subprocess.run([os.path.join(VENV_BIN, "python"), CLIENTS, *args], env=self.env, capture_output=True, timeout=600)
        if result.returncode != 0:
            raise SystemExit(f"clients.py {args[0]}: {result.stderr.decode(errors='replace')[-2000:]}")
        return json.loads(result.stdout)

    def jobcli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([os.path.join(VENV_BIN, "jobcli"), *args], env=self.env, capture_output=True, timeout=600)

    def answering(self, timeout: float = 60) -> float:
        """
        Seconds from spawn until C{jobcli list} answers.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}")
            if self.jobcli("list", "-q").returncode == 0:
                return time.monotonic() - self.began
            time.sleep(0.02)
        raise SystemExit("the server never answered")

    def states(self) -> dict[str, str]:
        listed = json.loads(self.jobcli("list", "--json").stdout or b"[]")
        return {job["id"]: job["state"] for job in listed}

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--jobs", type=int, default=100, help="running jobs (default 100)")
    parser.add_argument("--cycles", type=int, default=5, help="crash cycles (default 5)")
    parser.add_argument("--ticking", type=int, default=5, help="of the jobs, those that print a counter (default 5)")
    parser.add_argument("--down-s", type=float, default=1.0, help="seconds with no server per cycle (default 1)")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="jobworker-restore-")
    certs = os.path.join(work, "pki")
    subprocess.run([os.path.join(VENV_BIN, "jobworker-pki"), "dev", certs], check=True, capture_output=True)
    state = os.path.join(work, "state")
    log_path = os.path.join(work, "server.log")
    reference: list[float] = []
    takeback: list[float] = []
    server = Server(certs, state, log_path)
    ids: list[str] = []
    try:
        server.answering()
        ticking = [server.jobcli("start", "--", "python3", "-c", TICKER).stdout.decode().strip() for _ in range(args.ticking)]
        sleeping = server.clients("start", "--count", str(args.jobs - args.ticking), "--", "sleep", "3600")
        assert isinstance(sleeping, list)
        ids = ticking + [str(job_id) for job_id in sleeping]
        server.clients("running", *ids)
        lost_total = 0
        for cycle in range(args.cycles):
            server.kill()
            time.sleep(args.down_s)
            empty = Server(certs, os.path.join(work, f"empty-{cycle}"), log_path)
            reference.append(empty.answering())
            empty.stop()
            server = Server(certs, state, log_path)
            server.answering()
            deadline = time.monotonic() + 120
            while True:
                states = server.states()
                if all(states.get(job_id) == "running" for job_id in ids) or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            takeback.append(time.monotonic() - server.began)
            lost = [job_id for job_id in ids if states.get(job_id) != "running"]
            lost_total += len(lost)
            print(f"cycle {cycle + 1}: {len(ids) - len(lost)}/{len(ids)} taken back, {len(lost)} not "
                  f"({sorted(set(states.get(j, '?') for j in lost))}); {takeback[-1] * 1000:.0f} ms "
                  f"(empty state dir: {reference[-1] * 1000:.0f} ms)", flush=True)
        for job_id in ids:
            server.jobcli("stop", "--no-wait", job_id)
        server.clients("running", *ids)
        bad = 0
        total = 0
        for job_id in ticking:
            server.jobcli("wait", job_id)
            out = server.jobcli("logs", job_id).stdout
            lines = out.split(b"\n")[:-1]
            total += len(out)
            if lines != [str(i).encode() for i in range(len(lines))]:
                bad += 1
        print(f"jobs taken back: {args.cycles * len(ids) - lost_total}/{args.cycles * len(ids)} over {args.cycles} crash cycles")
        print(f"ticking jobs whose output is exactly 0, 1, 2, ...: {len(ticking) - bad}/{len(ticking)} ({total} bytes)")
        print(f"take back {len(ids)} running jobs (spawn to all running), median: {statistics.median(takeback) * 1000:.0f} ms; "
              f"the same server on an empty state dir (spawn to a first answer): {statistics.median(reference) * 1000:.0f} ms; "
              f"difference {(statistics.median(takeback) - statistics.median(reference)) * 1000:.0f} ms")
    finally:
        for job_id in ids:
            server.jobcli("stop", "--force", "--no-wait", job_id)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
