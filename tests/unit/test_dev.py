"""
C{dev.py} (issue 14, item 8): switching between C{serve} and C{test} does
not reinstall the virtual environment; a change of the packaging metadata
does.

C{ensure_venv} runs against a fake environment in a temporary directory,
with pip's runs recorded instead of made.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
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
    compiles: list[list[str]] = []

    def run(command, **kwargs):
        if "-e" in command:
            installs.append(command[command.index("-e") + 1 :])
        if "compileall" in command:
            compiles.append(command[command.index("compileall") + 1 :])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(module.subprocess, "run", run)
    module.installs = installs
    module.compiles = compiles
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


def test_every_run_byte_compiles_the_checkout_whether_it_installs_or_not(dev):
    dev.ensure_venv("test")
    dev.ensure_venv("test")
    assert len(dev.installs) == 1
    assert dev.compiles == [["-q", "jobworker", os.path.join("twisted", "plugins")]] * 2


def test_the_checkouts_modules_get_bytecode_even_where_python_writes_none(tmp_path, monkeypatch):
    """
    For real: with C{PYTHONDONTWRITEBYTECODE} set, as on this project's
    machines, the editable install's modules (and the twistd plugin) have
    bytecode after a run of C{dev.py}, so C{jobcli} does not compile them.
    """
    spec = importlib.util.spec_from_file_location("dev_compiling", REPO / "dev.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = tmp_path / "checkout"
    sources = [root / "jobworker" / "__init__.py", root / "jobworker" / "cli" / "__init__.py", root / "twisted" / "plugins" / "plugin.py"]
    for source in sources:
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("VALUE = 1\n")
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.setattr(module, "ROOT", str(root))
    monkeypatch.setattr(module, "BIN", str(root / ".venv" / "bin"))
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    module.compile_checkout()
    for source in sources:
        assert os.path.exists(importlib.util.cache_from_source(str(source))), source
