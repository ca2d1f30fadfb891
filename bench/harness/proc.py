"""
Measurements read from /proc: a process's CPU time (its own and its reaped
children's), its RSS (sampled in a thread) and peak, PSS and USS from
smaps_rollup, and its descendants.
"""

from __future__ import annotations

import os
import threading
import time

from bench.harness.processes import BenchError
from bench.harness.settings import KiB


def proc_status_kib(pid: int, key: str) -> int:
    """
    A C{kB} field of /proc/PID/status (C{VmRSS}, C{VmHWM}), in KiB.
    """
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> bool:
    """
    Reset VmHWM to the current RSS (writing 5 to clear_refs, Linux >= 4.0),
    so that the peak measured is the benchmark's, not the start-up's.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def proc_cpu_s(pid: int) -> float:
    """
    User plus system CPU seconds of one process (not its children).
    """
    user, system, _ = proc_cpu_split(pid)
    return user + system


def proc_cpu_split(pid: int) -> tuple[float, float, int]:
    """
    User and system CPU seconds of one process (all its threads), and its
    minor page faults.
    """
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick, int(fields[7])


def proc_children_cpu_s(pid: int) -> float:
    """
    User plus system CPU seconds of the children a process has reaped
    (C{cutime} + C{cstime}): for the server, its jobs; for sshd, its
    sessions and the commands they ran.
    """
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    pending = list(children.get(pid, []))
    while pending:
        child = pending.pop()
        found.append(child)
        pending.extend(children.get(child, []))
    return sorted(found)


def proc_comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def smaps_rollup_kib(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                values[parts[0].rstrip(":")] = int(parts[1])
    return values


def wait_for_sleeps(pid: int, count: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        found = sum(proc_comm(child) == "sleep" for child in descendants(pid))
        if found >= count:
            return found
        if time.monotonic() > deadline:
            raise BenchError(f"only {found} of {count} sleep jobs are running after {timeout:.0f} s")
        time.sleep(0.1)


def wait_for_no_descendants(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        left = len(descendants(pid))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


class RssSampler:
    """
    Samples a process's VmRSS every C{interval} seconds in a thread.
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples_kib: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self.samples_kib.append(proc_status_kib(self.pid, "VmRSS"))
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples_kib.append(proc_status_kib(self.pid, "VmRSS"))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples_kib.append(proc_status_kib(self.pid, "VmRSS"))
            except (OSError, BenchError):
                return

    @property
    def baseline_bytes(self) -> int:
        return self.samples_kib[0] * KiB

    @property
    def peak_bytes(self) -> int:
        return max(self.samples_kib) * KiB

    @property
    def growth_bytes(self) -> int:
        return self.peak_bytes - self.baseline_bytes
