"""
Who may do what: identity and role from the client certificate, the
operation, and the job's owner decide.

Pure: no I/O.  The table below is the whole policy.

A job owned by someone else answers exactly like a job that does not exist
(L{Verdict.NOT_FOUND}), so a user cannot learn which job ids exist; an
operation the role lacks answers L{Verdict.DENIED}.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Role", "Operation", "Verdict", "Identity", "authorize", "may_see"]


class Role(Enum):
    ADMIN = "admin"
    USER = "user"
    VIEWER = "viewer"

    @classmethod
    def from_ou(cls, ou: str | None) -> Role | None:
        """
        The role named by a certificate's OU; None for none or unknown.
        """
        try:
            return cls(ou) if ou else None
        except ValueError:
            return None


class Operation(Enum):
    START = "start"
    STOP = "stop"
    STATUS = "status"
    LOGS = "logs"
    WAIT = "wait"
    LIST = "list"
    REMOVE = "remove"


class Verdict(Enum):
    ALLOW = "allow"
    DENIED = "denied"  # the role may not do this at all
    NOT_FOUND = "not-found"  # the job is not visible to this identity


@dataclass(frozen=True)
class Identity:
    """
    A verified client: C{name} is the certificate's CN, C{role} from its OU
    (None when absent or unknown: such a client may do nothing).
    """

    name: str
    role: Role | None

    def __str__(self) -> str:
        return f"{self.name}/{self.role.value if self.role else '-'}"


_READ = {Operation.STATUS, Operation.LOGS, Operation.WAIT, Operation.LIST}
_OWNED = _READ | {Operation.STOP, Operation.REMOVE}

# Role -> (operations allowed, of which: those limited to the caller's jobs).
_TABLE: dict[Role, tuple[frozenset[Operation], frozenset[Operation]]] = {
    Role.ADMIN: (frozenset(Operation), frozenset()),
    Role.USER: (frozenset(_OWNED | {Operation.START}), frozenset(_OWNED)),
    Role.VIEWER: (frozenset(_READ), frozenset()),
}


def authorize(identity: Identity, operation: Operation, owner: str | None = None) -> Verdict:
    """
    Decide whether C{identity} may perform C{operation} on a job owned by
    C{owner} (None for operations on no particular job: start, list).
    """
    if identity.role is None or not identity.name:
        return Verdict.DENIED
    allowed, owned_only = _TABLE[identity.role]
    if operation not in allowed:
        return Verdict.DENIED
    if owner is not None and operation in owned_only and owner != identity.name:
        return Verdict.NOT_FOUND
    return Verdict.ALLOW


def may_see(identity: Identity, owner: str) -> bool:
    """
    Whether a job owned by C{owner} appears in C{identity}'s job list.
    """
    return authorize(identity, Operation.STATUS, owner) is Verdict.ALLOW
