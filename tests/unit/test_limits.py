"""
Tests for limit parsing and validation (L{jobworker.limits}).

Every parser reads untrusted text (a client's start request, a command-line
option): it returns the documented value or raises L{LimitError}, nothing
else.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
from hypothesis import given, settings, strategies as st

from jobworker.limits import (
    MAX_BYTES,
    MAX_CPU_MILLICORES,
    MAX_DURATION_MS,
    MAX_PIDS,
    LimitError,
    Limits,
    format_size,
    parse_count,
    parse_cpu,
    parse_duration,
    parse_size,
)

SETTINGS = settings(max_examples=300, deadline=None)

K, M, G, T, P = 1 << 10, 1 << 20, 1 << 30, 1 << 40, 1 << 50
BOUNDS = {
    "cpu_millicores": MAX_CPU_MILLICORES,
    "memory_bytes": MAX_BYTES,
    "io_read_bps": MAX_BYTES,
    "io_write_bps": MAX_BYTES,
    "pids": MAX_PIDS,
    "timeout_ms": MAX_DURATION_MS,
}
FIELDS = [f.name for f in fields(Limits)]

# Text a user might type, and then anything at all.
near_miss_text = st.text(alphabet="0123456789.,-+ eEkKmMgGtTpPiIbBsShHdDxX_\t\nſK٣", max_size=12)
any_text = st.one_of(near_miss_text, st.text(max_size=30))


# -- parse_size --------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, value",
    [
        ("1", 1),
        ("512", 512),
        ("64K", 64 * K),
        ("64k", 64 * K),
        ("256M", 256 * M),
        ("1.5G", 3 * G // 2),
        ("1G", G),
        ("1GiB", G),
        ("1GB", G),  # binary, as docker --memory and systemd read it
        ("1gib", G),
        ("2Ki", 2 * K),
        ("3T", 3 * T),
        ("1P", P),
        ("4096P", MAX_BYTES),
        (" 10M ", 10 * M),
        ("10 M", 10 * M),
        ("0.5K", 512),
    ],
)
def test_parse_size_documented_forms(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "M",
        "abc",
        "-1",
        "-1M",
        "+1M",
        "0",
        "0K",
        "0.1",  # less than one byte
        "4097P",  # above the maximum
        "1.5.5M",
        "1,5G",
        "1e3",
        "0x10",
        "1 K B",
        "1KK",
        "1X",
        "1MiBs",
        "inf",
        "nan",
        "1_000",
        "10\x00",
        "512i",  # a binary marker with no unit
        "512iB",
    ],
)
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(LimitError) as caught:
        parse_size(text, what="memory")
    assert str(caught.value).startswith("memory:")


@SETTINGS
@given(text=any_text)
def test_parse_size_raises_only_limit_errors(text: str) -> None:
    try:
        value = parse_size(text)
    except LimitError:
        return
    assert isinstance(value, int) and 1 <= value <= MAX_BYTES


@SETTINGS
@given(value=st.integers(1, MAX_BYTES))
def test_format_size_round_trips(value: int) -> None:
    assert parse_size(format_size(value)) == value


@pytest.mark.parametrize(
    "value, text",
    [(1, "1"), (1023, "1023"), (K, "1K"), (1536, "1536"), (3 * M, "3M"), (G + K, f"{M + 1}K"), (MAX_BYTES, "4096P")],
)
def test_format_size_picks_the_largest_exact_unit(value: int, text: str) -> None:
    assert format_size(value) == text


# -- parse_cpu ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, millicores",
    [("0.5", 500), ("2", 2000), ("250m", 250), ("1m", 1), ("0.001", 1), ("1024", MAX_CPU_MILLICORES), (" 1.5 ", 1500)],
)
def test_parse_cpu_documented_forms(text: str, millicores: int) -> None:
    assert parse_cpu(text) == millicores


@pytest.mark.parametrize(
    "text",
    ["", "m", "abc", "0", "0m", "-1", "0.0004", "0.5m", "1025", "1024001m", "inf", "nan", "-inf", "1..5", "2 cores", "1/2"],
)
def test_parse_cpu_rejects_garbage(text: str) -> None:
    with pytest.raises(LimitError):
        parse_cpu(text)


@SETTINGS
@given(text=any_text)
def test_parse_cpu_raises_only_limit_errors(text: str) -> None:
    try:
        value = parse_cpu(text)
    except LimitError:
        return
    assert isinstance(value, int) and 1 <= value <= MAX_CPU_MILLICORES


@SETTINGS
@given(millicores=st.integers(1, MAX_CPU_MILLICORES))
def test_parse_cpu_reads_millicores_and_cores_alike(millicores: int) -> None:
    assert parse_cpu(f"{millicores}m") == millicores
    assert parse_cpu(f"{millicores / 1000}") == millicores


# -- parse_duration ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ms",
    [
        ("30", 30_000),
        ("1.5s", 1_500),
        ("500ms", 500),
        ("5m", 300_000),
        ("1h30m", 5_400_000),
        ("2h", 7_200_000),
        ("1d", 86_400_000),
        ("1m30s", 90_000),
        ("1S", 1_000),
        ("1MS", 1),
        ("365d", MAX_DURATION_MS),
        (" 10s ", 10_000),
    ],
)
def test_parse_duration_documented_forms(text: str, ms: int) -> None:
    assert parse_duration(text) == ms


@pytest.mark.parametrize(
    "text",
    [
        "", "   ", "s", "abc", "-1s", "0", "0s", "0.5ms", "366d", "1h 30m",
        "1x", "1.s", ".5s", "1e3s", "10 s", "1h-5m", "inf", "nan", "1\x00s",
    ],
)
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(LimitError):
        parse_duration(text)


def test_parse_duration_unicode_case_folding() -> None:
    """
    Case-insensitive matching also folds U+017F LATIN SMALL LETTER LONG S
    to "s": such input must still be refused with a LimitError.
    """
    with pytest.raises(LimitError):
        parse_duration("1\u017f")


@SETTINGS
@given(text=any_text)
def test_parse_duration_raises_only_limit_errors(text: str) -> None:
    try:
        value = parse_duration(text)
    except LimitError:
        return
    assert isinstance(value, int) and 1 <= value <= MAX_DURATION_MS


@SETTINGS
@given(hours=st.integers(0, 100), minutes=st.integers(0, 59), seconds=st.integers(0, 59), ms=st.integers(0, 999))
def test_parse_duration_adds_its_parts(hours: int, minutes: int, seconds: int, ms: int) -> None:
    parts = [(hours, "h"), (minutes, "m"), (seconds, "s"), (ms, "ms")]
    text = "".join(f"{n}{unit}" for n, unit in parts if n)
    total = ((hours * 60 + minutes) * 60 + seconds) * 1000 + ms
    if total == 0:
        with pytest.raises(LimitError):
            parse_duration(text or "0")
    else:
        assert parse_duration(text) == total


# -- parse_count -------------------------------------------------------------------


@pytest.mark.parametrize("text, value", [("1", 1), ("64", 64), (" 1024 ", 1024), (str(MAX_PIDS), MAX_PIDS)])
def test_parse_count_documented_forms(text: str, value: int) -> None:
    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["", "0", "-1", "1.5", "1e3", "abc", str(MAX_PIDS + 1), "9" * 5000, "0x10"])
def test_parse_count_rejects_garbage(text: str) -> None:
    with pytest.raises(LimitError):
        parse_count(text)


@SETTINGS
@given(text=any_text)
def test_parse_count_raises_only_limit_errors(text: str) -> None:
    try:
        value = parse_count(text)
    except LimitError:
        return
    assert 1 <= value <= MAX_PIDS


# -- Limits ------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("bad", [-1, True, False, 1.0, "1", None])
def test_limits_refuse_non_numbers_and_negatives(name: str, bad: object) -> None:
    with pytest.raises(LimitError):
        Limits(**{name: bad})  # type: ignore[arg-type]  # the wrong type is the point


@pytest.mark.parametrize("name", FIELDS)
def test_limits_bounds(name: str) -> None:
    assert getattr(Limits(**{name: BOUNDS[name]}), name) == BOUNDS[name]
    assert getattr(Limits(**{name: 0}), name) == 0
    with pytest.raises(LimitError):
        Limits(**{name: BOUNDS[name] + 1})


def test_limits_bounds_fit_the_wire() -> None:
    """
    cpu and pids travel as u32, the rest as u64: every valid limit encodes.
    """
    assert MAX_CPU_MILLICORES < 2**32 and MAX_PIDS < 2**32
    assert MAX_BYTES < 2**64 and MAX_DURATION_MS < 2**64


limit_values = st.fixed_dictionaries(
    {name: st.one_of(st.just(0), st.integers(1, BOUNDS[name])) for name in FIELDS}
).map(lambda values: Limits(**values))


@SETTINGS
@given(own=limit_values, defaults=limit_values)
def test_with_defaults_fills_only_unset_fields(own: Limits, defaults: Limits) -> None:
    merged = own.with_defaults(defaults)
    for name in FIELDS:
        mine = getattr(own, name)
        assert getattr(merged, name) == (mine if mine else getattr(defaults, name))


@SETTINGS
@given(own=limit_values, caps=limit_values)
def test_above_names_fields_over_their_cap(own: Limits, caps: Limits) -> None:
    over = own.above(caps)
    for name in FIELDS:
        value, cap = getattr(own, name), getattr(caps, name)
        assert (name in over) == bool(cap and value > cap)
    assert over == [name for name in FIELDS if name in over]  # field order


@SETTINGS
@given(own=limit_values, caps=limit_values)
def test_capped_never_exceeds_a_cap(own: Limits, caps: Limits) -> None:
    capped = own.capped(caps)
    assert capped.above(caps) == []
    for name in FIELDS:
        value, cap, result = getattr(own, name), getattr(caps, name), getattr(capped, name)
        if not cap:
            assert result == value  # no cap: untouched, unset stays unset
        elif value == 0:
            assert result == cap  # unset means unlimited: the cap applies
        else:
            assert result == min(value, cap)


def test_is_empty() -> None:
    assert Limits().is_empty()
    for name in FIELDS:
        assert not Limits(**{name: 1}).is_empty()


# -- caps derived from the machine, and how a cap is named -----------------------


def test_host_caps_are_half_the_memory_and_cpus_and_4096_pids():
    from jobworker.limits import host_caps

    caps = host_caps(24 << 30, 2)
    assert caps == Limits(cpu_millicores=1000, memory_bytes=12 << 30, pids=4096)
    # At least one core; memory in whole MiB.
    assert host_caps((1 << 30) + 12345, 1) == Limits(cpu_millicores=1000, memory_bytes=512 << 20, pids=4096)
    assert host_caps(64 << 30, 16).cpu_millicores == 8000


def test_describe_above_names_each_limit_and_its_cap():
    asked = Limits(cpu_millicores=3000, memory_bytes=200 << 20, pids=10, timeout_ms=90_000)
    caps = Limits(cpu_millicores=1500, memory_bytes=100 << 20, pids=4096, timeout_ms=60_000)
    assert asked.describe_above(caps) == (
        "cpu 3 is above the cap of 1.5; memory 200M is above the cap of 100M; timeout 90s is above the cap of 60s"
    )
    assert Limits().describe_above(caps) == ""
