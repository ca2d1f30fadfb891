"""
A job as admitted: everything decided about it before any host call.

L{JobSpec} is what L{jobworker.jobs.admission.admit} makes of a start
request, what a L{jobworker.jobs.job.Job} keeps (never the wire request), and
what is rebuilt from a job record at start-up.  Pure data: no reactor, no
I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobworker.limits import Limits
from jobworker.protocol.messages import Network

__all__ = ["JobSpec"]


@dataclass(frozen=True)
class JobSpec:
    """
    One job's command, its environment and the rules it runs under.

    @ivar owner: the identity the job belongs to (its certificate's name).
    @ivar argv: the command and its arguments; argv[0] non-empty.
    @ivar env: the variables the request set, in its order (the server adds
        C{PATH}, C{LANG} and C{HOME} under them when it starts the helper).
    @ivar workdir: the absolute directory the command starts in (C{"/"} when
        the request named none).
    @ivar network: the job's network: its own loopback only, or the host's.
    @ivar user: the account the command runs as; C{""}: a uid of its own
        from the server's range.
    @ivar limits: the job's limits: what was asked, the server's defaults for
        the rest and, for a non-admin, its caps.
    @ivar cgroup_limits: the limits written to the job's cgroup: C{limits}
        less the server's defaults that this host cannot enforce.
    @ivar name: the job's name, C{""} for none (L{jobworker.jobnames}).
    @ivar labels: the job's labels, (key, value) in the order given.
    """

    owner: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    workdir: str = "/"
    network: Network = Network.NONE
    user: str = ""
    limits: Limits = Limits()
    cgroup_limits: Limits = Limits()
    name: str = ""
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def has_own_uid(self) -> bool:
        """
        The job runs as a uid of its own, not as a named account.
        """
        return not self.user

    @property
    def timeout_s(self) -> float | None:
        """
        Seconds the job may run once started before it is stopped; None:
        no timeout.
        """
        return self.limits.timeout_ms / 1000 if self.limits.timeout_ms else None
