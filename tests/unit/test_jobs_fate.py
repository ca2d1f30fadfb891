"""
How a job ended (L{jobworker.jobs.fate.decide_fate}), from what its helper
and its cgroup said: pure, every branch.
"""

from __future__ import annotations

from typing import Any

import pytest

from jobworker.errors import ErrorCode
from jobworker.jobs.fate import Fate, decide_fate
from jobworker.protocol.messages import JobState

RAN: dict[str, Any] = dict(
    helper_exit=(0, None), final_line=None, start_failure=None, started=True, oom=False, stop_reason=None, timeout_ms=0
)


@pytest.mark.parametrize(
    "changes, fate",
    [
        ({}, Fate(JobState.EXITED, 0)),
        ({"helper_exit": (3, None)}, Fate(JobState.EXITED, 3)),
        ({"helper_exit": (None, 9)}, Fate(JobState.SIGNALED, -1, 9)),
        # An isolated command's own end, from its status line, beats the helper's exit status.
        ({"helper_exit": (137, None), "final_line": ("exit", 137)}, Fate(JobState.EXITED, 137)),
        ({"helper_exit": (143, None), "final_line": ("signal", 15)}, Fate(JobState.SIGNALED, -1, 15)),
        ({"helper_exit": (None, 9), "oom": True}, Fate(JobState.OOM, -1, 9, "killed by the OOM killer at the memory limit")),
        ({"helper_exit": (None, 9), "stop_reason": JobState.STOPPED}, Fate(JobState.STOPPED, -1, 9)),
        (
            {"helper_exit": (None, 9), "stop_reason": JobState.TIMEOUT, "timeout_ms": 1500},
            Fate(JobState.TIMEOUT, -1, 9, "ran past its timeout of 1.5 s"),
        ),
        # OOM beats a stop: the kernel's kill is what ended it.
        ({"oom": True, "stop_reason": JobState.STOPPED}, Fate(JobState.OOM, 0, 0, "killed by the OOM killer at the memory limit")),
        (
            {"started": False, "helper_exit": (1, None)},
            Fate(JobState.FAILED, 125, 0, "the job's helper ended before the command started (exit 1)", ErrorCode.START_FAILED),
        ),
        (
            {"started": False, "helper_exit": (None, 9), "oom": True},
            Fate(
                JobState.FAILED, 125, 0, "the job's helper ended before the command started (killed by signal 9, by the OOM killer at the memory limit)",
                ErrorCode.START_FAILED,
            ),
        ),
        # A stop that ended the helper in set-up: the stop's state, and the start fails.
        (
            {"started": False, "helper_exit": (None, 15), "stop_reason": JobState.STOPPED},
            Fate(JobState.STOPPED, -1, 0, "stopped before the command started (killed by signal 15)", ErrorCode.START_FAILED),
        ),
        (
            {"started": False, "helper_exit": (127, None), "start_failure": ("not_found", "exec x: No such file")},
            Fate(JobState.FAILED, 127, 0, "exec x: No such file", ErrorCode.COMMAND_NOT_FOUND),
        ),
        (
            {"started": False, "start_failure": ("not_executable", "exec x: Permission denied"), "oom": True},
            Fate(JobState.FAILED, 126, 0, "exec x: Permission denied", ErrorCode.COMMAND_NOT_EXECUTABLE),
        ),
        (
            {"started": False, "start_failure": ("setup", "chdir /nope: No such file"), "stop_reason": JobState.STOPPED},
            Fate(JobState.FAILED, 125, 0, "chdir /nope: No such file", ErrorCode.START_FAILED),
        ),
    ],
    ids=repr,
)
def test_fate(changes: dict[str, Any], fate: Fate) -> None:
    assert decide_fate(**{**RAN, **changes}) == fate
