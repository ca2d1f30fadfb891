"""
A row of the summary table, medians and the units rows print, interleaved
rounds of measurements, the JSON results and printing.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bench.harness.settings import MB, RESULTS, MiB


@dataclass
class Row:
    """
    One line of the summary table.  C{ratio} is jobworker against the
    reference, in the sense its goal is stated (see the goal column).
    """

    benchmark: str
    measure: str
    jobworker: str
    reference: str = ""
    ratio: str = ""
    goal: str = ""
    met: bool | None = None

    def markdown(self) -> str:
        verdict = "" if self.met is None else ("met" if self.met else "**MISSED**")
        cells = (self.benchmark, self.measure, self.jobworker, self.reference, self.ratio, self.goal, verdict)
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


TABLE_HEAD = (
    "| benchmark | measure | jobworker | reference | ratio | goal | verdict |\n"
    "|---|---|---|---|---|---|---|"
)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def mbps(size: int, seconds: float) -> float:
    return size / seconds / MB


def mib(size_bytes: float) -> str:
    return f"{size_bytes / MiB:.1f} MiB"


def write_json(name: str, document: dict[str, Any]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.json"), "w") as handle:
        json.dump(document, handle, indent=2, sort_keys=False)
        handle.write("\n")


def say(text: str = "") -> None:
    print(text, flush=True)


def interleaved(runs: int, variants: dict[str, Callable[[], float]], warmup: int = 1) -> dict[str, list[float]]:
    """
    Run every variant once per round, C{runs} rounds after C{warmup}
    unrecorded ones, alternating so that the machine's other load (other
    people's tests) falls on every variant alike.
    """
    results: dict[str, list[float]] = {name: [] for name in variants}
    for round_number in range(warmup + runs):
        for name, measure in variants.items():
            value = measure()
            if round_number >= warmup:
                results[name].append(value)
    return results
