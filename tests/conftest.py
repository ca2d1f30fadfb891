from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RunningServer, fork_jobcli, make_pki, remove_leftover_cgroups, start_server


@pytest.fixture(scope="session", autouse=True)
def _no_cgroups_left_behind():
    """
    At the end of the run, remove what servers killed on purpose left in
    the cgroup hierarchies (see L{remove_leftover_cgroups}).
    """
    yield
    for path in remove_leftover_cgroups():
        print(f"\nA cgroup of this test run still holds a process: {path}")


@pytest.fixture(autouse=True)
def _how_jobcli_runs(request: pytest.FixtureRequest) -> Iterator[None]:
    """
    jobcli runs as a program of its own in the tests marked C{real_jobcli},
    in a fork of this process in the others (L{tests.support.JOBCLI_MODE}).
    """
    fork_jobcli(request.node.get_closest_marker("real_jobcli") is None)
    yield
    fork_jobcli(False)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    A development PKI: ca, server, admin, alice and bob (users), viewer,
    norole (no OU) and badrole (an unknown OU).
    """
    return make_pki(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def server(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """
    One server shared by the end-to-end tests that need no special options.
    """
    running = start_server(certs, tmp_path_factory.mktemp("server") / "state")
    yield running
    running.stop()
