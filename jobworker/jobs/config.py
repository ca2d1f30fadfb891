"""
The job manager's settings (the plugin's options that concern jobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from jobworker.host.uids import DEFAULT_LOCK_DIRECTORY, UidRange
from jobworker.limits import Limits
from jobworker.output.log import DEFAULT_RETENTION, DEFAULT_RING_SIZE

__all__ = ["JobManagerConfig"]


@dataclass
class JobManagerConfig:
    """
    Settings of the job manager; each maps to an option of the plugin.

    @ivar state_dir: where job records and output spools live.
    @ivar isolate: run every job in its own PID, mount, IPC and network
        namespace.
    @ivar job_user: the user jobs run as unless an admin asks otherwise;
        None runs each as a uid of its own from C{job_uids} or, without
        them, as the server's own user (only sensible unprivileged).
    @ivar job_uids: the range of uids given to jobs one each (root only).
    @ivar uid_lock_dir: where servers of one host claim the uids they hand
        out (L{UidLocks}).
    @ivar scratch_bytes: size of the tmpfs that holds an isolated job's
        private C{/tmp}, C{/var/tmp} and C{/dev/shm} together (charged to
        the job's memory); 0: the job sees the host's.
    @ivar private_sys: give an isolated job with its own network namespace
        its own read-only C{/sys}.
    @ivar hidden_paths: paths a job must not reach, besides the state dir
        (always hidden): the server's TLS key, for one.
    @ivar default_limits: applied to every unset limit of every job.
    @ivar caps: the most a non-admin may ask for; 0 fields are uncapped.
    @ivar max_jobs_per_identity: running jobs one identity may have at once.
    @ivar max_finished_jobs: finished jobs kept; the oldest beyond are removed.
    @ivar default_grace_s: seconds between a stop's SIGTERM and its SIGKILL
        when the stop names none (shutdown, timeout).
    @ivar ring_size: bytes of each job's newest output kept in memory.
    @ivar retention: bytes of each job's output kept in its spool.
    @ivar live_restore: at shutdown, leave running jobs running (each
        under its own supervisor) for the next server on this state dir
        to take back, instead of stopping them (C{--live-restore}).
    @ivar zygote: fork each isolated job's supervisor from one pre-started
        helper (L{jobworker.jobs.supervisor.Zygote}) rather than start an
        interpreter per job; off in tests that play the helper themselves.
    """

    state_dir: str
    isolate: bool = True
    job_user: str | None = None
    job_uids: UidRange | None = None
    uid_lock_dir: str = DEFAULT_LOCK_DIRECTORY
    scratch_bytes: int = 0
    private_sys: bool = True
    hidden_paths: tuple[str, ...] = ()
    default_limits: Limits = field(default_factory=lambda: Limits(pids=1024))
    caps: Limits = field(default_factory=Limits)
    default_grace_s: float = 10.0
    max_jobs_per_identity: int = 256
    max_finished_jobs: int = 1000
    ring_size: int = DEFAULT_RING_SIZE
    retention: int = DEFAULT_RETENTION
    live_restore: bool = False
    zygote: bool = True
