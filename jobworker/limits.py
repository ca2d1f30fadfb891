"""
Resource limits of a job, and the parsers for their human spellings.

Pure: no I/O.  Every parser here reads untrusted input (a client's start
request, a command-line option) and raises L{LimitError} with a message fit
for the user; none of them returns a silently clamped value.

Units on the wire and in L{Limits}: CPU in millicores (1000 = one core),
sizes and rates in bytes (per second), durations in milliseconds, process
count as a plain number.  C{0} means "not set" (the server's default
applies), never "unlimited": unlimited is spelled by leaving the server's
default unset.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields, replace
from fractions import Fraction

__all__ = [
    "LIMIT_CONTROLLERS",
    "LimitError",
    "Limits",
    "parse_cpu",
    "parse_size",
    "parse_duration",
    "parse_count",
    "format_size",
    "format_limit",
    "LIMIT_NAMES",
    "HOST_CAP_MEMORY_FRACTION",
    "HOST_CAP_CPU_FRACTION",
    "HOST_CAP_PIDS",
    "host_caps",
]


class LimitError(ValueError):
    """
    A limit is malformed, out of range, or above what the caller may ask for.
    """


# Upper bounds that keep every value inside its wire field and inside what
# the kernel accepts.  A limit beyond them is a typo, not a wish.
MAX_CPU_MILLICORES = 1024 * 1000  # 1024 cores
MAX_BYTES = 2**62
MAX_DURATION_MS = 365 * 24 * 3600 * 1000  # one year
MAX_PIDS = 4_194_304  # the kernel's PID_MAX_LIMIT

# The cgroup controller each limit field needs, as the drivers name them
# (a timeout needs none).
LIMIT_CONTROLLERS = {
    "cpu_millicores": "cpu",
    "memory_bytes": "memory",
    "io_read_bps": "io",
    "io_write_bps": "io",
    "pids": "pids",
}

# ASCII only: with Unicode case folding "ſ" would match "s" and "K" (Kelvin) "k".
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(i?b?)|(b?))\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?", re.IGNORECASE | re.ASCII)
_DURATION_UNITS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_size(text: str, *, what: str = "size") -> int:
    """
    Parse a byte count: C{"512"}, C{"64K"}, C{"256M"}, C{"1.5G"}, C{"1GiB"}.

    Suffixes are binary (K = 1024), as for C{docker --memory} and systemd's
    C{MemoryMax=}.

    @return: bytes, at least 1.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise LimitError(f"{what}: {text!r} is not a size (examples: 512K, 256M, 1G)")
    number, unit, _, _ = match.groups()
    # Exact arithmetic: a float would round byte counts above 2**53.
    value = Fraction(number) * _SIZE_UNITS[(unit or "").lower()]
    if value < 1 or value > MAX_BYTES:
        raise LimitError(f"{what}: {text!r} is out of range (1 byte to 4 EiB)")
    return int(value)


def parse_cpu(text: str) -> int:
    """
    Parse a CPU limit in cores (C{"0.5"}, C{"2"}) or millicores (C{"500m"}).

    @return: millicores, at least 1.
    """
    stripped = text.strip().lower()
    try:
        if stripped.endswith("m"):
            millicores = float(stripped[:-1])
        else:
            millicores = float(stripped) * 1000
    except ValueError:
        raise LimitError(f"cpu: {text!r} is not a number of cores (examples: 0.5, 2, 250m)") from None
    if not math.isfinite(millicores) or millicores < 1 or millicores > MAX_CPU_MILLICORES:
        raise LimitError(f"cpu: {text!r} is out of range (0.001 to 1024 cores)")
    return round(millicores)


def parse_duration(text: str) -> int:
    """
    Parse a duration: C{"30"} (seconds), C{"1.5s"}, C{"500ms"}, C{"5m"},
    C{"1h30m"}.

    @return: milliseconds, at least 1.
    """
    stripped = text.strip()
    position = 0
    total = 0.0
    if not stripped:
        raise LimitError("duration: empty")
    for match in _DURATION_RE.finditer(stripped):
        if match.start() != position:
            break
        number, unit = match.groups()
        total += float(number) * _DURATION_UNITS[(unit or "s").lower()]
        position = match.end()
    if position != len(stripped):
        raise LimitError(f"duration: {text!r} is not a duration (examples: 30s, 5m, 1h30m, 500ms)")
    if not math.isfinite(total) or total < 1 or total > MAX_DURATION_MS:
        raise LimitError(f"duration: {text!r} is out of range (1 ms to 365 days)")
    return int(total)


def parse_count(text: str, *, what: str = "pids") -> int:
    """
    Parse a process count limit, at least 1.
    """
    try:
        value = int(text.strip())
    except ValueError:
        raise LimitError(f"{what}: {text!r} is not a whole number") from None
    if value < 1 or value > MAX_PIDS:
        raise LimitError(f"{what}: {text!r} is out of range (1 to {MAX_PIDS})")
    return value


