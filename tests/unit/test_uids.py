"""
The uid allocator (pure) and its host look-ups.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from jobworker.errors import ErrorCode
from jobworker.host.uids import (
    DEFAULT_FIRST_UID,
    DEFAULT_LAST_UID,
    UidAllocator,
    UidLocks,
    UidRange,
    UidsExhausted,
    host_has_id,
    host_live_uids,
    parse_uid_range,
)


def test_default_range_is_systemds_dynamic_user_range():
    assert UidRange() == UidRange(61184, 65519)
    assert (DEFAULT_FIRST_UID, DEFAULT_LAST_UID) == (61184, 65519)
    assert len(UidRange()) == 4336


@pytest.mark.parametrize("text, expected", [("61184-65519", (61184, 65519)), ("70000", (70000, 70000)), (" 5-6 ", (5, 6))])
def test_parse_uid_range(text, expected):
    parsed = parse_uid_range(text)
    assert (parsed.first, parsed.last) == expected


@pytest.mark.parametrize("text", ["", "a-b", "10-5", "0-10", "-5", "5-", f"1-{2**31}", "1-2-3"])
def test_parse_uid_range_refuses(text):
    with pytest.raises(ValueError):
        parse_uid_range(text)


def test_round_robin_never_reuses_a_uid_just_given_back():
    uids = UidAllocator(UidRange(100, 102))
    assert uids.allocate("a") == 100
    uids.release(100)
    # 100 is retired, and the cursor moved on anyway.
    assert uids.allocate("b") == 101
    assert uids.allocate("c") == 102


def test_a_released_uid_comes_back_only_when_no_process_runs_as_it():
    live = {100}
    uids = UidAllocator(UidRange(100, 100), live_uids=lambda r: set(live))
    assert uids.allocate("a") == 100
    uids.release(100)
    assert uids.retired == {100}
    with pytest.raises(UidsExhausted) as refused:
        uids.allocate("b")
    assert refused.value.code is ErrorCode.START_FAILED
    assert "100-100" in refused.value.message and "1 by processes still alive" in refused.value.message
    live.clear()
    assert uids.allocate("b") == 100
    assert uids.holder_of(100) == "b"


def test_exhaustion_names_the_range_and_the_option():
    uids = UidAllocator(UidRange(7, 8))
    uids.allocate("a")
    uids.allocate("b")
    with pytest.raises(UidsExhausted) as refused:
        uids.allocate("c")
    message = refused.value.message
    assert "all 2 uids" in message and "7-8" in message and "2 by running jobs" in message and "--job-uids" in message


def test_host_users_and_groups_are_skipped():
    uids = UidAllocator(UidRange(10, 13), is_taken=lambda uid: uid in (10, 12))
    assert [uids.allocate(str(n)) for n in range(2)] == [11, 13]
    with pytest.raises(UidsExhausted):
        uids.allocate("x")


def test_lingering_processes_hold_their_uids_from_start_up():
    live = {101, 5000}
    uids = UidAllocator(UidRange(100, 102), live_uids=lambda r: set(live))
    assert uids.retire_lingering() == {101}
    assert uids.allocate("a") == 100
    assert uids.allocate("b") == 102
    with pytest.raises(UidsExhausted):
        uids.allocate("c")
    live.clear()
    assert uids.allocate("c") == 101


def test_forget_frees_at_once():
    uids = UidAllocator(UidRange(1, 1), live_uids=lambda r: {1})
    assert uids.allocate("a") == 1
    uids.forget(1)
    assert uids.allocate("b") == 1


def test_release_of_a_uid_not_held_is_harmless():
    uids = UidAllocator(UidRange(1, 2))
    uids.release(1)
    assert uids.retired == set()
    assert uids.allocate("a") == 1


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 6),
    steps=st.lists(st.tuples(st.sampled_from(["allocate", "release", "forget", "die"]), st.integers(0, 5)), max_size=60),
)
def test_no_uid_is_ever_shared_by_two_live_holders(size, steps):
    """
    Whatever the order of starts, ends and process deaths: a uid is held by
    one job at a time, and never handed out while a process runs as it.
    """
    alive: set[int] = set()  # uids some process runs as
    uids = UidAllocator(UidRange(1, size), live_uids=lambda r: set(alive))
    held: dict[int, str] = {}
    counter = 0
    for action, pick in steps:
        if action == "allocate":
            counter += 1
            try:
                uid = uids.allocate(str(counter))
            except UidsExhausted:
                assert set(range(1, size + 1)) <= set(held) | alive
                continue
            assert uid not in held and uid not in alive
            held[uid] = str(counter)
            alive.add(uid)
        elif held:
            uid = sorted(held)[pick % len(held)]
            if action == "release":
                del held[uid]
                uids.release(uid)  # its processes may still be dying
            elif action == "forget" and uid in alive:
                del held[uid]
                alive.discard(uid)  # it never ran
                uids.forget(uid)
        if action == "die" and alive - set(held):
            alive.discard(sorted(alive - set(held))[pick % len(alive - set(held))])
        assert uids.holders == held


def test_host_has_id_knows_root_and_not_a_free_uid():
    assert host_has_id(0)
    assert not host_has_id(2**31 - 3)


def test_host_live_uids_finds_a_process_running_as_a_uid():
    if os.getuid() != 0:
        mine = os.getuid()
        assert mine in host_live_uids(UidRange(mine, mine))
        return
    uid = 2**31 - 5
    assert host_live_uids(UidRange(uid, uid)) == set()
    sleeper = subprocess.Popen(["sleep", "30"], user=uid, group=uid, extra_groups=[])
    try:
        assert host_live_uids(UidRange(uid - 1, uid)) == {uid}
    finally:
        sleeper.kill()
        sleeper.wait()
    assert host_live_uids(UidRange(uid, uid)) == set()


def test_a_uid_another_server_claimed_is_skipped():
    others = {101}
    claimed: list[int] = []
    unclaimed: list[int] = []

    def claim(uid: int) -> bool:
        if uid in others:
            return False
        claimed.append(uid)
        return True

    uids = UidAllocator(UidRange(100, 102), claim=claim, unclaim=unclaimed.append)
    assert [uids.allocate("a"), uids.allocate("b")] == [100, 102]
    with pytest.raises(UidsExhausted) as refused:
        uids.allocate("c")
    assert "another server" in refused.value.message
    uids.release(100)
    uids.forget(102)
    assert claimed == [100, 102] and unclaimed == [100, 102]


def test_uid_locks_exclude_each_other_until_unclaimed(tmp_path):
    first, second = UidLocks(str(tmp_path / "locks")), UidLocks(str(tmp_path / "locks"))
    assert first.claim(7)
    assert first.claim(7)  # already ours
    assert not second.claim(7)
    assert second.claim(8)
    first.unclaim(7)
    assert second.claim(7)
    second.close()
    assert first.claim(8) and first.claim(7)
    first.close()
    # Nothing is left once every claim is given back.
    assert os.listdir(tmp_path / "locks") == []


def test_a_lock_on_a_file_unlinked_meanwhile_is_not_a_claim(tmp_path):
    import fcntl

    locks = UidLocks(str(tmp_path))
    # Another server opened the file, then its holder unlinked it.
    stale = os.open(tmp_path / "9", os.O_RDWR | os.O_CREAT)
    os.unlink(tmp_path / "9")
    fcntl.flock(stale, fcntl.LOCK_EX)
    assert locks.claim(9)  # on a new file, not blocked by the stale one
    assert os.path.exists(tmp_path / "9")
    os.close(stale)
    locks.close()


def test_sweep_removes_only_claims_no_live_server_holds(tmp_path):
    live, restarted = UidLocks(str(tmp_path)), UidLocks(str(tmp_path))
    assert live.claim(5)
    # What a server that died left: files nobody holds a lock on.
    for name in ("6", "7"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes").write_bytes(b"")  # not a claim: left alone
    assert restarted.claim(8)
    assert restarted.sweep() == [6, 7]
    assert sorted(os.listdir(tmp_path)) == ["5", "8", "notes"]
    assert not restarted.claim(5)  # still the live server's
    live.close()
    restarted.close()
    assert os.listdir(tmp_path) == ["notes"]
