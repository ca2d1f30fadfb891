"""
How C{jobcli} shows things to a person: durations, sizes, ages, short ids,
C{status}'s description of a job and its JSON form.
"""

from __future__ import annotations

import signal
import time
import uuid
from typing import Any

from jobworker.limits import format_size
from jobworker.protocol import messages as m
from jobworker.records import status_to_dict

SHORT_ID = 12  # hex digits of a short id (as docker's)


# -- formatting ----------------------------------------------------------------------------


def short_id(job_id: uuid.UUID) -> str:
    return job_id.hex[:SHORT_ID]


def format_duration(seconds: float) -> str:
    """
    A duration as people read it: C{850ms}, C{4.2s}, C{3m05s}, C{2h03m}, C{3d04h}.
    """
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _human_size(value: int) -> str:
    """
    Bytes as people read them: C{10 B}, C{1.8 KiB}, C{256 MiB} (binary
    units, three significant digits at most).
    """
    if value < 1024:
        return f"{value} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024  # type: ignore[assignment]  # bytes become a float of units
        if value < 1024 or unit == "EiB":
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def format_age(microseconds: int, now: float) -> str:
    if not microseconds:
        return "-"
    return format_duration(max(0.0, now - microseconds / 1e6)) + " ago"


def run_time(status: m.JobStatus, now: float) -> float | None:
    """
    Seconds the job ran (or runs so far); None when it never started.
    """
    if not status.started_at:
        return None
    end = status.ended_at / 1e6 if status.ended_at else now
    return max(0.0, end - status.started_at / 1e6)


def _format_time(microseconds: int, now: float) -> str:
    if not microseconds:
        return "-"
    local = time.localtime(microseconds / 1e6)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", local) + f".{microseconds // 1000 % 1000:03d} " + time.strftime("%z", local)
    return f"{stamp} ({format_age(microseconds, now)})"


def status_json(status: m.JobStatus) -> dict[str, Any]:
    """
    C{status} for C{--json}; an abridged one (cut to fit a frame) says so.
    """
    data = status_to_dict(status)
    if status.abridged:
        data["abridged"] = True
    return data


def _signal_name(number: int) -> str:
    """C{SIGTERM} for 15; the number itself for one Python does not name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def describe(status: m.JobStatus) -> str:
    now = time.time()
    lines = [
        ("id", str(status.job_id)),
        *([("name", status.name)] if status.name else []),
        ("owner", status.owner),
        ("command", " ".join(status.argv)),
        ("state", status.state.label),
    ]
    if status.exit_code >= 0:
        lines.append(("exit code", str(status.exit_code)))
    if status.signal:
        lines.append(("signal", _signal_name(status.signal)))
    if status.error:
        lines.append(("error", status.error))
    if status.stopped_by:
        lines.append(("stopped by", status.stopped_by))
    ran = run_time(status, now)
    lines += [
        ("created", _format_time(status.created_at, now)),
        ("started", _format_time(status.started_at, now)),
        ("ended", _format_time(status.ended_at, now)),
        ("duration", "-" if ran is None else format_duration(ran) + ("" if status.state.is_final else " so far")),
        # "" is the server's default: a uid of the job's own.
        ("user", status.user or "(dynamic)"),
        *([("uid", str(status.uid))] if status.uid != m.UID_UNKNOWN else []),
        ("workdir", status.workdir),
        ("network", status.network.name.lower()),
    ]
    if status.labels:
        lines.append(("labels", " ".join(f"{key}={value}" for key, value in status.labels)))
    limits = status.limits
    described = []
    if limits.cpu_millicores:
        described.append(f"cpu={limits.cpu_millicores / 1000:g}")
    if limits.memory_bytes:
        described.append(f"memory={format_size(limits.memory_bytes)}")
    if limits.io_read_bps:
        described.append(f"io-read={format_size(limits.io_read_bps)}/s")
    if limits.io_write_bps:
        described.append(f"io-write={format_size(limits.io_write_bps)}/s")
    if limits.pids:
        described.append(f"pids={limits.pids}")
    if limits.timeout_ms:
        described.append(f"timeout={format_duration(limits.timeout_ms / 1000)}")
    lines.append(("limits", " ".join(described) or "none"))
    usage = status.usage
    lines.append(
        (
            "usage",
            f"cpu={format_duration(usage.cpu_usec / 1e6)} memory-peak={_human_size(usage.memory_peak_bytes)} "
            f"io-read={_human_size(usage.io_read_bytes)} io-write={_human_size(usage.io_write_bytes)} pids-peak={usage.pids_peak}",
        )
    )
    lines.append(
        (
            "output",
            f"{_human_size(status.output_bytes)}; end offset {status.output_bytes} "
            f"(jobcli logs -f --since-offset {status.output_bytes} resumes there)",
        )
    )
    if status.abridged:
        lines.append(("note", "texts and command cut to fit the connection's frame size"))
    return "\n".join(f"{key + ':':<12}{value}" for key, value in lines)


def end_note(status: m.JobStatus) -> str | None:
    """
    One line for a job that did not end by itself (as C{systemd-run --wait}
    says), or None.
    """
    short = short_id(status.job_id)
    state = status.state
    if state is m.JobState.OOM:
        limit = f" of {format_size(status.limits.memory_bytes)}" if status.limits.memory_bytes else ""
        return f"job {short} was killed by the kernel: out of memory (its memory limit{limit})"
    if state is m.JobState.TIMEOUT:
        limit = f" of {format_duration(status.limits.timeout_ms / 1000)}" if status.limits.timeout_ms else ""
        return f"job {short} was stopped: it ran past its timeout{limit}"
    if state is m.JobState.STOPPED:
        return f"job {short} was stopped" + (f" by {status.stopped_by}" if status.stopped_by else "")
    if state is m.JobState.LOST:
        return f"job {short} was lost: the server went down while it ran, its end is unknown"
    if state is m.JobState.FAILED and status.error:
        return status.error
    return None
