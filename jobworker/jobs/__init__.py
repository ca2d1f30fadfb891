"""
Jobs: what the server does with a start request, and everything it keeps about a job.

Life of a job
=============

    start request
        -> admitted                                   => a JobSpec        (admission, spec)
        -> a uid, a spool, a cgroup with its limits   (host adapters: jobworker.host)
        -> the helper spawned                         (helper; jobworker/host/isolate.py)
             joins the cgroup, isolates, drops privileges, execs the command
        -> status pipe (fd 3) says started or failed   => STARTING -> RUNNING | FAILED
        -> output read from the job's pipes into its OutputLog              (pipes)
        -> the helper ends, the pipes reach EOF
        -> usage read, cgroup killed and removed      => EXITED | SIGNALED | STOPPED
                                                         | OOM | TIMEOUT    (fate)

A stop sends SIGTERM to the job (the helper forwards it to the command's
process group inside the namespace) and, after the grace period, SIGKILL to
every process of the job's cgroup.

Modules, from the bottom up (each imports only those above it, and the
layers below: the protocol's messages, policy, limits, jobworker.host,
jobworker.output):

  - L{jobworker.jobs.spec}: L{JobSpec}, a job as admitted (pure).
  - L{jobworker.jobs.admission}: L{admit}, every rule of a start request,
    decided before any host call (pure).
  - L{jobworker.jobs.lifecycle}: the transition table of a job's phases (pure).
  - L{jobworker.jobs.fate}: how a job ended, from what its helper said (pure).
  - L{jobworker.jobs.config}: L{JobManagerConfig}, the manager's settings.
  - L{jobworker.jobs.store}: job records and output spools on disk.
  - L{jobworker.jobs.pipes}: reading a job's output pipes into its log.
  - L{jobworker.jobs.helper}: the helper's configuration, start and status
    lines (the contract itself is L{jobworker.host.contract}).
  - L{jobworker.jobs.report}: a job's usage and error text (no reactor).
  - L{jobworker.jobs.timers}: L{JobTimers}, a job's delayed calls by name.
  - L{jobworker.jobs.job}: L{Job}, one job's processes, stop and end.
  - L{jobworker.jobs.persistence}: records saved (retried on a full disk)
    and jobs rebuilt from them.
  - L{jobworker.jobs.manager}: L{JobManager}, the service: start, find,
    remove, and stop every job at shutdown.

The glue modules take the reactor as an argument and never import it, so
their tests drive timers with L{twisted.internet.task.Clock}.
"""
