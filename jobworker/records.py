"""
Job statuses as plain dictionaries: the JSON of C{jobcli status --json} and
of the job records in the state directory.

Pure: no I/O.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, fields
from typing import Any

from jobworker.limits import Limits
from jobworker.protocol.messages import UID_UNKNOWN, JobState, JobStatus, JobUsage, Network

__all__ = ["status_to_dict", "status_from_dict", "exit_status"]


def _seconds(microseconds: int) -> float | None:
    return microseconds / 1e6 if microseconds else None


def _microseconds(seconds: float | None) -> int:
    return round(seconds * 1e6) if seconds else 0


def status_to_dict(status: JobStatus) -> dict[str, Any]:
    """
    A JSON-ready view of C{status}: times in seconds since the epoch (None
    when unknown), C{exit_code}/C{signal} None when not applicable.
    """
    return {
        "id": str(status.job_id),
        "owner": status.owner,
        "command": list(status.argv),
        "state": status.state.label,
        "exit_code": status.exit_code if status.exit_code >= 0 else None,
        "signal": status.signal or None,
        "created_at": _seconds(status.created_at),
        "started_at": _seconds(status.started_at),
        "ended_at": _seconds(status.ended_at),
        "error": status.error or None,
        "stopped_by": status.stopped_by or None,
        "workdir": status.workdir,
        "user": status.user,
        "uid": status.uid if status.uid != UID_UNKNOWN else None,
        "network": status.network.name.lower(),
        "limits": asdict(status.limits),
        "usage": asdict(status.usage),
        "output_bytes": status.output_bytes,
    }


def status_from_dict(data: dict[str, Any]) -> JobStatus:
    """
    The inverse of L{status_to_dict}.

    @raise KeyError, ValueError, TypeError: C{data} is not such a dictionary.
    """
    try:
        return _status_from_dict(data)
    except (AttributeError, OverflowError) as exc:
        # A damaged record (a number where text belongs, an infinite time):
        # reported like any other malformed value.
        raise ValueError(f"malformed job record: {exc}") from exc


def _status_from_dict(data: dict[str, Any]) -> JobStatus:
    limit_names = {f.name for f in fields(Limits)}
    usage_names = {f.name for f in fields(JobUsage)}
    return JobStatus(
        job_id=uuid.UUID(data["id"]),
        owner=data["owner"],
        argv=tuple(data["command"]),
        state=JobState[data["state"].upper()],
        exit_code=data["exit_code"] if data["exit_code"] is not None else -1,
        signal=data["signal"] or 0,
        created_at=_microseconds(data["created_at"]),
        started_at=_microseconds(data["started_at"]),
        ended_at=_microseconds(data["ended_at"]),
        error=data["error"] or "",
        stopped_by=data["stopped_by"] or "",
        workdir=data.get("workdir", ""),
        user=data.get("user", ""),
        uid=data["uid"] if data.get("uid") is not None else UID_UNKNOWN,
        network=Network[data.get("network", "none").upper()],
        limits=Limits(**{k: v for k, v in data.get("limits", {}).items() if k in limit_names}),
        usage=JobUsage(**{k: v for k, v in data.get("usage", {}).items() if k in usage_names}),
        output_bytes=data.get("output_bytes", 0),
    )


def exit_status(status: JobStatus) -> int:
    """
    The exit code a shell would report for this job, as C{jobcli run},
    C{wait} and C{logs -f} exit with: the job's own code; 128+N when a
    signal N ended it; 127/126 when the command was not found / not
    executable; 125 for any other failure to start, or a job whose end is
    unknown.
    """
    if status.signal:
        return 128 + status.signal
    if status.exit_code >= 0:
        return status.exit_code
    return 125
