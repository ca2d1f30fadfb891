"""
jobcli's status text (C{jobcli status}): the signal that ended a job is
named when Python knows its name, and given as its number otherwise.
"""

from __future__ import annotations

import uuid

from jobworker.cli import formatting
from jobworker.protocol import messages as m


def _status(signal: int) -> m.JobStatus:
    return m.JobStatus(job_id=uuid.UUID(int=1), owner="alice", argv=("sleep", "9"), state=m.JobState.SIGNALED, signal=signal)


def signal_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("signal:")]


def signal_line(text: str) -> str:
    (line,) = signal_lines(text)
    return line


def test_a_known_signal_is_named() -> None:
    assert signal_line(formatting.describe(_status(9))).split()[-1] == "SIGKILL"
    assert signal_line(formatting.describe(_status(15))).split()[-1] == "SIGTERM"


def test_an_unknown_signal_is_given_as_its_number() -> None:
    # 200 is no Linux signal (they end at 64).
    assert signal_line(formatting.describe(_status(200))).split()[-1] == "200"


def test_no_signal_no_line() -> None:
    assert signal_lines(formatting.describe(_status(0))) == []
