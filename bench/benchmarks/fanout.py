"""
C{fanout}: one job's output followed by many clients at once: the aggregate
rate, every follower's digest against the output computed independently,
and the server's RSS.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import time
from typing import Any

from bench.harness.proc import RssSampler, proc_cpu_s, proc_status_kib, reset_peak_rss
from bench.harness.processes import BenchError, check, run_timed
from bench.harness.results import Row, mbps, mib
from bench.harness.servers import Context, JobworkerServer
from bench.harness.settings import KiB, MiB

# The fanout job: N distinct MiB blocks, cheap to make (one SHA-256 chain
# per run, then a counter stamped on each copy) and not constant, so that a
# follower that skips, repeats or reorders blocks gets a different digest.
FANOUT_PROGRAM = """
import hashlib, sys
block = bytearray(b"".join(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(32768)))
out = sys.stdout.buffer
for n in range(int(sys.argv[1])):
    block[:8] = n.to_bytes(8, "big")
    out.write(block)
out.flush()
"""


def bench_fanout(ctx: Context) -> tuple[list[Row], dict[str, Any]]:
    settings = ctx.settings
    blocks = settings.fanout_bytes // MiB
    size = blocks * MiB
    followers = settings.fanout_followers
    argv = ["python3", "-c", FANOUT_PROGRAM, str(blocks)]
    # The expected digest, independently: the same program run here.
    local = subprocess.run(argv, stdout=subprocess.PIPE, check=True)
    expected = hashlib.sha256(local.stdout).hexdigest()
    if len(local.stdout) != size:
        raise BenchError(f"the fanout program wrote {len(local.stdout)} bytes here, expected {size}")
    del local
    server = ctx.server("fanout")
    try:
        check(server.run("run", "--", "true"), "warm-up job")
        reset = reset_peak_rss(server.pid)
        with RssSampler(server.pid) as sampler:
            server_cpu = proc_cpu_s(server.pid)
            job_id = server.start_job(*argv)
            began = time.perf_counter()
            results = follow_all(ctx, server, job_id, followers)
            elapsed = time.perf_counter() - began
            server_cpu = proc_cpu_s(server.pid) - server_cpu
        hwm = proc_status_kib(server.pid, "VmHWM") * KiB
        status = server.status(job_id)
        # And the job's output as the server kept it, read once more.
        stored = run_timed(server.jobcli("logs", job_id), env=server.env, capture=True)
        stored_digest = hashlib.sha256(check(stored, "jobcli logs").stdout).hexdigest()
        del stored
    finally:
        server.stop()
    digests = [result.get("sha256") for result in results]
    errors = [result["error"] for result in results if "error" in result]
    all_equal = len(set(digests)) == 1 and digests[0] == expected == stored_digest and status["output_bytes"] == size
    aggregate = mbps(size * followers, elapsed)
    job_s = (status["ended_at"] or 0) - (status["started_at"] or 0)
    mode = settings.fanout_mode
    how = (
        f"{followers} followers as {math.ceil(followers / settings.fanout_streams_per_process)} processes × {settings.fanout_streams_per_process} connections (threads)"
        if mode == "threads"
        else f"{followers} `jobcli logs -f ID | sha256sum` pipelines"
    )
    rows = [
        Row("fanout", f"{mib(size)} job, {how}: aggregate MB/s", f"{aggregate:.0f}", "", "", "(info)"),
        Row(
            "fanout",
            "all digests equal, and equal to the job's output computed independently",
            f"{sum(d == expected for d in digests)}/{followers} equal",
            expected[:12] + "…",
            "",
            "all equal",
            all_equal and not errors,
        ),
        Row("fanout", "server peak RSS (sampled every 100 ms; VmHWM reset before the job)", mib(sampler.peak_bytes), f"before: {mib(sampler.baseline_bytes)}; VmHWM {mib(hwm)}", f"+{mib((sampler.peak_bytes - sampler.baseline_bytes) / followers)} per follower", "(info)"),
    ]
    document = {
        "bytes_per_follower": size,
        "followers": followers,
        "mode": mode,
        "streams_per_process": settings.fanout_streams_per_process,
        "elapsed_s": elapsed,
        "aggregate_mb_per_s": aggregate,
        "job_run_s": job_s,
        "server_cpu_s": server_cpu,
        "expected_sha256": expected,
        "stored_sha256": stored_digest,
        "all_equal": all_equal,
        "errors": errors[:10],
        "rss": {"baseline_bytes": sampler.baseline_bytes, "peak_sampled_bytes": sampler.peak_bytes, "vm_hwm_bytes": hwm, "hwm_was_reset": reset, "samples_kib": sampler.samples_kib},
        "followers_detail": results,
    }
    return rows, document


def follow_all(ctx: Context, server: JobworkerServer, job_id: str, followers: int) -> list[dict[str, Any]]:
    settings = ctx.settings
    processes: list[subprocess.Popen[bytes]] = []
    if settings.fanout_mode == "threads":
        per = settings.fanout_streams_per_process
        remaining = followers
        while remaining > 0:
            streams = min(per, remaining)
            remaining -= streams
            processes.append(
                ctx.workspace.spawn(server.clients_command("follow", "--streams", str(streams), job_id), env=server.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
            )
    else:
        jobcli = " ".join(server.jobcli("logs", "-f", job_id))
        for _ in range(followers):
            processes.append(
                ctx.workspace.spawn(["sh", "-c", f"{jobcli} | sha256sum"], env=server.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
            )
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    results: list[dict[str, Any]] = []
    for process, output in zip(processes, outputs):
        if settings.fanout_mode == "threads":
            if process.returncode != 0:
                raise BenchError(f"a follower process exited with {process.returncode}")
            results.extend(json.loads(output))
        else:
            digest = output.decode().split()[0] if output.strip() else ""
            results.append({"sha256": digest, "returncode": process.returncode})
    return results
