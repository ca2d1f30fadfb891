"""
Admission: what the server decides about a start request before it touches
the host.

L{admit} is pure (no reactor, no files, no processes, no user database): from
the caller's identity, the request and the server's L{AdmissionConfig} it
either returns the L{JobSpec} the job will run with or raises the
L{RequestError} the client gets, with its stable code.  The checks run in a
fixed order, so a request wrong in several ways always gets the same answer:

  1. the caller's role may start jobs                  PERMISSION_DENIED
  2. the limits decoded                                INVALID_LIMITS
  3. command, environment, workdir and user strings,
     the name and labels (jobworker.jobnames)         BAD_REQUEST
  4. limits within the caps (non-admins)               INVALID_LIMITS
  5. the job user (only an admin may choose one)       PERMISSION_DENIED
  6. the host network (admins only)                    PERMISSION_DENIED
  7. the caller's running jobs below the limit         TOO_MANY_JOBS
  8. limits a server without cgroups cannot enforce    UNSUPPORTED_LIMIT

What needs the host (a uid, the user's account, the spool, the cgroup, the
helper) comes after, in the job manager.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from jobworker.errors import ErrorCode, RequestError
from jobworker.jobnames import NameError_, check_labels, check_name
from jobworker.jobs.spec import JobSpec
from jobworker.limits import LIMIT_CONTROLLERS, Limits
from jobworker.policy import Identity, Operation, Role, Verdict, authorize
from jobworker.protocol.messages import InvalidLimits, Network, StartRequest

__all__ = [
    "AdmissionConfig",
    "MAX_ARGV_BYTES",
    "MAX_ARGV_ITEMS",
    "MAX_ENV_BYTES",
    "MAX_ENV_ITEMS",
    "admit",
    "check_request",
    "check_verdict",
    "enforceable_limits",
    "limits_for",
]

# Limits on a start request, so one request cannot make us hold much: the
# helper gets argv and the environment in one JSON document, and the kernel
# takes at most ARG_MAX (2 MiB by default) of both at execve().  Bytes count
# UTF-8 plus one terminating NUL per string (for the environment, also "=").
MAX_ARGV_ITEMS = 4096
MAX_ARGV_BYTES = 256 << 10
MAX_ENV_ITEMS = 1024
MAX_ENV_BYTES = 256 << 10


@dataclass(frozen=True)
class AdmissionConfig:
    """
    The server's settings that admission reads.

    @ivar default_limits: applied to every unset limit of every job.
    @ivar caps: the most a non-admin may ask for; 0 fields are uncapped.
    @ivar default_user: the account jobs run as unless an admin asks for
        another; C{""}: each job gets a uid of its own.
    @ivar controllers: the cgroup controllers this host has for jobs; None
        when the server runs without cgroups (then only a timeout can be
        enforced).
    @ivar max_jobs_per_identity: running jobs one identity may have at once.
    """

    default_limits: Limits = Limits()
    caps: Limits = Limits()
    default_user: str = ""
    controllers: frozenset[str] | None = None
    max_jobs_per_identity: int = 256


def admit(identity: Identity, request: StartRequest, config: AdmissionConfig, *, running: int = 0) -> JobSpec:
    """
    Decide the job a start request asks for.

    @param running: the jobs of C{identity} that have not ended yet.
    @raise RequestError: the request is refused (see the module docstring
        for the order of the checks and their codes).
    """
    check_verdict(authorize(identity, Operation.START))
    if isinstance(request.limits, InvalidLimits):
        raise RequestError(f"invalid limits: {request.limits.reason}", ErrorCode.INVALID_LIMITS)
    is_admin = identity.role is Role.ADMIN
    check_request(request)
    limits = limits_for(request.limits, config, is_admin)
    user = _user_for(request.user, config.default_user, is_admin)
    if request.network is Network.HOST and not is_admin:
        raise RequestError("only an admin may use the host network", ErrorCode.PERMISSION_DENIED)
    if running >= config.max_jobs_per_identity:
        raise RequestError(f"{identity.name} already has {running} running jobs (the limit)", ErrorCode.TOO_MANY_JOBS)
    if config.controllers is None:
        _refuse_unenforceable(request.limits)
        cgroup_limits = limits
    else:
        cgroup_limits = enforceable_limits(limits, request.limits, config.controllers)
    return JobSpec(
        owner=identity.name,
        argv=tuple(request.argv),
        env=tuple(request.env),
        workdir=request.workdir or "/",
        network=request.network,
        user=user,
        limits=limits,
        cgroup_limits=cgroup_limits,
        name=request.name,
        labels=tuple(request.labels),
    )


def check_verdict(verdict: Verdict) -> None:
    """
    Raise the answer to a verdict that is not ALLOW.
    """
    if verdict is Verdict.DENIED:
        raise RequestError("permission denied", ErrorCode.PERMISSION_DENIED)
    if verdict is Verdict.NOT_FOUND:
        raise RequestError("no such job", ErrorCode.NOT_FOUND)


def check_request(request: StartRequest) -> None:
    """
    The rules every string of a start request follows.

    @raise RequestError: C{BAD_REQUEST}: an empty command, a command line
        or environment above the MAX_* sizes, a NUL byte anywhere, a bad
        variable name, a relative workdir, a name or labels that break the
        rules of L{jobworker.jobnames}.
    """
    if not request.argv or not request.argv[0]:
        raise RequestError("empty command", ErrorCode.BAD_REQUEST)
    argv_bytes = sum(len(arg.encode()) + 1 for arg in request.argv)
    if len(request.argv) > MAX_ARGV_ITEMS or argv_bytes > MAX_ARGV_BYTES:
        raise RequestError(
            f"command line too long ({len(request.argv)} arguments, {argv_bytes} bytes; "
            f"at most {MAX_ARGV_ITEMS} and {MAX_ARGV_BYTES})",
            ErrorCode.BAD_REQUEST,
        )
    env_bytes = sum(len(k.encode()) + len(v.encode()) + 2 for k, v in request.env)
    if len(request.env) > MAX_ENV_ITEMS or env_bytes > MAX_ENV_BYTES:
        raise RequestError(
            f"environment too large ({len(request.env)} variables, {env_bytes} bytes; "
            f"at most {MAX_ENV_ITEMS} and {MAX_ENV_BYTES})",
            ErrorCode.BAD_REQUEST,
        )
    for item in (*request.argv, *(k for k, _ in request.env), *(v for _, v in request.env), request.workdir, request.user):
        if "\0" in item:
            raise RequestError("NUL byte in the command, environment, workdir or user", ErrorCode.BAD_REQUEST)
    for key, _ in request.env:
        if not key or "=" in key:
            raise RequestError(f"bad environment variable name {key[:64]!r}", ErrorCode.BAD_REQUEST)
    if request.workdir and not request.workdir.startswith("/"):
        raise RequestError("workdir must be an absolute path", ErrorCode.BAD_REQUEST)
    try:
        check_name(request.name)
        check_labels(request.labels)
    except NameError_ as exc:
        raise RequestError(str(exc), ErrorCode.BAD_REQUEST) from None


def limits_for(requested: Limits, config: AdmissionConfig, is_admin: bool) -> Limits:
    """
    The limits a job gets: what was asked, the server's defaults for the
    rest, and for a non-admin the caps: asking above a cap is refused, and
    a default above a cap (or no default where a cap exists) becomes the
    cap.
    """
    limits = requested.with_defaults(config.default_limits)
    if is_admin:
        return limits
    over = requested.describe_above(config.caps)
    if over:
        raise RequestError(f"limits above what this server allows a non-admin: {over}", ErrorCode.INVALID_LIMITS)
    return limits.capped(config.caps)


def enforceable_limits(limits: Limits, requested: Limits, controllers: frozenset[str]) -> Limits:
    """
    C{limits} less the server's defaults that this host cannot enforce (they
    are logged at start-up); a limit the client asked for stays, so that the
    cgroup driver refuses it with a clear error.
    """
    dropped = {
        name: 0
        for name, controller in LIMIT_CONTROLLERS.items()
        if controller not in controllers and not getattr(requested, name)
    }
    return replace(limits, **dropped)


def _refuse_unenforceable(requested: Limits) -> None:
    # Without cgroups only the timeout, which the server keeps itself, holds.
    if not replace(requested, timeout_ms=0).is_empty():
        raise RequestError(
            "this server has no cgroup support, so it cannot enforce the requested limits",
            ErrorCode.UNSUPPORTED_LIMIT,
        )


def _user_for(requested: str, default: str, is_admin: bool) -> str:
    """
    The account the job runs as: C{""} for a uid of its own.
    """
    if not requested or requested == default:
        return default
    if not is_admin:
        raise RequestError("only an admin may choose the job user", ErrorCode.PERMISSION_DENIED)
    return requested
