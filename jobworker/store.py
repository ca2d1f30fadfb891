"""
The state directory: one JSON record and one output spool per job.

Layout::

    STATE_DIR/jobs/<uuid>.json   the job's record (status, environment)
    STATE_DIR/jobs/<uuid>.out    its output spool (see jobworker.outputlog)

Records are replaced atomically (write a temporary file, fsync, rename), so
a crash leaves either the old record or the new one, never a torn one.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from typing import Any, Iterator

from twisted.logger import Logger

from jobworker.records import status_from_dict, status_to_dict

__all__ = ["JobStore", "StateDirLocked"]


class StateDirLocked(Exception):
    """
    Another server holds the state directory.
    """

log = Logger()


class JobStore:
    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.jobs_dir = os.path.join(state_dir, "jobs")

    def open(self) -> None:
        """
        Make the directories and lock the state dir for this process.

        @raise StateDirLocked: another server is using it.
        """
        os.makedirs(self.jobs_dir, mode=0o700, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.state_dir, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StateDirLocked(f"another jobworker server is using the state directory {self.state_dir}") from None

    def close(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def spool_path(self, job_id: uuid.UUID) -> str:
        return os.path.join(self.jobs_dir, f"{job_id}.out")

    def _record_path(self, job_id: uuid.UUID) -> str:
        return os.path.join(self.jobs_dir, f"{job_id}.json")

    def save(self, job: Any) -> None:
        record = {"status": status_to_dict(job.status()), "env": [list(pair) for pair in job.env]}
        path = self._record_path(job.job_id)
        temporary = path + ".tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)

    def forget(self, job_id: uuid.UUID) -> None:
        for path in (self._record_path(job_id), self._record_path(job_id) + ".tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def load(self) -> Iterator[dict[str, Any]]:
        """
        Every readable record; unreadable ones are logged and skipped (and
        left in place for an operator to look at).
        """
        for name in sorted(os.listdir(self.jobs_dir)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.jobs_dir, name)
            try:
                with open(path, "rb") as handle:
                    data = json.load(handle)
                yield {"status": status_from_dict(data["status"]), "env": [tuple(p) for p in data.get("env", [])]}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("skipping unreadable job record {path}: {error}", path=path, error=exc)
