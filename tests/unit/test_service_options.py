"""
The server's options for tenants: the uid range, scratch size, hidden paths
and the caps for non-admins (derived from the machine unless set).
"""

from __future__ import annotations

import os

import pytest
from twisted.python import usage

from jobworker.host.uids import UidRange
from jobworker.limits import Limits, host_caps
from jobworker.server import service


def options(*argv: str) -> service.Options:
    parsed = service.Options()
    parsed.parseOptions(["--state-dir", "/nonexistent/state", *argv])
    return parsed


def test_caps_default_to_the_machines():
    derived = host_caps(service.host_memory_bytes(), service.host_cpus())
    assert options()["caps"] == derived
    assert derived.memory_bytes and derived.cpu_millicores and derived.pids


def test_a_cap_set_by_the_operator_wins_and_none_removes_it():
    caps = options("--max-memory", "1G", "--max-cpu", "none", "--max-pids", "none", "--max-timeout", "1h")["caps"]
    assert caps == Limits(memory_bytes=1 << 30, timeout_ms=3_600_000)


def test_tmp_size():
    assert options()["tmp-bytes"] == service.host_memory_bytes() // 10
    assert options("--tmp-size", "64M")["tmp-bytes"] == 64 << 20
    assert options("--tmp-size", "none")["tmp-bytes"] == 0
    with pytest.raises(usage.UsageError):
        options("--tmp-size", "lots")


def test_job_uids():
    assert options()["job-uid-range"] == UidRange(61184, 65519)
    assert options("--job-uids", "70000-70009")["job-uid-range"] == UidRange(70000, 70009)
    with pytest.raises(usage.UsageError, match="--job-uids"):
        options("--job-uids", "9-1")


def test_hide_path_is_repeatable_and_absolute():
    parsed = options("--hide-path", "/etc/secret", "--hide-path", "relative/dir")
    assert parsed["hide-paths"] == ["/etc/secret", os.path.abspath("relative/dir")]


def test_secret_paths_are_the_key_its_directory_and_the_extras(tmp_path):
    key = tmp_path / "pki" / "server.key"
    assert service.secret_paths(str(key), ["/etc/shadow"]) == (str(key), str(key.parent), "/etc/shadow")
    # A key in a directory every job needs: only the key itself.
    assert service.secret_paths("/etc/server.key", []) == ("/etc/server.key",)
