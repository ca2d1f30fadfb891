"""
One module per benchmark, each with one function that takes the
L{bench.harness.servers.Context} and returns its rows of the summary table
and its JSON document.  L{RUNNERS} names them as C{--only} does, in the
order a full run takes them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.benchmarks import fanout, overhead, run, scale, stalled, status, throughput
from bench.harness.results import Row
from bench.harness.servers import Context

RUNNERS: dict[str, Callable[[Context], tuple[list[Row], dict[str, Any]]]] = {
    "status": status.bench_status,
    "run": run.bench_run,
    "throughput": throughput.bench_throughput,
    "fanout": fanout.bench_fanout,
    "stalled": stalled.bench_stalled,
    "overhead": overhead.bench_overhead,
    "scale": scale.bench_scale,
}
