"""
Reaping on SIGCHLD costs what ended, not what runs (issue 17 item 4):
Twisted's own reaper asked every running helper with a waitpid per ended
job, quadratic in a stop of hundreds of jobs.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from twisted.internet import process

from jobworker.server.reaping import install_reaper, reap_ended_processes


class Handler:
    """
    A registered process as Twisted's reaper sees it, counting its polls.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.polls = 0
        self.status: int | None = None

    def reapProcess(self) -> None:
        self.polls += 1
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid:
            process.unregisterReapProcessHandler(pid, self)
            self.status = status


def child(exit_code: int | None) -> int:
    """
    A forked child that exits with C{exit_code} at once, or sleeps (None).
    """
    pid = os.fork()
    if pid == 0:
        if exit_code is None:
            time.sleep(60)
        os._exit(exit_code or 0)
    return pid


def wait_ended(pid: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if ended is not None and ended.si_pid == pid:
            return
        time.sleep(0.005)
    raise AssertionError(f"child {pid} did not end")


@pytest.fixture
def handlers() -> Iterator[list[Handler]]:
    made: list[Handler] = []
    yield made
    for handler in made:
        if handler.pid in process.reapProcessHandlers:
            try:
                os.kill(handler.pid, signal.SIGKILL)
                os.waitpid(handler.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            process.unregisterReapProcessHandler(handler.pid, handler)


def register(handlers: list[Handler], pid: int) -> Handler:
    handler = Handler(pid)
    process.registerReapProcessHandler(pid, handler)
    handlers.append(handler)
    return handler


def test_only_the_ended_children_are_asked(handlers: list[Handler]) -> None:
    running = [register(handlers, child(None)) for _ in range(40)]
    ended = [register(handlers, child(code)) for code in (0, 3, 7)]
    for handler in ended:
        wait_ended(handler.pid)
    scans: list[int] = []
    reap_ended_processes(lambda: scans.append(1))
    assert [os.WEXITSTATUS(handler.status) for handler in ended if handler.status is not None] == [0, 3, 7]
    assert all(handler.polls == 1 for handler in ended)
    # Twisted's reaper asks all 43, on each of the three SIGCHLDs.
    assert sum(handler.polls for handler in running) == 0
    assert not scans and all(handler.pid in process.reapProcessHandlers for handler in running)


def test_an_ended_child_that_is_not_twisteds_falls_back_to_the_full_scan(handlers: list[Handler]) -> None:
    ours = register(handlers, child(0))
    foreign = child(5)
    wait_ended(ours.pid)
    wait_ended(foreign)
    try:
        scans: list[int] = []
        reap_ended_processes(lambda: scans.append(1))
        assert scans == [1] or ours.status is not None  # the foreign one may be found first
        # The foreign child is not reaped: its own waiter still gets its status.
        pid, status = os.waitpid(foreign, os.WNOHANG)
        assert pid == foreign and os.WEXITSTATUS(status) == 5
    finally:
        try:
            os.waitpid(foreign, os.WNOHANG)
        except ChildProcessError:
            pass


def test_nothing_ended_nothing_asked(handlers: list[Handler]) -> None:
    running = [register(handlers, child(None)) for _ in range(5)]
    scans: list[int] = []
    reap_ended_processes(lambda: scans.append(1))
    assert not scans and sum(handler.polls for handler in running) == 0


def test_the_reactor_uses_it_once_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "reapAllProcesses", process.reapAllProcesses)
    install_reaper()
    assert process.reapAllProcesses is reap_ended_processes
