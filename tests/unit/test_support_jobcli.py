"""
The CI guest runs C{jobcli} in a fork of the test process
(L{tests.support.jobcli_in_a_fork}) instead of a new interpreter: it must
give what the real C{jobcli} gives, byte for byte and exit status for exit
status, or the guest's tests would pass or fail for the wrong reasons.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.support import BIN, JOBCLI_MODE, jobcli_forks, jobcli_in_a_fork

# No server listens on port 1 of the loopback: a connection is refused.
ENV = {
    **os.environ,
    "JOBWORKER_SERVER": "127.0.0.1:1",
    "JOBWORKER_CA": "/nonexistent/ca.pem",
    "JOBWORKER_CERT": "/nonexistent/admin.pem",
    "JOBWORKER_KEY": "/nonexistent/admin.key",
}


def real(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "jobcli"), *args], env=env, capture_output=True, stdin=subprocess.DEVNULL, timeout=60)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],  # argparse's exit through SystemExit(0)
        ["no-such-command"],  # a usage error: SystemExit(2), text on stderr
        ["run", "--memory", "lots", "--", "true"],  # run's own usage error code (125)
        ["status", "not-a-job"],  # the credentials cannot be read: jobcli's own error
        ["list", "--json"],
    ],
)
def test_a_forked_jobcli_gives_what_the_real_one_gives(args):
    forked = jobcli_in_a_fork(args, ENV, timeout=60)
    expected = real(args, ENV)
    assert (forked.returncode, forked.stdout, forked.stderr) == (expected.returncode, expected.stdout, expected.stderr)
    assert forked.returncode != 0 or args == ["--help"]


def test_the_child_gets_the_environment_it_is_given(certs):
    # Readable credentials, and nothing listening: jobcli names the address
    # it was given, the child's, not this process's.
    env = {
        **os.environ,
        "JOBWORKER_SERVER": "127.0.0.1:1",
        "JOBWORKER_CA": str(certs / "ca.pem"),
        "JOBWORKER_CERT": str(certs / "admin.pem"),
        "JOBWORKER_KEY": str(certs / "admin.key"),
    }
    forked = jobcli_in_a_fork(["status", "0" * 32], env, timeout=60)
    assert b"127.0.0.1:1" in forked.stderr
    expected = real(["status", "0" * 32], env)
    assert (forked.returncode, forked.stderr) == (expected.returncode, expected.stderr)


def test_a_forked_jobcli_past_its_timeout_is_killed(monkeypatch):
    import jobworker.cli

    def hang(args):
        print("begun", flush=True)
        time.sleep(60)
        return 0

    monkeypatch.setattr(jobworker.cli, "main", hang)
    began = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as raised:
        jobcli_in_a_fork(["status"], ENV, timeout=1)
    assert time.monotonic() - began < 10
    assert raised.value.output == b"begun\n"


@pytest.mark.skipif(os.environ.get(JOBCLI_MODE, "") != "", reason="the environment chooses for every test")
def test_tests_fork_jobcli_unless_marked_real():
    assert jobcli_forks()


@pytest.mark.real_jobcli
@pytest.mark.skipif(os.environ.get(JOBCLI_MODE, "") != "", reason="the environment chooses for every test")
def test_tests_marked_real_jobcli_run_it_as_a_program():
    assert not jobcli_forks()
