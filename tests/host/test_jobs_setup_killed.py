"""
An isolated job whose helper is killed while it sets the job up, before it
says C{started} or C{failed}: the start must fail.  Twisted reports the EOF
of the helper's status pipe before the helper's end, and that EOF alone
once read as the command's start (the job then "ran" and ended OOM).

The kill is the kernel's: a memory limit of 1 MiB is far below what the
helper (a Python process) touches after it joins the job's cgroup, so the
OOM killer ends it in set-up every time, before the command could run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest_twisted
from twisted.internet import defer, reactor

from jobworker.host.cgroups import detect
from jobworker.jobs.manager import JobManager, JobManagerConfig
from jobworker.limits import Limits
from jobworker.policy import Identity, Role
from jobworker.protocol import messages as m
from tests.support import need, need_root

# Per test run, so two runs on one machine never clean up each other's jobs.
PREFIX = f"jobworker-test-setup-{os.getpid()}"

# Far below the helper's own footprint (several MiB), above the kernel's
# floor for a limit.
TINY_MEMORY = 1 << 20


@pytest_twisted.ensureDeferred
async def test_a_limit_below_the_helpers_footprint_still_runs_the_command(tmp_path: Path) -> None:
    need_root()
    need(os.path.exists("/proc/self/ns/pid"), "needs PID namespaces")
    driver = detect(prefix=PREFIX)
    need(driver is not None and "memory" in driver.controllers, "needs a cgroup memory controller")
    assert driver is not None
    driver.prepare()
    config = JobManagerConfig(state_dir=str(tmp_path / "state"), isolate=True, job_user=None, default_limits=Limits())
    manager = JobManager(reactor, config, cgroup_driver=driver)
    manager.startService()
    try:
        marker = tmp_path / "ran"
        request = m.StartRequest(1, ("touch", str(marker)), limits=Limits(memory_bytes=TINY_MEMORY))
        job = await manager.start(Identity("admin", Role.ADMIN), request)
        status = await job.when_ended()
        assert (status.state, status.exit_code) == (m.JobState.EXITED, 0), status.error
        assert marker.exists()  # the command ran, under its 1 MiB limit
    finally:
        result = manager.stopService()
        if isinstance(result, defer.Deferred):
            await result
        driver.cleanup_stale()
        driver.release()
