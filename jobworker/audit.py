"""
Log lines that a client cannot forge or flood: quoting of client-supplied
strings, and a rate limit with a summary of what it held back.

Pure: no reactor, no I/O; the server passes the clock in.

Quoting
=======

An audit line is C{key=value} pairs.  Values a client chose (its
certificate's CN and OU, a message in its GoAway) may hold spaces, quotes,
C{=}, newlines, NUL or any other character: written raw, a CN of
C{"alice verdict=allow\\naudit identity=root"} would end the line and forge
a second one.  L{log_value} writes a value as it is when it is made only of
characters that cannot mislead (letters, digits and C{-._:@/+}), and
otherwise as a JSON string literal (C{"..."}, with C{\\n}, C{\\u0000},
C{\\"} and every non-ASCII character escaped), as logfmt writes values:
it never holds a line break or a control character, a reader tells where
it ends by its closing quote, and a JSON parser gives the value back.

Rate limit
==========

One connection can ask for thousands of cheap requests a second, each an
audit line (about 200 bytes): hundreds of KB/s of log.  As journald does
per service, L{RateLimit} lets each key (an identity) write at most
C{burst} lines per C{interval_s}; beyond that the lines are counted, not
written, and when the interval ends one summary says how many were held
back, by operation and verdict, so the log still accounts for every request.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

__all__ = ["log_value", "log_excerpt", "RateLimit", "Suppressed"]

_PLAIN = re.compile(r"[A-Za-z0-9._:@/+-]+")


def log_value(value: object) -> str:
    """
    C{value} as text that stays one unambiguous token of a log line: as it
    is when made of plain characters only, else a JSON string literal.
    The empty string is C{""}.
    """
    text = value if isinstance(value, str) else str(value)
    if _PLAIN.fullmatch(text):
        return text
    return json.dumps(text, ensure_ascii=True)


def log_excerpt(value: object, limit: int = 500) -> str:
    """
    As L{log_value}, cut to about C{limit} characters (a command of
    256 KiB is not logged whole on every start), saying how much was cut.
    """
    text = log_value(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more characters)"


@dataclass
class Suppressed:
    """
    What the rate limit held back for one key in one interval.

    @ivar key: the identity (or other key) whose lines were held back.
    @ivar count: lines held back.
    @ivar by_kind: the same, per kind of line (for audit lines,
        C{"operation verdict"}).
    @ivar interval_s: the length of the interval, seconds.
    """

    key: str
    count: int
    by_kind: dict[str, int]
    interval_s: float


@dataclass
class _Window:
    start: float
    written: int = 0
    held: Counter[str] = field(default_factory=Counter)


class RateLimit:
    """
    At most C{burst} lines per key per C{interval_s} seconds (fixed windows,
    starting at a key's first line).

    @param burst: lines per interval per key; 0 turns the limit off.
    @param interval_s: the interval, seconds (more than 0).
    @param max_keys: keys tracked at once; each costs a few hundred bytes,
        and keys come from certificates the server's CA issued, so this is
        a guard, not a limit met in practice: when full, windows that have
        ended are dropped (and summarized) first, then the oldest.
    """

    def __init__(self, burst: int = 1000, interval_s: float = 10.0, *, max_keys: int = 10_000) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be more than 0")
        self.burst = burst
        self.interval_s = interval_s
        self.max_keys = max_keys
        self._windows: dict[str, _Window] = {}

    def admit(self, key: str, kind: str, now: float) -> tuple[bool, list[Suppressed]]:
        """
        May a line of C{key} (of C{kind}) be written at C{now} (seconds)?

        @return: whether to write it, and the summaries now due (of windows
            that have ended with lines held back), to be written first.
        """
        if self.burst <= 0:
            return True, []
        due: list[Suppressed] = []
        window = self._windows.get(key)
        if window is not None and now - window.start >= self.interval_s:
            due.extend(self._close(key, window))
            window = None
        if window is None:
            if len(self._windows) >= self.max_keys:
                due.extend(self.expire(now))
                if len(self._windows) >= self.max_keys:
                    oldest = min(self._windows, key=lambda k: self._windows[k].start)
                    due.extend(self._close(oldest, self._windows[oldest]))
            window = self._windows[key] = _Window(now)
        if window.written < self.burst:
            window.written += 1
            return True, due
        window.held[kind] += 1
        return False, due

    def expire(self, now: float) -> list[Suppressed]:
        """
        End every window that is over at C{now}; return the summaries due.
        Call it when the interval may have passed with no new line (a timer),
        so a flood's summary does not wait for the next line.
        """
        due: list[Suppressed] = []
        for key, window in list(self._windows.items()):
            if now - window.start >= self.interval_s:
                due.extend(self._close(key, window))
        return due

    def pending(self) -> bool:
        """
        Whether some window holds lines back (a summary will be due).
        """
        return any(window.held for window in self._windows.values())

    def _close(self, key: str, window: _Window) -> list[Suppressed]:
        del self._windows[key]
        if not window.held:
            return []
        return [Suppressed(key, sum(window.held.values()), dict(window.held), self.interval_s)]
