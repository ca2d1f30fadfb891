"""
How a job ended, decided from what its helper and its cgroup said: pure, no
reactor, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobworker.errors import ErrorCode
from jobworker.host import contract
from jobworker.protocol.messages import JobState

__all__ = ["Fate", "decide_fate"]

# The answer to the start request of a job whose command never ran.
_START_ERRORS = {
    contract.NOT_FOUND: ErrorCode.COMMAND_NOT_FOUND,
    contract.NOT_EXECUTABLE: ErrorCode.COMMAND_NOT_EXECUTABLE,
}


@dataclass(frozen=True)
class Fate:
    """
    A job's final state, exit code (-1: none), signal (0: none) and error
    text (C{""}: none); C{start_error} is the code its start request fails
    with when the command never ran (state FAILED, or the stop's state when
    a stop ended the helper before the command ran), else None.
    """

    state: JobState
    exit_code: int = -1
    signal: int = 0
    error: str = ""
    start_error: ErrorCode | None = None


def _helper_end(helper_exit: tuple[int | None, int | None], oom: bool) -> str:
    """
    How the helper ended, for the error of a job whose command never ran.
    The OOM killer is named: the helper's own set-up can outgrow a small
    memory limit, and "killed by signal 9" alone would leave that a guess.
    """
    exit_code, signum = helper_exit
    how = f"killed by signal {signum}" if signum else f"exit {exit_code}" if exit_code is not None else "its end unknown"
    return f"{how}, by the OOM killer at the memory limit" if oom else how


def decide_fate(
    *,
    helper_exit: tuple[int | None, int | None],
    final_line: tuple[str, int] | None,
    start_failure: tuple[str, str] | None,
    started: bool,
    oom: bool,
    stop_reason: JobState | None,
    timeout_ms: int,
    supervisor_lost: bool = False,
) -> Fate:
    """
    @param helper_exit: the helper's own exit code and signal (None: none).
    @param final_line: the helper's C{exit}/C{signal} status line, as
        (word, number): an isolated command's own end.
    @param start_failure: the helper's C{failed} line, as (kind, message).
    @param started: the command was known to run.
    @param oom: the cgroup's OOM killer struck.
    @param stop_reason: the state a stop asked for (STOPPED, TIMEOUT), if any.
    @param timeout_ms: the job's timeout, for the error text.
    @param supervisor_lost: the job's supervisor ended without saying how
        the job ended (killed): the job died with it, its end unknown.

    In order: a command that a stop kept from running ends as the stop
    asked (exit code -1, signal 0: the command had neither), unless the
    helper said why it failed; a command that never ran FAILED (with 127,
    126 or 125); then OOM; then the stop's reason; then SIGNALED or EXITED.
    """
    exit_code, signum = helper_exit
    if final_line is not None:
        word, number = final_line
        exit_code, signum = (number, None) if word == contract.EXIT else (None, number)
    if start_failure is None and not started and stop_reason is not None:
        # A stop while the helper set up ended it before the command ran:
        # the job ends as the stop asked, and its start request fails.
        return Fate(
            stop_reason,
            error=f"stopped before the command started ({_helper_end(helper_exit, oom)})",
            start_error=ErrorCode.START_FAILED,
        )
    if start_failure is not None or not started:
        kind, message = start_failure or (
            contract.SETUP,
            f"the job's helper ended before the command started ({_helper_end(helper_exit, oom)})",
        )
        return Fate(
            JobState.FAILED,
            exit_code=contract.EXIT_CODES.get(kind, contract.EXIT_SETUP_FAILED),
            error=message,
            start_error=_START_ERRORS.get(kind, ErrorCode.START_FAILED),
        )
    if supervisor_lost and final_line is None:
        return Fate(
            JobState.LOST,
            error="the job's supervisor died (killed?) before the job ended; the job's processes went with it",
        )
    code = -1 if signum or exit_code is None else exit_code
    signal = signum or 0
    if oom:
        return Fate(JobState.OOM, code, signal, "killed by the OOM killer at the memory limit")
    if stop_reason is not None:
        error = f"ran past its timeout of {timeout_ms / 1000:g} s" if stop_reason is JobState.TIMEOUT else ""
        return Fate(stop_reason, code, signal, error)
    return Fate(JobState.SIGNALED if signum else JobState.EXITED, code, signal)
