"""
C{scale}: how the cost of work grows with the work (issue 17): each row of
its table at two or three sizes, with the growth from the smallest size to
the largest printed beside it.

- start + wait of C{true}, one after another on one connection, beside a
  bare C{unshare --pid --mount --net --fork true} run as often in the same
  run (goal: ≥ 100 jobs/s and ≥ 0.25× the bare rate);
- for K running C{sleep} jobs (K = 100, 500, 1000; C{--quick}: 20, 100):
  the time to start them (goal at 500: ≤ 5 s), memory per running job
  (PSS of the processes that supervise them plus the server's RSS growth;
  goal ≤ 1 MiB), C{status} of one of them (goal ≤ 5 ms with 1000), and a
  forced stop of all of them (goal at 500: ≤ 5 s) while a second client
  asks for a status again and again (goal: each ≤ 20 ms);
- for R finished job records in the state directory (R = 1,000 and
  10,000): the server's start-up beyond that of an empty one (goal: ≤ 1 s
  per 10,000), a C{list} page of 100 (goal ≤ 20 ms), the whole list as the
  client library reads it (goal ≥ 20,000 jobs/s), and C{jobcli list -q}.

Every figure is taken through the project's own C{BlockingClient} on one
connection (C{bench/clients.py}), so C{jobcli}'s own start-up counts only
in the C{jobcli list} row.
"""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

from bench.harness.proc import descendants, proc_comm, proc_status_kib, smaps_rollup_kib, wait_for_no_descendants
from bench.harness.processes import BenchError, check
from bench.harness.results import Row, median, ms, say
from bench.harness.servers import Context, JobworkerServer
from bench.harness.settings import CLIENTS, VENV_BIN, KiB, MiB

# The server's defaults, with caps raised so that the largest size fits.
SERVER_OPTIONS = ("--max-jobs-per-identity", "5000", "--max-finished-jobs", "50000")

UNSHARE = ["unshare", "--pid", "--mount", "--net", "--fork", "true"]


def _p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def _growth(values: dict[int, float]) -> str:
    """
    How a figure grew from the smallest size to the largest: "×4.8 for ×5".
    """
    low, high = min(values), max(values)
    if low == high or not values[low]:
        return ""
    return f"×{values[high] / values[low]:.2f} for ×{high / low:g}"


def _bare_unshare(count: int) -> float:
    """
    Seconds per C{unshare --pid --mount --net --fork true}, one after
    another, as a subprocess of this (stdlib) process.
    """
    began = time.perf_counter()
    for _ in range(count):
        subprocess.run(UNSHARE, check=True, stdin=subprocess.DEVNULL)
    return (time.perf_counter() - began) / count


def _file_create(directory: str, count: int) -> float:
    """
    The median seconds to create (and close) an empty file in C{directory},
    as a start creates its job's files there.  Context for the start rate:
    on these machines it has measured from 0.03 to 0.9 ms, depending on
    where the file system put the directory (the inode allocation), and it
    moved the start rate from 51/s to 35/s with nothing else changed.
    """
    seconds = []
    for number in range(count):
        path = os.path.join(directory, f".bench-create-{number}")
        began = time.perf_counter()
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        seconds.append(time.perf_counter() - began)
        os.unlink(path)
    return median(seconds)


def _start_wait(ctx: Context, rows: list[Row], document: dict[str, Any]) -> None:
    count = ctx.settings.scale_start_wait_jobs
    server = ctx.server("scale-start", *SERVER_OPTIONS)
    try:
        check(server.run("run", "--", "true"), "warm-up job")
        bare = _bare_unshare(min(count, 20))  # a warm-up of the reference too
        bare = _bare_unshare(count)
        result = server.clients("start-wait", "--count", str(count), "--", "true")
        create = _file_create(os.path.join(server.state_dir, "jobs"), 100)
    finally:
        server.stop()
    seconds = result["seconds"]
    rate = len(seconds) / sum(seconds)
    bare_rate = 1 / bare
    ratio = rate / bare_rate
    document["start_wait"] = {
        "jobs": count, "seconds": seconds, "rate_per_s": rate, "bare_unshare_s": bare, "bare_rate_per_s": bare_rate,
        "file_create_s": create,
    }  # fmt: skip
    say(f"scale: a file created in the jobs' directory took {ms(create)} (median of 100); a start creates five")
    rows.append(
        Row(
            "scale",
            f"start + wait of `true`, {count} one after another: jobs/s (median {ms(median(seconds))} each)",
            f"{rate:.1f}/s",
            f"bare `{' '.join(UNSHARE)}`: {bare_rate:.0f}/s",
            f"{ratio:.2f}",
            "≥ 100/s and ≥ 0.25",
            rate >= 100 and ratio >= 0.25,
        )
    )