def format_size(value: int) -> str:
    """
    Format bytes the way L{parse_size} reads them back (exactly, when whole).
    """
    for unit in "PTGMK":
        scale = _SIZE_UNITS[unit.lower()]
        if value >= scale and value % scale == 0:
            return f"{value // scale}{unit}"
    return str(value)


# The user-facing name of each Limits field: jobcli's option, without "--".
LIMIT_NAMES = {
    "cpu_millicores": "cpu",
    "memory_bytes": "memory",
    "io_read_bps": "io-read-bps",
    "io_write_bps": "io-write-bps",
    "pids": "pids",
    "timeout_ms": "timeout",
}


def format_limit(name: str, value: int) -> str:
    """
    A Limits field's value the way a user spells it: C{"1.5"} (cores),
    C{"512M"}, C{"50M"} (bytes/s), C{"1024"}, C{"30s"}.
    """
    if name == "cpu_millicores":
        return f"{value / 1000:g}"
    if name == "timeout_ms":
        return f"{value / 1000:g}s"
    if name in ("memory_bytes", "io_read_bps", "io_write_bps"):
        return format_size(value) if value % 1024 == 0 else f"{value}"
    return str(value)


# Default caps for non-admin jobs, derived from the machine when the
# operator sets none (--max-memory, --max-cpu, --max-pids): one job of a
# user may take at most half the memory and half the CPUs (at least one
# core), so no single job can take the host; and 4096 tasks, four times the
# default pids limit, far below the kernel's 4 million.
HOST_CAP_MEMORY_FRACTION = Fraction(1, 2)
HOST_CAP_CPU_FRACTION = Fraction(1, 2)
HOST_CAP_PIDS = 4096


def host_caps(memory_bytes: int, cpus: int) -> Limits:
    """
    The default caps for non-admins on a machine with C{memory_bytes} of
    memory and C{cpus} CPUs: see L{HOST_CAP_MEMORY_FRACTION}.  Memory is
    rounded down to whole MiB, CPU to whole millicores.
    """
    memory = int(memory_bytes * HOST_CAP_MEMORY_FRACTION) // (1 << 20) * (1 << 20)
    millicores = max(1000, int(cpus * 1000 * HOST_CAP_CPU_FRACTION))
    return Limits(
        cpu_millicores=min(millicores, MAX_CPU_MILLICORES),
        memory_bytes=min(max(memory, 1 << 20), MAX_BYTES),
        pids=HOST_CAP_PIDS,
    )


@dataclass(frozen=True)
class Limits:
    """
    The resource limits of one job.  Every field is 0 when not set.

    @ivar cpu_millicores: CPU bandwidth, 1000 = one full core.
    @ivar memory_bytes: memory ceiling (swap is off for the job).
    @ivar io_read_bps: read bandwidth on each throttled block device, bytes/s.
    @ivar io_write_bps: write bandwidth on each throttled block device, bytes/s.
    @ivar pids: most tasks (processes and threads) alive at once.
    @ivar timeout_ms: wall-clock run time before the job is stopped.
    """

    cpu_millicores: int = 0
    memory_bytes: int = 0
    io_read_bps: int = 0
    io_write_bps: int = 0
    pids: int = 0
    timeout_ms: int = 0

    def __post_init__(self) -> None:
        bounds = {
            "cpu_millicores": MAX_CPU_MILLICORES,
            "memory_bytes": MAX_BYTES,
            "io_read_bps": MAX_BYTES,
            "io_write_bps": MAX_BYTES,
            "pids": MAX_PIDS,
            "timeout_ms": MAX_DURATION_MS,
        }
        for field in fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise LimitError(f"{field.name}: must be a whole number, not {value!r}")
            if value < 0 or value > bounds[field.name]:
                raise LimitError(f"{field.name}: {value} is out of range (0 to {bounds[field.name]})")

    def with_defaults(self, defaults: Limits) -> Limits:
        """
        Fill every unset field from C{defaults}.
        """
        return replace(
            self,
            **{
                f.name: getattr(defaults, f.name)
                for f in fields(self)
                if getattr(self, f.name) == 0
            },
        )

    def above(self, caps: Limits) -> list[str]:
        """
        Name the fields set above their cap (a cap of 0 means no cap; an
        unset field is above nothing).
        """
        return [
            f.name
            for f in fields(self)
            if getattr(caps, f.name) and getattr(self, f.name) > getattr(caps, f.name)
        ]

    def describe_above(self, caps: Limits) -> str:
        """
        Each field above its cap, as C{"memory 200M is above the cap of
        100M"}, joined by C{"; "}; C{""} when none is.
        """
        return "; ".join(
            f"{LIMIT_NAMES[name]} {format_limit(name, getattr(self, name))} is above the cap of "
            f"{format_limit(name, getattr(caps, name))}"
            for name in self.above(caps)
        )

    def capped(self, caps: Limits) -> Limits:
        """
        Every field at most its cap; an unset (unlimited) field where a cap
        exists becomes the cap.
        """
        return replace(
            self,
            **{
                f.name: getattr(caps, f.name)
                for f in fields(self)
                if getattr(caps, f.name)
                and (getattr(self, f.name) == 0 or getattr(self, f.name) > getattr(caps, f.name))
            },
        )

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))
