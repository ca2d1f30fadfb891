"""
The server's bounds under a real C{twistd}: with C{--logfile} the file
rotates and the rotated files are bounded.  The in-memory bounds are
L{tests.unit.test_server_bounds}.
"""

from __future__ import annotations

import uuid
from pathlib import Path


def test_twistd_log_file_rotation_is_bounded(certs: Path, tmp_path: Path) -> None:
    """
    With C{twistd --logfile}, the file rotates at C{--log-rotate-size} and
    at most C{--log-keep} rotated files remain, old ones from earlier runs
    included (twistd alone keeps every one).
    """
    import subprocess
    import time

    from jobworker.errors import RequestError as _RequestError  # noqa: F401  (what the client raises)
    from tests.support import BIN, REPO, RunningServer, free_port

    log_path = tmp_path / "logs" / "jobworker.log"
    log_path.parent.mkdir()
    (tmp_path / "logs" / "jobworker.log.7").write_text("left by an earlier run\n")
    port = free_port()
    state = tmp_path / "state"
    state.mkdir()
    command = [
        str(BIN / "twistd"), "-n", "--pidfile=", f"--logfile={log_path}", "jobworker",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--ca", str(certs / "ca.pem"), "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"),
        "--state-dir", str(state), "--cgroups", "none", "--no-isolation",
        "--log-rotate-size", "8K", "--log-keep", "3", "--audit-rate-limit", "0",
    ]
    process = subprocess.Popen(command, cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server = RunningServer(certs, state, port, process, log_path)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client = server.client("alice")
                break
            except Exception:
                time.sleep(0.1)
        else:
            raise AssertionError("the server did not come up")
        with client:
            for _ in range(400):
                try:
                    client.status(uuid.uuid4())
                except Exception:
                    pass
        time.sleep(0.5)
    finally:
        server.stop()
    rotated = sorted(path.name for path in log_path.parent.iterdir() if path.name != "jobworker.log")
    assert rotated == ["jobworker.log.1", "jobworker.log.2", "jobworker.log.3"], rotated
    assert all(path.stat().st_size <= 8192 + 4096 for path in log_path.parent.iterdir())
