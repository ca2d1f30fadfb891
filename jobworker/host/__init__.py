"""
Host adapters: everything that talks to the Linux kernel about a job.

Cgroup drivers (L{jobworker.host.cgroups}), the per-job isolation helper that runs as a program of
its own (L{jobworker.host.isolate}), the uid allocator (L{jobworker.host.uids}) and returning freed
memory to the system (L{jobworker.host.memory}).  Nothing here imports Twisted.
"""
