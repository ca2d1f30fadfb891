"""
Where things are, the units figures are given in, and the sizes and
repetitions of a run (L{Settings}).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH)
VENV_BIN = os.path.join(REPO, ".venv", "bin")
RESULTS = os.path.join(BENCH, "results")
CLIENTS = os.path.join(BENCH, "clients.py")
SSHD = "/usr/sbin/sshd"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000  # throughput is reported in MB/s, 10^6 bytes per second


@dataclass
class Settings:
    """
    Sizes and repetitions; C{quick()} shrinks them for development.
    """

    quick: bool = False
    latency_runs: int = 20
    throughput_bytes: int = GiB
    throughput_runs: int = 5
    fanout_bytes: int = 100 * MiB
    fanout_followers: int = 100
    fanout_streams_per_process: int = 10
    fanout_mode: str = "threads"
    stall_bytes: int = GiB
    stall_runs: int = 5
    stall_window: int = 64 * KiB
    overhead_jobs: int = 100
    overhead_latency_runs: int = 20
    scale_start_wait_jobs: int = 200
    scale_running_sizes: tuple[int, ...] = (100, 500, 1000)
    scale_record_sizes: tuple[int, ...] = (1000, 10_000)
    py_spy: str | None = None

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if not quick:
            return cls()
        return cls(
            quick=True,
            latency_runs=5,
            throughput_bytes=256 * MiB,
            throughput_runs=1,
            fanout_bytes=16 * MiB,
            fanout_followers=20,
            stall_bytes=256 * MiB,
            stall_runs=1,
            overhead_jobs=20,
            overhead_latency_runs=5,
            scale_start_wait_jobs=50,
            scale_running_sizes=(20, 100),
        )


def size_arg(size: int) -> str:
    return f"{size // GiB}G" if size % GiB == 0 else f"{size // MiB}M"


def size_label(size: int) -> str:
    return f"{size // GiB} GiB" if size % GiB == 0 else f"{size // MiB} MiB"
