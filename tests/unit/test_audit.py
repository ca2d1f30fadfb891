"""
Tests for L{jobworker.audit}: log values a client cannot use to forge or
blur a line, and the per-identity rate limit with its summary.
"""

from __future__ import annotations

import json
import re

from hypothesis import given, strategies as st

from jobworker.audit import RateLimit, log_excerpt, log_value

PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|[^\s"]+)(?: |$)')


def parse_pairs(line: str) -> dict[str, str]:
    """
    Read a line of key=value pairs as logfmt readers do: a value is a JSON
    string literal or a run of non-blank characters.
    """
    pairs: dict[str, str] = {}
    position = 0
    while position < len(line):
        match = PAIR.match(line, position)
        assert match is not None, f"unparseable at {position}: {line!r}"
        key, value = match.groups()
        pairs[key] = json.loads(value) if value.startswith('"') else value
        position = match.end()
    return pairs


@given(st.text(), st.text())
def test_a_log_value_cannot_break_a_line_and_reads_back(identity: str, operation: str) -> None:
    """
    Whatever the text, its log value holds no line break, control character,
    NUL or non-ASCII character, and a line of key=value pairs made of such
    values reads back to exactly the pairs written, whatever they contain
    ("=", quotes, spaces, a newline followed by a forged line).
    """
    value = log_value(identity)
    assert value
    assert all(0x20 <= ord(ch) <= 0x7E for ch in value)
    line = f"identity={value} operation={log_value(operation)} verdict=allow"
    assert parse_pairs(line) == {"identity": identity, "operation": operation, "verdict": "allow"}


def test_plain_values_stay_as_they_are() -> None:
    for text in ("alice", "admin", "127.0.0.1:4433", "a.b-c_d@example.org", "::1"):
        assert log_value(text) == text


def test_forging_values_are_quoted() -> None:
    assert log_value("eve\naudit identity=root") == '"eve\\naudit identity=root"'
    assert log_value("nul\x00byte") == '"nul\\u0000byte"'
    assert log_value("two words") == '"two words"'
    assert log_value("") == '""'
    assert log_value('say "hi"') == '"say \\"hi\\""'


def test_an_excerpt_says_how_much_it_cut() -> None:
    long = "x" * 10_000
    excerpt = log_excerpt(long, limit=100)
    assert excerpt.startswith("x" * 100) and excerpt.endswith("(9900 more characters)")
    assert log_excerpt("short") == "short"


def test_rate_limit_admits_a_burst_per_key_and_summarizes_the_rest() -> None:
    limit = RateLimit(burst=3, interval_s=10)
    verdicts = [limit.admit("alice", "status allow", now)[0] for now in (0, 1, 2, 3, 4)]
    assert verdicts == [True, True, True, False, False]
    # Another identity has its own allowance.
    assert limit.admit("bob", "status allow", 5) == (True, [])
    assert limit.pending()
    # The next interval admits again, and brings the summary of the last.
    admitted, due = limit.admit("alice", "stop not-found", 10)
    assert admitted
    [summary] = due
    assert (summary.key, summary.count, summary.by_kind) == ("alice", 2, {"status allow": 2})


def test_rate_limit_summary_comes_without_a_new_line() -> None:
    limit = RateLimit(burst=1, interval_s=10)
    limit.admit("alice", "list allow", 0)
    limit.admit("alice", "list allow", 1)
    limit.admit("alice", "stop denied", 2)
    assert limit.expire(9.9) == []
    [summary] = limit.expire(10)
    assert summary.count == 2 and summary.by_kind == {"list allow": 1, "stop denied": 1}
    assert not limit.pending()


def test_rate_limit_off() -> None:
    limit = RateLimit(burst=0)
    assert all(limit.admit("alice", "x", 0)[0] for _ in range(10_000))


def test_rate_limit_tracks_a_bounded_number_of_keys() -> None:
    limit = RateLimit(burst=1, interval_s=10, max_keys=3)
    for key in ("a", "b", "c"):
        limit.admit(key, "x", 0)
        limit.admit(key, "x", 0)  # held back
    admitted, due = limit.admit("d", "x", 1)
    assert admitted
    assert [summary.key for summary in due] == ["a"]
    assert len(limit._windows) == 3
