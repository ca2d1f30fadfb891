"""
Killing a job's cgroup blocks (a driver polls until the cgroup is empty, up
to seconds): it must run in the thread pool, never on the reactor thread,
where it would stall every connection.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, reactor, task

from jobworker.host.cgroups import Usage
from jobworker.jobs.manager import JobManager, JobManagerConfig
from jobworker.limits import Limits
from jobworker.policy import Identity, Role
from jobworker.protocol import messages as m
from tests.support import need_root

KILL_S = 0.6


class SlowCgroup:
    """
    A job cgroup whose kill takes C{KILL_S} seconds, as a real one waiting
    for a frozen task does; it records the threads it was called on.
    """

    def __init__(self, directory: Path) -> None:
        self.procs = directory / "cgroup.procs"
        self.procs.write_text("")
        self.procs_files = [str(self.procs)]
        self.path_description = str(directory)
        self.kill_threads: list[str] = []

    def kill(self) -> None:
        self.kill_threads.append(threading.current_thread().name)
        time.sleep(KILL_S)

    def remove(self) -> None:
        self.kill()

    def usage(self) -> Usage:
        return Usage()


class SlowDriver:
    name = "slow"
    controllers = frozenset({"cpu", "memory", "io", "pids"})
    base_description = "nowhere"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.made: list[SlowCgroup] = []

    def prepare(self) -> None:
        pass

    def cleanup_stale(self) -> list[str]:
        return []

    def release(self) -> None:
        pass

    def prime_moves(self) -> None:
        pass

    def create(self, name: str, limits: Any) -> SlowCgroup:
        path = self.directory / name
        path.mkdir()
        self.made.append(SlowCgroup(path))
        return self.made[-1]


@pytest_twisted.ensureDeferred
async def test_cgroup_kill_runs_off_the_reactor_thread(tmp_path: Path) -> None:
    need_root()
    driver = SlowDriver(tmp_path)
    config = JobManagerConfig(state_dir=str(tmp_path / "state"), isolate=False, job_user=None, default_limits=Limits())
    manager = JobManager(reactor, config, cgroup_driver=driver)
    manager.startService()
    try:
        job = await manager.start(Identity("admin", Role.ADMIN), m.StartRequest(1, ("sleep", "30")))
        ticks: list[float] = []
        beat = task.LoopingCall(lambda: ticks.append(time.monotonic()))
        beat.start(0.02)
        job.stop("test", 0)  # SIGKILL of the whole cgroup, at once
        await job.when_ended()
        await task.deferLater(reactor, 0.1, lambda: None)
        beat.stop()
        gaps = [later - earlier for earlier, later in zip(ticks, ticks[1:])]
        [cgroup] = driver.made
        assert cgroup.kill_threads, "the cgroup was never killed"
        assert threading.main_thread().name not in cgroup.kill_threads, cgroup.kill_threads
        assert max(gaps) < KILL_S / 2, f"the reactor stalled for {max(gaps):.2f} s"
    finally:
        await defer.ensureDeferred(_stop(manager))


async def _stop(manager: JobManager) -> None:
    result = manager.stopService()
    if isinstance(result, defer.Deferred):
        await result
