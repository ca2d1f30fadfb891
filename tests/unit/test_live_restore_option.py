"""
C{--live-restore} (issue 16, item 2): the option and its configuration key
reach the job manager's settings through C{makeService}, and the job
manager's C{stopService} then detaches every running job instead of
stopping it, and waits for none of them.  No reactor, no processes: the
jobs are fakes that record what the manager asked of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from jobworker.jobs.manager import JobManager, JobManagerConfig
from jobworker.pki import make_dev_pki
from jobworker.protocol.messages import JobState
from jobworker.server import service


class FakeJob:
    """
    What stopService uses of a job: whether it is final, its uid, C{stop},
    C{detach} and C{when_ended}; each call is recorded.
    """

    def __init__(self, name: str, *, final: bool = False) -> None:
        self.job_id = name
        self.uid = -1
        self.is_final = final
        self.calls: list[tuple[Any, ...]] = []
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def stop(self, by: str, grace_s: float, **kwargs: Any) -> None:
        self.calls.append(("stop", by, grace_s))

    def detach(self) -> None:
        self.calls.append(("detach",))

    def when_ended(self) -> defer.Deferred[Any]:
        self.calls.append(("when_ended",))
        return self.ended

    def end(self) -> None:
        self.is_final = True
        self.ended.callback(JobState.STOPPED)


def started_manager(tmp_path: Path, live_restore: bool) -> tuple[JobManager, list[FakeJob]]:
    config = JobManagerConfig(state_dir=str(tmp_path / "state"), isolate=False, default_grace_s=4.0,
                              live_restore=live_restore)
    manager = JobManager(MemoryReactorClock(), config)
    manager.startService()
    jobs = [FakeJob("running-1"), FakeJob("running-2"), FakeJob("finished", final=True)]
    for job in jobs:
        manager.jobs[job.job_id] = job  # type: ignore[index, assignment]
    return manager, jobs


def fired(deferred: defer.Deferred[Any]) -> bool:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return bool(results)


def test_live_restore_is_off_by_default():
    assert JobManagerConfig(state_dir="/nonexistent").live_restore is False
    parsed = service.Options()
    parsed.parseOptions(["--state-dir", "/nonexistent/state"])
    assert not parsed["live-restore"]


def test_stop_service_with_live_restore_detaches_running_jobs_and_waits_for_none(tmp_path):
    manager, (first, second, finished) = started_manager(tmp_path, live_restore=True)
    stopped = manager.stopService()
    assert first.calls == [("detach",)]
    assert second.calls == [("detach",)]
    assert finished.calls == []  # a finished job has nothing to leave running
    # Nothing waits for the jobs' ends: they go on under the next server.
    assert fired(stopped)
    # New starts are refused from the moment the stop began.
    assert manager._shutting_down


def test_stop_service_without_live_restore_stops_running_jobs_and_waits(tmp_path):
    manager, (first, second, finished) = started_manager(tmp_path, live_restore=False)
    stopped = manager.stopService()
    assert first.calls == [("when_ended",), ("stop", "shutdown", 4.0)]
    assert second.calls == [("when_ended",), ("stop", "shutdown", 4.0)]
    assert finished.calls == []
    assert not fired(stopped)
    first.end()
    assert not fired(stopped)
    second.end()
    assert fired(stopped)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    make_dev_pki(directory)
    return directory


def manager_of(pki: Path, tmp_path: Path, argv: list[str], config: str | None = None) -> JobManager:
    """
    The job manager that C{makeService} builds from C{argv} (and a
    configuration file holding C{config}); nothing is started.
    """
    arguments = [
        "--state-dir", str(tmp_path / "state"), "--cgroups", "none", "--listen", "tcp:0:interface=127.0.0.1",
        "--ca", str(pki / "ca.pem"), "--cert", str(pki / "server.pem"), "--key", str(pki / "server.key"),
    ]
    if config is not None:
        path = tmp_path / "jobworker.toml"
        path.write_text(config)
        arguments += ["--config", str(path)]
    options = service.Options()
    options.parseOptions([*arguments, *argv])
    top = service.makeService(options, reactor=MemoryReactorClock())
    (manager,) = [child for child in top if isinstance(child, JobManager)]
    return manager


@pytest.mark.parametrize(
    ("argv", "config", "expected"),
    [
        ([], None, False),
        (["--live-restore"], None, True),
        ([], "live-restore = true\n", True),
        ([], "live-restore = false\n", False),
    ],
    ids=["default", "command-line", "config-true", "config-false"],
)
def test_live_restore_reaches_the_job_managers_config(pki, tmp_path, argv, config, expected):
    assert manager_of(pki, tmp_path, argv, config).config.live_restore is expected
