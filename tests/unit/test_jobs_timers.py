"""
A job's named timers (L{jobworker.jobs.timers}) on a fake clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from jobworker.jobs.timers import JobTimers


def test_a_timer_fires_once_and_is_forgotten() -> None:
    clock, fired = Clock(), []
    timers = JobTimers(clock)
    timers.start("eof", 2, lambda: fired.append("eof"))
    clock.advance(1.99)
    assert fired == []
    clock.advance(0.01)
    assert fired == ["eof"]
    timers.cancel_all()
    assert clock.getDelayedCalls() == []


def test_start_by_brings_a_deadline_forward_never_puts_it_off() -> None:
    clock, fired = Clock(), []
    timers = JobTimers(clock)
    timers.start_by("kill", 5, lambda: fired.append(5))
    timers.start_by("kill", 60, lambda: fired.append(60))  # later: ignored
    timers.start_by("kill", 1, lambda: fired.append(1))  # sooner: replaces
    clock.advance(1)
    assert fired == [1]
    clock.advance(100)
    assert fired == [1]
    assert clock.getDelayedCalls() == []


def test_start_replaces_and_cancel_all_cancels_every_timer() -> None:
    clock, fired = Clock(), []
    timers = JobTimers(clock)
    timers.start("timeout", 3, lambda: fired.append("first"))
    timers.start("timeout", 4, lambda: fired.append("second"))
    timers.start("eof", 2, lambda: fired.append("eof"))
    assert len(clock.getDelayedCalls()) == 2
    timers.cancel_all()
    clock.advance(10)
    assert fired == [] and clock.getDelayedCalls() == []