def _memory(server: JobworkerServer, jobs: int, rss_before: int) -> dict[str, Any]:
    """
    PSS of every process under the server that is not a job's command, and
    the server's own RSS growth, per job.
    """
    pss = 0
    supervisors = 0
    for pid in descendants(server.pid):
        if proc_comm(pid) == "sleep":
            continue
        try:
            pss += smaps_rollup_kib(pid).get("Pss", 0) * KiB
        except OSError:
            continue
        supervisors += 1
    growth = proc_status_kib(server.pid, "VmRSS") * KiB - rss_before
    return {"supervisor_processes": supervisors, "supervisor_pss_bytes": pss, "server_rss_growth_bytes": growth, "per_job_bytes": (pss + growth) / jobs}


def _running(ctx: Context, rows: list[Row], document: dict[str, Any]) -> None:
    sizes = ctx.settings.scale_running_sizes
    results: dict[int, dict[str, Any]] = {}
    for size in sizes:
        server = ctx.server(f"scale-running-{size}", *SERVER_OPTIONS)
        ids: list[str] = []
        try:
            finished = server.start_job("true")
            check(server.run("wait", finished), "jobcli wait")
            time.sleep(0.3)
            rss_before = proc_status_kib(server.pid, "VmRSS") * KiB
            started = server.clients("start-many", "--count", str(size), "--", "sleep", "600", timeout=1200)
            ids = started["ids"]
            server.clients("running", "--timeout", "300", *ids, timeout=600)
            time.sleep(1.0)  # the helpers settle after exec
            memory = _memory(server, size, rss_before)
            status = server.clients("status-latency", "--count", "50", ids[len(ids) // 2])["seconds"]
            stopped = server.clients("stop-all", "--probe", finished, *ids, timeout=1200)
            ids = []
            if stopped["states"] != ["stopped"]:
                # Reported in its row, not an end to the benchmark.
                say(f"scale: after the forced stop of {size} jobs their states are {stopped['states']}")
            left = wait_for_no_descendants(server.pid)
        finally:
            if ids:
                try:
                    server.clients("stop-all", *ids, timeout=1200)
                except BenchError:
                    pass
            server.stop()
        results[size] = {
            "start_s": started["seconds"],
            "memory": memory,
            "status_s": status,
            "status_median_s": median(status),
            "stop_s": stopped["seconds"],
            "stop_requests_s": stopped["requests_s"],
            "probe_s": stopped["probe_seconds"],
            "probe_max_s": max(stopped["probe_seconds"], default=float("nan")),
            "probe_p99_s": _p99(stopped["probe_seconds"]),
            "processes_left": left,
            "states_after_stop": stopped["states"],
            "state_counts_after_stop": stopped.get("counts", {}),
        }
        say(f"scale: {size} running: started in {started['seconds']:.2f} s, {memory['per_job_bytes'] / MiB:.2f} MiB each, "
            f"status {ms(median(status))}, stopped in {stopped['seconds']:.2f} s (status meanwhile: max {ms(results[size]['probe_max_s'])})")  # fmt: skip
    document["running"] = results
    start = {size: results[size]["start_s"] for size in sizes}
    memory_each = {size: results[size]["memory"]["per_job_bytes"] for size in sizes}
    status_each = {size: results[size]["status_median_s"] for size in sizes}
    stop = {size: results[size]["stop_s"] for size in sizes}
    probe = {size: results[size]["probe_max_s"] for size in sizes}
    largest = max(sizes)

    def sized(values: dict[int, float], show: Any) -> str:
        return ", ".join(f"{size}: {show(values[size])}" for size in sizes)

    # The goals, for 500 jobs, as rates: 500 started in ≤ 5 s is
    # ≥ 100 a second; 500 stopped in ≤ 5 s is ≤ 10 ms each.
    rows.append(Row("scale", f"`sleep` jobs started on one connection, {'/'.join(map(str, sizes))} jobs: seconds (jobs/s)", ", ".join(f"{size}: {start[size]:.2f} s ({size / start[size]:.0f}/s)" for size in sizes), "", _growth(start), "≥ 100/s (500 in ≤ 5 s)", all(size / start[size] >= 100 for size in sizes)))
    rows.append(Row("scale", "memory per running job: (PSS of supervising processes + server RSS growth) / jobs", sized(memory_each, lambda b: f"{b / MiB:.2f} MiB"), "", _growth(memory_each), "≤ 1 MiB", max(memory_each.values()) <= MiB))
    rows.append(Row("scale", "`status` of a running job, median", sized(status_each, ms), "", _growth(status_each), f"≤ 5 ms (at {largest})", status_each[largest] <= 0.005))
    rows.append(Row("scale", "forced stop of every running job, until all have ended: seconds (per job)", ", ".join(f"{size}: {stop[size]:.2f} s ({stop[size] / size * 1000:.1f} ms)" for size in sizes), "", _growth(stop), "≤ 10 ms each (500 in ≤ 5 s)", all(stop[size] / size <= 0.010 for size in sizes)))
    wrong = {size: results[size]["state_counts_after_stop"] for size in sizes if results[size]["states_after_stop"] != ["stopped"]}
    rows.append(Row("scale", "… every job `stopped` after it (states otherwise, by count)", "yes" if not wrong else "; ".join(f"{size}: {counts}" for size, counts in wrong.items()), "", "", "all stopped", not wrong))
    rows.append(Row("scale", "… another client's `status` meanwhile, slowest", sized(probe, ms), "", "", "≤ 20 ms", max(probe.values()) <= 0.020))


def _make_records(state_dir: str, count: int) -> None:
    result = subprocess.run(
        [os.path.join(VENV_BIN, "python"), CLIENTS, "make-records", "--count", str(count), state_dir],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=600,
    )  # fmt: skip
    if result.returncode != 0:
        raise BenchError(f"clients.py make-records exited {result.returncode}: {result.stderr.decode(errors='replace')[-2000:]}")


def _records(ctx: Context, rows: list[Row], document: dict[str, Any]) -> None:
    sizes = ctx.settings.scale_record_sizes
    # An empty state directory first: the start-up that does not depend on
    # the records (twistd, imports, TLS, the helper's compilation).
    empty = []
    for attempt in range(3):
        server = ctx.server(f"scale-empty-{attempt}", *SERVER_OPTIONS)
        empty.append(server.startup_s)
        server.stop()
    base = min(empty)  # the first start of all is the slowest (cold caches)
    results: dict[int, dict[str, Any]] = {}
    for size in sizes:
        state_dir = ctx.workspace.path(f"state-scale-records-{size}")
        _make_records(state_dir, size)
        server = ctx.server(f"scale-records-{size}", *SERVER_OPTIONS, state_dir=state_dir)
        try:
            startup = server.startup_s
            timing = server.clients("list-timing", "--pages", "20", "--expect", "100", timeout=600)
            if timing["jobs"] != size:
                raise BenchError(f"the list of {size} records has {timing['jobs']} jobs")
            cli = check(server.run("list", "-q"), "jobcli list -q")
            if len(cli.stdout.splitlines()) != size:
                raise BenchError(f"jobcli list -q printed {len(cli.stdout.splitlines())} lines for {size} jobs")
        finally:
            server.stop()
        results[size] = {
            "startup_s": startup,
            "startup_beyond_empty_s": startup - base,
            "page_s": timing["page_seconds"],
            "page_median_s": median(timing["page_seconds"]),
            "page_max_s": max(timing["page_seconds"]),
            "list_s": timing["list_seconds"],
            "list_rate_per_s": size / timing["list_seconds"],
            "jobcli_list_s": cli.wall_s,
        }
        say(f"scale: {size} records: start-up {startup:.2f} s ({startup - base:+.2f} s beyond an empty one), page of 100 {ms(results[size]['page_median_s'])}, "
            f"whole list {size / timing['list_seconds']:.0f} jobs/s, jobcli list -q {cli.wall_s:.2f} s")  # fmt: skip
    document["records"] = {"empty_startup_s": empty, **{str(size): value for size, value in results.items()}}
    beyond = {size: results[size]["startup_beyond_empty_s"] for size in sizes}
    page = {size: results[size]["page_median_s"] for size in sizes}
    rate = {size: results[size]["list_rate_per_s"] for size in sizes}
    cli_s = {size: results[size]["jobcli_list_s"] for size in sizes}

    def sized(values: dict[int, float], show: Any) -> str:
        return ", ".join(f"{size:,}: {show(values[size])}" for size in sizes)

    rows.append(Row("scale", "server start-up with N finished records, beyond an empty state directory's", sized(beyond, lambda s: f"{s:.2f} s"), f"empty: {base:.2f} s", _growth(beyond), "≤ 1 s per 10,000", all(beyond[n] <= n / 10_000 for n in sizes)))
    rows.append(Row("scale", "`list`: a page of 100, median", sized(page, ms), "", _growth(page), "≤ 20 ms", max(page.values()) <= 0.020))
    rows.append(Row("scale", "`list`: every job, pages that fit a frame, as the client library reads them", sized(rate, lambda r: f"{r:,.0f} jobs/s"), "", "", "≥ 20,000 jobs/s", min(rate.values()) >= 20_000))
    rows.append(Row("scale", "`jobcli list -q`, wall (its own start-up included)", sized(cli_s, lambda s: f"{s:.2f} s"), "", _growth(cli_s), "(info)"))


def bench_scale(ctx: Context) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    document: dict[str, Any] = {"server_options": list(SERVER_OPTIONS)}
    _start_wait(ctx, rows, document)
    _records(ctx, rows, document)
    _running(ctx, rows, document)
    return rows, document
