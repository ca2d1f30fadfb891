from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import RunningServer, make_pki, start_server


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """
    A development PKI: ca, server, admin, alice and bob (users), viewer,
    norole (no OU) and badrole (an unknown OU).
    """
    return make_pki(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def server(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    """
    One server shared by the end-to-end tests that need no special options.
    """
    running = start_server(certs, tmp_path_factory.mktemp("server") / "state")
    yield running
    running.stop()
