"""
Fuzzing a live server (the CI-sized run; C{bench/fuzz.py} is the long one):
raw inputs over real TLS after a valid hello; see L{tests.fuzzing} for the
inputs and what counts as a crash, and L{tests.unit.test_fuzz} for the
sans-IO core and the server protocol in memory.
"""

from __future__ import annotations

from pathlib import Path

from tests.fuzzing import LiveTarget, assert_clean, print_report, run_parallel

LIVE_INPUTS = 300


def _isolation() -> list[str]:
    """
    As root the server runs jobs in namespaces, as it would in production
    (the starts that the fuzzer makes mostly fail: no such command); as
    anyone else it must run them without.
    """
    import os

    return [] if os.geteuid() == 0 else ["--no-isolation"]


def test_fuzz_a_live_server(certs: Path, tmp_path: Path) -> None:
    """
    Raw inputs over real TLS after a valid hello, against a real server
    (no cgroups: what is tested is the protocol): no
    traceback in its log, and it is still alive and serving at the end.
    """
    from jobworker.blocking.tls import client_ssl_context
    from tests.support import start_server

    server = start_server(
        certs, tmp_path / "state", *_isolation(), "--cgroups", "none", "--frame-timeout", "1",
        "--max-finished-jobs", "20", "--audit-rate-limit", "0",
    )
    try:
        context = client_ssl_context(certs / "ca.pem", certs / "alice.pem", certs / "alice.key")
        report, targets = run_parallel(lambda: LiveTarget("127.0.0.1", server.port, context), LIVE_INPUTS, 20261203, 6)
        for target in targets:
            target.close()
        assert server.alive()
        with server.client("alice") as client:
            client.list()
        log = server.log()
    finally:
        server.stop()
    print_report(f"live server ({sum(target.connections for target in targets)} connections)", report, 0)
    assert_clean(report)
    assert "Traceback" not in log and "Unhandled" not in log, log[-3000:]
    assert report.inputs == LIVE_INPUTS
