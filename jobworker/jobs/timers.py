"""
The delayed calls of one job, by name, on the host's reactor (passed in, so
the tests drive them with a fake clock).  Twisted glue, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["JobTimers"]


class JobTimers:
    """
    A job's timers by name (the job's: C{timeout}, its run time; C{kill},
    the end of a stop's grace period; C{eof}, the wait for the output pipes'
    EOF after the helper's end).  A timer is forgotten once it fires.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._calls: dict[str, Any] = {}

    def start(self, name: str, delay_s: float, call: Callable[[], object]) -> None:
        """
        Call C{call} in C{delay_s} seconds, in place of the timer C{name}.
        """
        self.cancel(name)

        def fire() -> None:
            self._calls.pop(name, None)
            call()

        self._calls[name] = self.reactor.callLater(delay_s, fire)

    def start_by(self, name: str, delay_s: float, call: Callable[[], object]) -> None:
        """
        As L{start}, unless the timer C{name} fires by then already: its
        deadline is only ever brought forward, never put off.
        """
        existing = self._calls.get(name)
        if existing is not None and existing.active() and existing.getTime() <= self.reactor.seconds() + delay_s:
            return
        self.start(name, delay_s, call)

    def cancel(self, name: str) -> None:
        existing = self._calls.pop(name, None)
        if existing is not None and existing.active():
            existing.cancel()

    def cancel_all(self) -> None:
        for name in list(self._calls):
            self.cancel(name)
