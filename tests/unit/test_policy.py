"""
Tests for the authorization policy (L{jobworker.policy}): the whole matrix
of role x operation x whose job.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from jobworker.policy import Identity, Operation, Role, Verdict, authorize, may_see

ALLOW, DENIED, NOT_FOUND = Verdict.ALLOW, Verdict.DENIED, Verdict.NOT_FOUND
OWN, OTHERS, NO_JOB = "own", "other's", "no job"
READ = {Operation.STATUS, Operation.LOGS, Operation.WAIT, Operation.LIST}
ON_A_JOB = READ | {Operation.STOP, Operation.REMOVE}


def owner_for(whose: str, name: str) -> str | None:
    return {OWN: name, OTHERS: "mallory", NO_JOB: None}[whose]


def expected(role: Role | None, operation: Operation, whose: str) -> Verdict:
    """
    The policy of the README, written out independently of the code's table.
    """
    if role is Role.ADMIN:
        return ALLOW
    if role is Role.USER:
        if operation is Operation.START:
            return ALLOW
        return NOT_FOUND if whose == OTHERS else ALLOW
    if role is Role.VIEWER:
        return ALLOW if operation in READ else DENIED
    return DENIED


MATRIX = [
    (role, operation, whose)
    for role in (Role.ADMIN, Role.USER, Role.VIEWER, None)
    for operation in Operation
    for whose in (OWN, OTHERS, NO_JOB)
    # Start acts on no existing job.
    if not (operation is Operation.START and whose != NO_JOB)
]


@pytest.mark.parametrize(
    "role, operation, whose",
    MATRIX,
    ids=[f"{role.value if role else 'none'}-{op.value}-{whose}" for role, op, whose in MATRIX],
)
def test_matrix(role: Role | None, operation: Operation, whose: str) -> None:
    identity = Identity("alice", role)
    assert authorize(identity, operation, owner_for(whose, "alice")) is expected(role, operation, whose)


def test_matrix_is_complete() -> None:
    assert len(MATRIX) == 4 * (1 + 6 * 3)


def test_spot_checks() -> None:
    """
    A few verdicts spelled out, in case expected() and the code share a
    mistake.
    """
    alice = Identity("alice", Role.USER)
    assert authorize(alice, Operation.STOP, "bob") is NOT_FOUND
    assert authorize(alice, Operation.LOGS, "alice") is ALLOW
    assert authorize(alice, Operation.START) is ALLOW
    viewer = Identity("vera", Role.VIEWER)
    assert authorize(viewer, Operation.LOGS, "bob") is ALLOW
    assert authorize(viewer, Operation.STOP, "bob") is DENIED
    assert authorize(viewer, Operation.START) is DENIED
    assert authorize(viewer, Operation.REMOVE, "vera") is DENIED
    assert authorize(Identity("root", Role.ADMIN), Operation.REMOVE, "bob") is ALLOW


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("operation", list(Operation))
def test_empty_name_may_do_nothing(role: Role, operation: Operation) -> None:
    identity = Identity("", role)
    assert authorize(identity, operation, None) is DENIED
    assert authorize(identity, operation, "") is DENIED  # not even "its own" job


@pytest.mark.parametrize("ou", [None, "", "superuser", "Admin", "ADMIN", " admin", "admin ", "root", "users"])
def test_no_or_unknown_role(ou: str | None) -> None:
    assert Role.from_ou(ou) is None
    identity = Identity("alice", Role.from_ou(ou))
    for operation in Operation:
        for owner in ("alice", "bob", None):
            assert authorize(identity, operation, owner) is DENIED
    assert not may_see(identity, "alice")


@pytest.mark.parametrize("ou, role", [("admin", Role.ADMIN), ("user", Role.USER), ("viewer", Role.VIEWER)])
def test_roles_from_ou(ou: str, role: Role) -> None:
    assert Role.from_ou(ou) is role


def test_may_see() -> None:
    assert may_see(Identity("root", Role.ADMIN), "bob")
    assert may_see(Identity("vera", Role.VIEWER), "bob")
    assert may_see(Identity("alice", Role.USER), "alice")
    assert not may_see(Identity("alice", Role.USER), "bob")
    assert not may_see(Identity("alice", None), "alice")


def test_identity_str_names_the_role() -> None:
    assert str(Identity("alice", Role.USER)) == "alice/user"
    assert str(Identity("bob", None)) == "bob/-"


@pytest.mark.parametrize(
    "owner", ["Alice", "ALICE", "alice ", " alice", "alice\x00", "alic", "alicealice", "\u0430lice"]
)
def test_ownership_is_exact(owner: str) -> None:
    """
    A name that merely looks like the caller's (case, spaces, a NUL, a
    Cyrillic a) is someone else.
    """
    alice = Identity("alice", Role.USER)
    for operation in ON_A_JOB:
        assert authorize(alice, operation, owner) is NOT_FOUND
    assert not may_see(alice, owner)


names = st.text(min_size=1, max_size=20)


@settings(max_examples=300, deadline=None)
@given(
    name=names,
    owner=names,
    role=st.sampled_from([Role.ADMIN, Role.USER, Role.VIEWER, None]),
    operation=st.sampled_from(list(Operation)),
)
def test_a_user_sees_only_exactly_its_own_jobs(name: str, owner: str, role: Role | None, operation: Operation) -> None:
    """
    Ownership is exact string equality of names: "alice" does not own
    "Alice"'s or "alice "'s jobs.
    """
    verdict = authorize(Identity(name, role), operation, owner)
    if operation is not Operation.START:
        assert verdict is expected(role, operation, OWN if owner == name else OTHERS)
    assert may_see(Identity(name, role), owner) is (
        role in (Role.ADMIN, Role.VIEWER) or (role is Role.USER and owner == name)
    )


@settings(max_examples=200, deadline=None)
@given(name=names, owner=st.one_of(st.none(), names), operation=st.sampled_from(list(Operation)))
def test_denied_beats_not_found(name: str, owner: str | None, operation: Operation) -> None:
    """
    An operation the role lacks is DENIED whoever owns the job: NOT_FOUND
    is only ever the answer for an operation the role has.
    """
    for role in Role:
        verdict = authorize(Identity(name, role), operation, owner)
        if verdict is NOT_FOUND:
            assert authorize(Identity(name, role), operation, name) is ALLOW
