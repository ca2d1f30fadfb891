from __future__ import annotations

import json

import pytest

# About jobcli as a program: it runs as one (tests/support.py, JOBCLI_MODE).
pytestmark = pytest.mark.real_jobcli


def test_run_echo(server):
    result = server.jobcli("run", "--", "echo", "hi")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hi\n"


def test_status_json_fields(server):
    job_id = server.jobcli("start", "--", "sh", "-c", "exit 4", check=True).stdout.decode().strip()
    assert server.jobcli("wait", job_id).returncode == 4
    status = json.loads(server.jobcli("status", "--json", job_id, check=True).stdout)
    assert status["id"] == job_id
    assert status["command"] == ["sh", "-c", "exit 4"]
    assert status["state"] == "exited" and status["exit_code"] == 4
