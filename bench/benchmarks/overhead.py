"""
C{overhead}: memory per running job (the helpers' PSS and the server's RSS
growth; goal ≤ 4 MiB) and the start latency that isolation adds (goal
≤ +50 ms).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bench.harness.proc import (
    descendants,
    proc_comm,
    proc_status_kib,
    smaps_rollup_kib,
    wait_for_no_descendants,
    wait_for_sleeps,
)
from bench.harness.processes import BenchError, check
from bench.harness.results import Row, interleaved, median, mib, ms
from bench.harness.servers import Context, JobworkerServer
from bench.harness.settings import KiB, MiB


def bench_overhead(ctx: Context) -> tuple[list[Row], dict[str, Any]]:
    settings = ctx.settings
    jobs = settings.overhead_jobs
    isolated = ctx.server("overhead")
    direct = ctx.server("overhead-no-isolation", "--no-isolation")
    job_ids: list[str] = []
    try:
        for server in (isolated, direct):
            check(server.run("run", "--", "true"), "warm-up job")
        time.sleep(0.5)
        rss_before = proc_status_kib(isolated.pid, "VmRSS") * KiB
        job_ids = isolated.clients("start", "--count", str(jobs), "--", "sleep", "300")
        isolated.clients("running", *job_ids)
        sleeps = wait_for_sleeps(isolated.pid, jobs)
        time.sleep(1.0)  # let the helpers settle after exec
        rss_after = proc_status_kib(isolated.pid, "VmRSS") * KiB
        helpers: list[dict[str, Any]] = []
        for pid in descendants(isolated.pid):
            comm = proc_comm(pid)
            if comm == "sleep":
                continue
            try:
                rollup = smaps_rollup_kib(pid)
            except OSError:
                continue  # gone meanwhile
            helpers.append({"pid": pid, "comm": comm, "pss_kib": rollup.get("Pss", 0), "pss_anon_kib": rollup.get("Pss_Anon", 0), "pss_file_kib": rollup.get("Pss_File", 0), "uss_kib": rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0), "rss_kib": rollup.get("Rss", 0)})
        stopped = isolated.clients("stop", *job_ids)
        if any(state == "running" for state in stopped.values()):
            raise BenchError(f"jobs still running after stop: {stopped}")
        job_ids = []
        left = wait_for_no_descendants(isolated.pid)

        def start_latency(server: JobworkerServer) -> Callable[[], float]:
            return lambda: check(server.run("run", "--", "true"), f"jobcli run -- true ({server.name})").wall_s

        times = interleaved(settings.overhead_latency_runs, {"isolation": start_latency(isolated), "no isolation": start_latency(direct)})
    finally:
        if job_ids:
            try:
                isolated.clients("stop", *job_ids)
            except BenchError:
                pass
        isolated.stop()
        direct.stop()
    pss = sum(helper["pss_kib"] for helper in helpers) * KiB
    uss = sum(helper["uss_kib"] for helper in helpers) * KiB
    pss_anon = sum(helper["pss_anon_kib"] for helper in helpers) * KiB
    pss_file = sum(helper["pss_file_kib"] for helper in helpers) * KiB
    growth = rss_after - rss_before
    per_job_pss = (pss + growth) / jobs
    per_job_uss = (uss + growth) / jobs
    with_iso, without = median(times["isolation"]), median(times["no isolation"])
    added = with_iso - without
    rows = [
        Row("overhead", f"memory per running job, {jobs} × `sleep 300`: (PSS of helpers + server RSS growth) / jobs", mib(per_job_pss), f"USS-based: {mib(per_job_uss)}", "", "≤ 4 MiB", per_job_pss <= 4 * MiB),
        Row("overhead", f"… of which helpers' anonymous / file-backed PSS, {len(helpers) / jobs:g} helper processes per job", f"{mib(pss_anon / jobs)} / {mib(pss_file / jobs)}", f"server: {mib(growth / jobs)}", "", "(info)"),
        Row("overhead", "`jobcli run -- true` with isolation vs `--no-isolation`, median wall (added)", ms(with_iso), ms(without), f"+{added * 1000:.1f} ms", "≤ +50 ms", added <= 0.050),
    ]
    document = {
        "jobs": jobs,
        "helper_processes": len(helpers),
        "helpers_per_job": len(helpers) / jobs,
        "sleep_processes": sleeps,
        "helper_pss_bytes": pss,
        "helper_uss_bytes": uss,
        "helper_pss_anon_bytes": pss_anon,
        "helper_pss_file_bytes": pss_file,
        "server_rss_before_bytes": rss_before,
        "server_rss_after_bytes": rss_after,
        "server_rss_growth_bytes": growth,
        "per_job_pss_bytes": per_job_pss,
        "per_job_uss_bytes": per_job_uss,
        "processes_left_after_stop": left,
        "helpers": helpers,
        "start_latency_s": times,
        "median_start_latency_s": {"isolation": with_iso, "no isolation": without},
        "added_s": added,
    }
    return rows, document
