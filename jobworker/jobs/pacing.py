"""
The work of many jobs at once, spread over the reactor's turns.

A job's end costs the reactor about a millisecond: its state decided, its
cgroup's usage read, a log line, its record saved, its waiters told.  Jobs
stopped together end together: the sockets of hundreds of supervisors close
within one poll of the reactor, and the removals of their cgroups come back
from the thread pool in one go.  Done as they come, that is one turn of the
reactor of hundreds of milliseconds, and every other client waits it out
(issue 17: another client's C{status} within 20 ms while 500 jobs are
stopped).  A L{TurnQueue} runs such calls a few in each turn; between two
turns the reactor serves its sockets.

Twisted glue; the reactor (a clock) is passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer

from jobworker.logs import Logger

__all__ = ["TurnQueue"]

log = Logger()

T = TypeVar("T")


class TurnQueue:
    """
    Calls run in the order they were queued, at most C{per_turn} of them in
    one turn of the reactor, each in a later turn than the one that queued
    it.
    """

    def __init__(self, reactor: Any, per_turn: int) -> None:
        self._reactor = reactor
        self._per_turn = per_turn
        self._calls: deque[Callable[[], object]] = deque()
        self._next_turn: Any = None

    def __len__(self) -> int:
        return len(self._calls)

    def call(self, call: Callable[[], object]) -> None:
        """
        Run C{call} in a later turn, after every call queued before it.  An
        exception it raises is logged; the calls after it still run.
        """
        self._calls.append(call)
        if self._next_turn is None:
            self._next_turn = self._reactor.callLater(0, self._turn)

    def fired(self, deferred: defer.Deferred[T]) -> defer.Deferred[T]:
        """
        A Deferred that fires with C{deferred}'s result, in a turn of this
        queue (C{deferred} is left with no result).
        """
        paced: defer.Deferred[T] = defer.Deferred()
        deferred.addBoth(lambda result: self.call(lambda: paced.callback(result)))
        return paced

    def flush(self) -> None:
        """
        Run every queued call now, and those they queue: at shutdown, when
        the reactor may not turn much longer.
        """
        while self._calls:
            self._run(self._calls.popleft())
        if self._next_turn is not None:
            self._next_turn.cancel()
            self._next_turn = None

    def _turn(self) -> None:
        self._next_turn = None
        # Those queued from now on run in the next turn, whatever is left.
        for _ in range(min(self._per_turn, len(self._calls))):
            self._run(self._calls.popleft())
        if self._calls and self._next_turn is None:
            self._next_turn = self._reactor.callLater(0, self._turn)

    @staticmethod
    def _run(call: Callable[[], object]) -> None:
        try:
            call()
        except Exception:
            log.failure("in a call spread over the reactor's turns")
