"""
Helpers shared by the test modules.
"""

from __future__ import annotations

import os

import pytest


def on_ci() -> bool:
    """
    True when the suite runs under CI, where every test must be able to run.
    """
    return bool(os.environ.get("CI"))


def need(condition: bool, reason: str) -> None:
    """
    Go on only if C{condition} holds.

    Privileged tests (root, cgroups, namespaces) call this first.  On CI,
    where the machine is known to provide all of these, a missing capability
    is a failure: a test that silently skips there proves nothing.
    Elsewhere the test is skipped and the reason printed.
    """
    if condition:
        return
    if on_ci():
        pytest.fail(f"cannot run on CI: {reason}")
    pytest.skip(reason)


def need_root() -> None:
    need(os.geteuid() == 0, "needs root")
