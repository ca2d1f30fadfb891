"""
Jobs: what the server does with a start request, and everything it keeps about a job.

Twisted glue over the pure core and the host adapters: the job manager and the life of one job
(L{jobworker.jobs.manager}), and the state directory of job records (L{jobworker.jobs.store}).
"""
