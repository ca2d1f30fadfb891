"""
C{stalled}: a follower that reads nothing must not slow the job down nor
grow the server's memory (goal: time ratio ≥ 0.9, RSS growth ≤ 64 MiB).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any

from bench.harness.proc import RssSampler
from bench.harness.processes import BenchError, check
from bench.harness.results import Row, interleaved, median, mib, ms
from bench.harness.servers import Context
from bench.harness.settings import GiB, KiB, MiB, size_arg, size_label


def bench_stalled(ctx: Context) -> tuple[list[Row], dict[str, Any]]:
    settings = ctx.settings
    size = settings.stall_bytes
    head = ["head", "-c", size_arg(size), "/dev/zero"]
    server = ctx.server("stalled")
    runs: dict[str, list[dict[str, Any]]] = {}

    def one(name: str, window: int | None) -> float:
        staller = None
        if window is not None:
            staller = ctx.workspace.spawn(
                server.clients_command("stall", "--window", str(window)), env=server.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            expect_line(staller, "ready")
        with RssSampler(server.pid) as sampler:
            began = time.perf_counter()
            job_id = server.start_job(*head)
            if staller is not None:
                staller.stdin.write(job_id.encode() + b"\n")  # type: ignore[union-attr]  # spawned with stdin=PIPE
                staller.stdin.flush()  # type: ignore[union-attr]  # spawned with stdin=PIPE
                expect_line(staller, "following")
            check(server.run("wait", job_id), "jobcli wait")
            wall = time.perf_counter() - began
        status = server.status(job_id)
        if status["output_bytes"] != size:
            raise BenchError(f"the job wrote {status['output_bytes']} bytes, expected {size}")
        if staller is not None:
            if staller.poll() is not None:
                raise BenchError(f"the stalled follower left before the job ended (exit status {staller.returncode})")
            staller.stdin.close()  # type: ignore[union-attr]  # spawned with stdin=PIPE
            staller.wait(30)
        server.prune()
        runs.setdefault(name, []).append(
            {
                "wall_s": wall,
                "job_s": status["ended_at"] - status["started_at"],
                "rss_baseline_bytes": sampler.baseline_bytes,
                "rss_peak_bytes": sampler.peak_bytes,
                "rss_growth_bytes": sampler.growth_bytes,
            }
        )
        return wall

    variants = {
        "no follower": lambda: one("no follower", None),
        "stalled follower": lambda: one("stalled follower", settings.stall_window),
        "stalled follower, 1 GiB window": lambda: one("stalled follower, 1 GiB window", GiB),
    }
    try:
        check(server.run("run", "--", "true"), "warm-up job")
        times = interleaved(settings.stall_runs, variants, warmup=0)
    finally:
        server.stop()
    base = median(times["no follower"])
    rows = []
    document: dict[str, Any] = {"bytes": size, "window": settings.stall_window, "runs": runs, "median_wall_s": {}}
    for name, goal_name in (("stalled follower", f"window {settings.stall_window // KiB} KiB"), ("stalled follower, 1 GiB window", "window 1 GiB: TCP and TLS buffers fill")):
        stalled = median(times[name])
        ratio = base / stalled
        growth = max(run["rss_growth_bytes"] for run in runs[name])
        document["median_wall_s"][name] = stalled
        document.setdefault("ratio", {})[name] = ratio
        document.setdefault("max_rss_growth_bytes", {})[name] = growth
        rows.append(Row("stalled", f"{size_label(size)} job, {goal_name}: job time without / with the follower (`jobcli start` to `jobcli wait` returning)", ms(stalled), f"{ms(base)} alone", f"{ratio:.2f}", "≥ 0.9", ratio >= 0.9))
        job_base = median([run["job_s"] for run in runs["no follower"]])
        job_stalled = median([run["job_s"] for run in runs[name]])
        document.setdefault("ratio_job_s", {})[name] = job_base / job_stalled
        rows.append(Row("stalled", f"{goal_name}: the same from the server's record (job started to ended)", ms(job_stalled), f"{ms(job_base)} alone", f"{job_base / job_stalled:.2f}", "(info)"))
        rows.append(Row("stalled", f"{goal_name}: server RSS growth during the job (max of runs)", mib(growth), mib(max(run["rss_growth_bytes"] for run in runs["no follower"])) + " alone", "", "≤ 64 MiB", growth <= 64 * MiB))
    document["median_wall_s"]["no follower"] = base
    return rows, document


def expect_line(process: subprocess.Popen[bytes], key: str, timeout: float = 30.0) -> dict[str, Any]:
    """
    Read one JSON line from a clients.py process; it must hold C{key}.
    """
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline()), daemon=True)  # type: ignore[union-attr]  # spawned with stdout=PIPE
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        raise BenchError(f"clients.py said nothing ({key!r} expected; exit status {process.poll()})")
    document: dict[str, Any] = json.loads(result[0])
    if key not in document:
        raise BenchError(f"clients.py said {document!r}, expected {key!r}")
    return document
