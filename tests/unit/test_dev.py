"""
C{dev.py} (issue 14, item 8): switching between C{serve} and C{test} does
not reinstall the virtual environment; a change of the packaging metadata
does.

C{ensure_venv} runs against a fake environment in a temporary directory,
with pip's runs recorded instead of made.
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO


@pytest.fixture
def dev(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("dev_under_test", REPO / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = tmp_path / "checkout"
    root.mkdir()
    for name in ("setup.cfg", "pyproject.toml"):
        (root / name).write_bytes((REPO / name).read_bytes())
    venv = root / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    monkeypatch.setattr(module, "ROOT", str(root))
    monkeypatch.setattr(module, "VENV", str(venv))
    monkeypatch.setattr(module, "BIN", str(venv / "bin"))
    monkeypatch.setattr(module, "STAMP", str(venv / ".jobworker-installed"))
    installs: list[list[str]] = []

    def run(command, **kwargs):
        if "-e" in command:
            installs.append(command[command.index("-e") + 1 :])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(module.subprocess, "run", run)
    module.installs = installs
    module.root = root
    return module


def test_switching_between_serve_and_test_installs_once(dev):
    dev.ensure_venv("test")
    dev.ensure_venv("")  # serve
    dev.ensure_venv("test")
    dev.ensure_venv("")
    assert dev.installs == [[".[test]"]]


def test_serve_first_then_test_installs_the_test_extras_once(dev):
    dev.ensure_venv("")
    dev.ensure_venv("test")
    dev.ensure_venv("")
    dev.ensure_venv("test")
    assert dev.installs == [["."], [".[test]"]]


def test_changed_metadata_reinstalls_keeping_the_extras(dev):
    dev.ensure_venv("test")
    setup = Path(dev.root) / "setup.cfg"
    setup.write_text(setup.read_text() + "\n# changed\n")
    dev.ensure_venv("")
    assert dev.installs == [[".[test]"], [".[test]"]]


def test_lint_installs_its_extras_and_the_tests_at_once_and_test_reuses_them(dev):
    dev.ensure_venv("lint,test")  # python3 dev.py lint
    dev.ensure_venv("test")
    dev.ensure_venv("")
    dev.ensure_venv("lint,test")
    assert dev.installs == [[".[lint,test]"]]
