"""
The helper's contract (L{jobworker.host.contract}) is the one both sides
read: the helper's parser, the server's configuration and the protocol's
signal list agree with it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jobworker.host import contract, isolate
from jobworker.protocol import messages


def test_forwarded_signals_are_the_platforms_and_the_protocols() -> None:
    names = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
    assert contract.FORWARDED_SIGNALS == tuple(int(s) for s in names)
    assert messages.SIGNALS_SENT == frozenset(contract.FORWARDED_SIGNALS)
    assert isolate.FORWARDED_SIGNALS is contract.FORWARDED_SIGNALS


def test_exit_codes_of_each_kind() -> None:
    assert contract.EXIT_CODES == {"setup": 125, "not_executable": 126, "not_found": 127}
    assert isolate.StartError(contract.NOT_FOUND, 2, "x").exit_code == 127


def test_helper_config_refuses_a_key_the_helper_does_not_know() -> None:
    with pytest.raises(KeyError, match="scratch_byte"):
        contract.helper_config(argv=["true"], scratch_byte=1)
    assert contract.helper_config(argv=["true"], cwd="/tmp") == {"argv": ["true"], "cwd": "/tmp"}


def test_the_helper_parses_every_contract_key_with_its_default() -> None:
    parsed = isolate.parse_config(json.dumps({"argv": ["true"]}))
    for key, default in contract.CONFIG_DEFAULTS.items():
        if key != "argv":
            assert getattr(parsed, key) == default, key
    full = {key: value for key, value in contract.CONFIG_DEFAULTS.items() if value is not None}
    full["argv"] = ["true"]
    assert isolate.parse_config(json.dumps(full)).argv == ["true"]
    with pytest.raises(isolate.StartError, match="unknown keys"):
        isolate.parse_config(json.dumps({"argv": ["true"], "bogus": 1}))


def test_compiled_helper_brings_its_contract(tmp_path: Path) -> None:
    """
    The bytecode runs from a directory of its own (the state dir), with the
    package nowhere on its path: the contract's bytecode lies beside it.
    """
    helper = isolate.compiled_helper(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["contract.pyc", "isolate.pyc"]
    read_end, write_end = os.pipe()
    run = subprocess.run(
        [sys.executable, "-I", "-S", helper, json.dumps({"argv": ["/no/such/command"], "isolate": False})],
        pass_fds=(),
        preexec_fn=lambda: os.dup2(write_end, contract.STATUS_FD),
        close_fds=False,
        capture_output=True,
        cwd="/",
        timeout=30,
    )
    os.close(write_end)
    status = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert run.returncode == contract.EXIT_NOT_FOUND, run.stderr
    assert status.startswith(f"{contract.FAILED} {contract.NOT_FOUND} ")
