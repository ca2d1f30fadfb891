"""
C{status}: wall time of C{jobcli status ID} for a finished job beside
C{ssh … true}.  Goal: ratio ≤ 0.5.
"""

from __future__ import annotations

from typing import Any

from bench.harness.processes import BenchError, check, run_timed
from bench.harness.results import Row, interleaved, median, ms
from bench.harness.servers import Context


def bench_status(ctx: Context) -> tuple[list[Row], dict[str, Any]]:
    server = ctx.server("status")
    try:
        job_id = server.start_job("true")
        check(server.run("wait", job_id), "jobcli wait")

        def status() -> float:
            timing = check(server.run("status", job_id), "jobcli status")
            if b"exited" not in timing.stdout:
                raise BenchError(f"jobcli status printed {timing.stdout[:300]!r}")
            return timing.wall_s

        def ssh_true() -> float:
            return check(run_timed(ctx.ssh.command("true"), capture=True), "ssh true").wall_s

        times = interleaved(ctx.settings.latency_runs, {"jobcli status": status, "ssh true": ssh_true})
    finally:
        server.stop()
    jobworker, reference = median(times["jobcli status"]), median(times["ssh true"])
    ratio = jobworker / reference
    row = Row("status", "`jobcli status ID` vs `ssh … true`, median wall", ms(jobworker), ms(reference), f"{ratio:.2f}", "≤ 0.5", ratio <= 0.5)
    return [row], {"seconds": times, "median_s": {"jobcli status": jobworker, "ssh true": reference}, "ratio": ratio}
