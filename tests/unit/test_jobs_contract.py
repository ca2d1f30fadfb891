"""
The helper's contract (L{jobworker.host.contract}) is the one both sides
read: the helper's parser, the server's configuration and the protocol's
signal list agree with it.
"""

from __future__ import annotations

import json
import signal

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
