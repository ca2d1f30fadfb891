"""
C{run}: C{jobcli run -- echo hi} beside C{ssh … echo hi}.  Goal: ratio ≤ 1.0.
"""

from __future__ import annotations

from typing import Any

from bench.harness.processes import check, run_timed
from bench.harness.results import Row, interleaved, median, ms
from bench.harness.servers import Context


def bench_run(ctx: Context) -> tuple[list[Row], dict[str, Any]]:
    server = ctx.server("run")
    try:

        def jobcli_run() -> float:
            return check(server.run("run", "--", "echo", "hi"), "jobcli run -- echo hi", b"hi\n").wall_s

        def ssh_echo() -> float:
            return check(run_timed(ctx.ssh.command("echo", "hi"), capture=True), "ssh echo hi", b"hi\n").wall_s

        times = interleaved(ctx.settings.latency_runs, {"jobcli run": jobcli_run, "ssh": ssh_echo})
    finally:
        server.stop()
    jobworker, reference = median(times["jobcli run"]), median(times["ssh"])
    ratio = jobworker / reference
    row = Row("run", "`jobcli run -- echo hi` vs `ssh … echo hi`, median wall", ms(jobworker), ms(reference), f"{ratio:.2f}", "≤ 1.0", ratio <= 1.0)
    return [row], {"seconds": times, "median_s": {"jobcli run": jobworker, "ssh": reference}, "ratio": ratio}
