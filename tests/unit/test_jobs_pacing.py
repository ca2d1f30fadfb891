"""
Calls spread over the reactor's turns (L{jobworker.jobs.pacing}), on a
fake clock whose turns the test runs one at a time.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer
from twisted.internet.task import Clock

from jobworker.jobs.pacing import TurnQueue
from tests.support import one_turn


def test_at_most_per_turn_calls_run_in_a_turn_in_order() -> None:
    clock, ran = Clock(), list[object]()
    queue = TurnQueue(clock, per_turn=3)

    def queued(number: int) -> Callable[[], None]:
        return lambda: ran.append(number)

    for number in range(7):
        queue.call(queued(number))
    assert ran == []  # never in the caller's own turn
    one_turn(clock)
    assert ran == [0, 1, 2]
    one_turn(clock)
    assert ran == [0, 1, 2, 3, 4, 5]
    one_turn(clock)
    assert ran == list(range(7))
    assert clock.getDelayedCalls() == [] and len(queue) == 0


def test_a_call_queued_by_a_call_runs_in_a_later_turn() -> None:
    clock, ran = Clock(), list[object]()
    queue = TurnQueue(clock, per_turn=10)
    queue.call(lambda: queue.call(lambda: ran.append("second")))
    one_turn(clock)
    assert ran == []
    one_turn(clock)
    assert ran == ["second"]


def test_a_call_that_raises_is_logged_and_the_next_still_run() -> None:
    clock, ran = Clock(), list[object]()
    queue = TurnQueue(clock, per_turn=2)
    queue.call(lambda: 1 / 0)
    queue.call(lambda: ran.append("after"))
    one_turn(clock)
    assert ran == ["after"]


def test_fired_passes_the_result_on_in_a_turn_of_the_queue() -> None:
    clock = Clock()
    queue = TurnQueue(clock, per_turn=1)
    sources: list[defer.Deferred[int]] = [defer.Deferred() for _ in range(3)]
    results: list[int] = []
    for source in sources:
        queue.fired(source).addCallback(results.append)
    for number, source in enumerate(sources):
        source.callback(number)  # all at once, as a thread pool's results come
    assert results == []
    one_turn(clock)
    assert results == [0]
    one_turn(clock)
    one_turn(clock)
    assert results == [0, 1, 2]


def test_flush_runs_everything_now() -> None:
    clock, ran = Clock(), list[object]()
    queue = TurnQueue(clock, per_turn=1)
    queue.call(lambda: queue.call(lambda: ran.append(2)))
    queue.call(lambda: ran.append(1))
    queue.flush()
    assert ran == [1, 2]
    assert clock.getDelayedCalls() == []
