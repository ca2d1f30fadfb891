"""
Job statuses as plain dictionaries: the JSON of C{jobcli status --json} and
of the job records in the state directory.

Pure: no I/O.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any

from jobworker.host.contract import EXIT_SETUP_FAILED
from jobworker.jobnames import NameError_, check_labels, check_name
from jobworker.limits import Limits
from jobworker.protocol.messages import UID_UNKNOWN, JobState, JobStatus, JobUsage, Network

__all__ = ["RecordError", "status_to_dict", "status_from_dict", "salvage_status", "exit_status"]


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
        "name": status.name or None,
        "labels": dict(status.labels),
    }


class RecordError(ValueError):
    """
    A job record that is not what L{status_to_dict} writes: missing fields,
    values of the wrong type or out of the range the wire format carries.
    The message says which field and why.
    """


# The ranges a record's values must lie in: what the wire format can carry
# (protocol-spec: text is at most 65,535 UTF-8 bytes, argv at most 65,535
# items) and what a job can have (an exit code is a byte, signals stop at
# SIGRTMAX = 64, times lie between the epoch and the year 9999).
MAX_TEXT_BYTES = 0xFFFF
MAX_ARGV_ITEMS = 0xFFFF
MAX_EXIT_CODE = 255
MAX_SIGNAL = 64
MAX_TIME_S = 253_402_300_799  # 9999-12-31T23:59:59Z
_U32 = 2**32 - 1
_U64 = 2**64 - 1
_USAGE_BOUNDS = {"cpu_usec": _U64, "memory_peak_bytes": _U64, "io_read_bytes": _U64, "io_write_bytes": _U64, "pids_peak": _U32}
_MISSING = object()


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{name}: not text ({type(value).__name__})")
    if value.isascii() and len(value) <= MAX_TEXT_BYTES:
        return value  # valid UTF-8 of len() bytes, without encoding it
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise RecordError(f"{name}: not valid UTF-8") from None
    if size > MAX_TEXT_BYTES:
        raise RecordError(f"{name}: {size} bytes, more than {MAX_TEXT_BYTES}")
    return value


def _optional_text(name: str, value: Any) -> str:
    return "" if value is None else _text(name, value)


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise RecordError(f"{name}: not a whole number ({type(value).__name__})")
    if not low <= value <= high:
        raise RecordError(f"{name}: {value} out of range ({low} to {high})")
    return value


def _time(name: str, value: Any) -> int:
    """
    Seconds since the epoch (a JSON number, or None) as microseconds.
    """
    if value is None:
        return 0
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RecordError(f"{name}: not a number ({type(value).__name__})")
    if not 0 <= value <= MAX_TIME_S:  # also false for NaN
        raise RecordError(f"{name}: {value!r} out of range (0 to {MAX_TIME_S} s)")
    return _microseconds(value)


def _argv(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise RecordError(f"command: not a list ({type(value).__name__})")
    if len(value) > MAX_ARGV_ITEMS:
        raise RecordError(f"command: {len(value)} items, more than {MAX_ARGV_ITEMS}")
    return tuple(_text(f"command[{index}]", item) for index, item in enumerate(value))


def _state(value: Any) -> JobState:
    if not isinstance(value, str) or value.upper() not in JobState.__members__:
        raise RecordError(f"state: unknown state {str(value)[:40]!r}")
    return JobState[value.upper()]


def _network(value: Any) -> Network:
    if not isinstance(value, str) or value.upper() not in Network.__members__:
        raise RecordError(f"network: unknown network {str(value)[:40]!r}")
    return Network[value.upper()]


_LIMIT_NAMES = frozenset(f.name for f in fields(Limits))


def _limits(value: Any) -> Limits:
    if not isinstance(value, dict):
        raise RecordError(f"limits: not an object ({type(value).__name__})")
    try:
        # Names from a newer version are ignored; Limits checks the ranges.
        return Limits(**{key: item for key, item in value.items() if key in _LIMIT_NAMES})
    except (ValueError, TypeError) as exc:
        raise RecordError(f"limits: {exc}") from None


def _name(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"name: not text ({type(value).__name__})")
    try:
        return check_name(value)
    except NameError_ as exc:
        raise RecordError(f"name: {exc}") from None


def _labels(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RecordError("labels: not an object of texts")
    try:
        return check_labels(value.items())
    except NameError_ as exc:
        raise RecordError(f"labels: {exc}") from None


def _usage(value: Any) -> JobUsage:
    if not isinstance(value, dict):
        raise RecordError(f"usage: not an object ({type(value).__name__})")
    return JobUsage(
        **{
            key: _integer(f"usage.{key}", item, 0, _USAGE_BOUNDS[key])
            for key, item in value.items()
            if key in _USAGE_BOUNDS
        }
    )


# Each field of a record: (JSON key, JobStatus field, parser, default when
# the key is absent, or _MISSING where it is required).
_FIELDS: list[tuple[str, str, Callable[[Any], Any], Any]] = [
    ("owner", "owner", lambda v: _text("owner", v), _MISSING),
    ("command", "argv", _argv, _MISSING),
    ("state", "state", _state, _MISSING),
    ("exit_code", "exit_code", lambda v: -1 if v is None else _integer("exit_code", v, 0, MAX_EXIT_CODE), _MISSING),
    ("signal", "signal", lambda v: 0 if v is None else _integer("signal", v, 0, MAX_SIGNAL), _MISSING),
    ("created_at", "created_at", lambda v: _time("created_at", v), _MISSING),
    ("started_at", "started_at", lambda v: _time("started_at", v), _MISSING),
    ("ended_at", "ended_at", lambda v: _time("ended_at", v), _MISSING),
    ("error", "error", lambda v: _optional_text("error", v), _MISSING),
    ("stopped_by", "stopped_by", lambda v: _optional_text("stopped_by", v), _MISSING),
    # Added later: older records lack them.
    ("workdir", "workdir", lambda v: _text("workdir", v), ""),
    ("user", "user", lambda v: _text("user", v), ""),
    ("network", "network", _network, Network.NONE),
    ("limits", "limits", _limits, Limits()),
    ("usage", "usage", _usage, JobUsage()),
    ("output_bytes", "output_bytes", lambda v: _integer("output_bytes", v, 0, _U64), 0),
    ("uid", "uid", lambda v: UID_UNKNOWN if v is None else _integer("uid", v, 0, _U32), UID_UNKNOWN),
    ("name", "name", _name, ""),
    ("labels", "labels", _labels, ()),
]


def _job_id(value: Any) -> uuid.UUID:
    if not isinstance(value, str):
        raise RecordError(f"id: not text ({type(value).__name__})")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise RecordError(f"id: not a job id ({value[:40]!r})") from None


def status_from_dict(data: Any) -> JobStatus:
    """
    The inverse of L{status_to_dict}, for records that may be damaged: every
    field is checked (type, and the range the wire format carries), so a
    status it returns can always be sent to a client.

    @raise RecordError: C{data} is not such a dictionary; the message names
        the first field that is wrong.
    """
    status, problems = salvage_status(data)
    if problems:
        raise RecordError("; ".join(problems))
    return status


def salvage_status(data: Any, job_id: uuid.UUID | None = None) -> tuple[JobStatus, list[str]]:
    """
    As much of a possibly damaged record as is valid, and what is not.

    Each field that is missing or wrong takes its default (an owner of
    C{""}, which only admins and viewers may see; state C{lost}) and adds a
    line to the problems.  Never raises, and the status returned can
    always be sent to a client.

    @param job_id: the id to use when the record's own is damaged (the
        store knows it from the file name).
    """
    sound = _sound_status(data, job_id)
    if sound is not None:
        return sound, []
    problems: list[str] = []
    is_record = isinstance(data, dict)
    if not is_record:
        # Nothing in it is usable; one line says why, not one per field.
        problems.append(f"not a job record (a JSON {type(data).__name__})")
        data = {}
    values: dict[str, Any] = {}
    try:
        if "id" not in data:
            raise RecordError("id: missing")
        found = _job_id(data["id"])
        if job_id is not None and found != job_id:
            problems.append(f"id: {found} does not match the file's {job_id}")
        values["job_id"] = job_id or found
    except RecordError as exc:
        if is_record:
            problems.append(str(exc))
        values["job_id"] = job_id or uuid.UUID(int=0)
    for key, name, parse, default in _FIELDS:
        raw = data.get(key, _MISSING)
        if raw is _MISSING:
            if default is _MISSING:
                if is_record:
                    problems.append(f"{key}: missing")
                continue
            values[name] = default
            continue
        try:
            values[name] = parse(raw)
        except RecordError as exc:
            problems.append(str(exc))
    values.setdefault("owner", "")
    values.setdefault("argv", ())
    values.setdefault("state", JobState.LOST)
    return JobStatus(**values), problems


_RECORD_KEYS = frozenset(
    ("id", "owner", "command", "state", "exit_code", "signal", "created_at", "started_at", "ended_at", "error",
     "stopped_by", "workdir", "user", "uid", "network", "limits", "usage", "output_bytes", "name", "labels")
)  # fmt: skip
_STATES = {state.label: state for state in JobState}
_NETWORKS = {network.name.lower(): network for network in Network}


def _ascii_text(value: Any) -> bool:
    return type(value) is str and value.isascii() and len(value) <= MAX_TEXT_BYTES


def _bounded(value: Any, high: int) -> bool:
    return type(value) is int and 0 <= value <= high


def _seconds_value(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and 0 <= value <= MAX_TIME_S)


# Records mostly share their limits (the defaults, a team's usual ones):
# each distinct one is checked and made once.  Bounded: records are not
# ours until checked.
_LIMITS_SEEN: dict[tuple[tuple[str, Any], ...], Limits] = {}
_LIMITS_SEEN_MAX = 256


def _limits_of(value: dict[str, Any]) -> Limits:
    key = tuple(value.items())
    limits = _LIMITS_SEEN.get(key)
    if limits is None:
        limits = Limits(**value)
        if len(_LIMITS_SEEN) >= _LIMITS_SEEN_MAX:
            _LIMITS_SEEN.clear()
        _LIMITS_SEEN[key] = limits
    return limits


def _sound_status(data: Any, job_id: uuid.UUID | None) -> JobStatus | None:
    """
    The status of a record as L{status_to_dict} writes it, every field
    present, of the expected type, in range and in ASCII, checked in one
    pass (a third of the time of the field-by-field path, which a server
    starting with 10,000 records spends 10,000 times); None for anything
    else, which L{salvage_status} then reads field by field, with the
    problems named.  Both give the same status for what this accepts.
    """
    if type(data) is not dict or data.keys() != _RECORD_KEYS:
        return None
    text_id, argv, limits, usage = data["id"], data["command"], data["limits"], data["usage"]
    exit_code, signal, uid, labels = data["exit_code"], data["signal"], data["uid"], data["labels"]
    error, stopped_by, name = data["error"], data["stopped_by"], data["name"]
    state = _STATES.get(data["state"]) if type(data["state"]) is str else None
    network = _NETWORKS.get(data["network"]) if type(data["network"]) is str else None
    if (
        state is None
        or network is None
        or type(text_id) is not str
        or (job_id is not None and text_id != str(job_id))
        or not _ascii_text(data["owner"])
        or type(argv) is not list
        or len(argv) > MAX_ARGV_ITEMS
        or not all(_ascii_text(item) for item in argv)
        or not (exit_code is None or _bounded(exit_code, MAX_EXIT_CODE))
        or not (signal is None or _bounded(signal, MAX_SIGNAL))
        or not all(_seconds_value(data[key]) for key in ("created_at", "started_at", "ended_at"))
        or not (error is None or _ascii_text(error))
        or not (stopped_by is None or _ascii_text(stopped_by))
        or not _ascii_text(data["workdir"])
        or not _ascii_text(data["user"])
        or not (uid is None or _bounded(uid, _U32))
        or not _bounded(data["output_bytes"], _U64)
        or type(limits) is not dict
        or not limits.keys() <= _LIMIT_NAMES
        or not all(type(value) is int for value in limits.values())  # True == 1 for the memo, not for Limits
        or type(usage) is not dict
        or usage.keys() != _USAGE_BOUNDS.keys()
        or not all(_bounded(usage[key], high) for key, high in _USAGE_BOUNDS.items())
        or not (name is None or type(name) is str)
        or type(labels) is not dict
        or not all(type(key) is str and type(value) is str for key, value in labels.items())
    ):
        return None
    try:
        checked_name = check_name(name or "")
        checked_labels = check_labels(labels.items())
        checked_limits = _limits_of(limits)
        found_id = job_id if job_id is not None else uuid.UUID(text_id)
    except (NameError_, ValueError, TypeError):
        return None
    return JobStatus(
        job_id=found_id,
        owner=data["owner"],
        argv=tuple(argv),
        state=state,
        exit_code=-1 if exit_code is None else exit_code,
        signal=signal or 0,
        created_at=_microseconds(data["created_at"]),
        started_at=_microseconds(data["started_at"]),
        ended_at=_microseconds(data["ended_at"]),
        error=error or "",
        stopped_by=stopped_by or "",
        limits=checked_limits,
        usage=JobUsage(**usage),
        output_bytes=data["output_bytes"],
        workdir=data["workdir"],
        user=data["user"],
        network=network,
        uid=UID_UNKNOWN if uid is None else uid,
        name=checked_name,
        labels=checked_labels,
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
    return EXIT_SETUP_FAILED
