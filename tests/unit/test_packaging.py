"""
Packaging (issue 2, item 1): a plain, non-editable install exposes the
C{twistd jobworker} plugin, and the console scripts exist.

The checkout itself is on the virtualenv's C{sys.path} (the development
install is editable), and it has its own C{twisted/plugins/} directory, so
a check run as-is would find the plugin there whatever the install did.
The probes below therefore drop the checkout from C{sys.path} before
importing Twisted, and check where the plugin and the package came from.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.support import BIN, REPO


def _checkout_copy(destination: Path) -> Path:
    """
    Copy the working tree as git sees it (tracked files and new files not
    ignored), so that building does not write into the checkout that other
    work is using.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, stdout=subprocess.PIPE, check=True,
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if not source.is_file():
            continue  # deleted in the working tree
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return destination


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """
    C{pip install --target DIR} of the project, without dependencies or
    build isolation (so without the network).
    """
    if shutil.which("git") is None:
        pytest.skip("needs git to list the working tree")
    work = tmp_path_factory.mktemp("packaging")
    source = _checkout_copy(work / "source")
    target = work / "target"
    result = subprocess.run(
        [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300,
        env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )
    assert result.returncode == 0, (
        "pip install failed (without build isolation it needs setuptools and wheel in the venv):\n"
        + result.stdout.decode(errors="replace")[-3000:]
    )
    return target


# Drops the checkout from sys.path, then runs the probe's body.  Written to
# stderr on failure, JSON on stdout on success.
_PRELUDE = textwrap.dedent(
    """
    import json, os, sys
    checkout = os.path.realpath({checkout!r})
    sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != checkout]
    """
)

_PLUGIN_PROBE = textwrap.dedent(
    """
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins
    makers = {{maker.tapname: maker for maker in getPlugins(IServiceMaker)}}
    report = {{"tapnames": sorted(makers)}}
    if "jobworker" in makers:
        options = makers["jobworker"].options()
        report["plugin_file"] = sys.modules["twisted.plugins.jobworker_plugin"].__file__
        report["service_file"] = sys.modules["jobworker.server.service"].__file__
        report["listen_default"] = options["listen"]
    print(json.dumps(report))
    """
)

_TWISTD_HELP = textwrap.dedent(
    """
    sys.argv = ["twistd", "--help"]
    from twisted.scripts.twistd import run
    run()
    """
)


def _probe(installed: Path, body: str) -> subprocess.CompletedProcess:
    code = _PRELUDE.format(checkout=str(REPO)) + body
    env = dict(os.environ, PYTHONPATH=str(installed))
    env.pop("PYTHONSTARTUP", None)
    return subprocess.run(
        [str(BIN / "python"), "-c", code],
        cwd=str(installed), env=env, capture_output=True, timeout=120,
    )


def test_install_contains_the_plugin_and_the_package(installed):
    assert (installed / "twisted" / "plugins" / "jobworker_plugin.py").is_file()
    # twisted.plugins is a namespace shared with every other plugin: the
    # install must not claim it with an __init__.py of its own.
    assert not (installed / "twisted" / "__init__.py").exists()
    assert not (installed / "twisted" / "plugins" / "__init__.py").exists()
    for module in ("cli/__init__.py", "server/service.py", "server/connection.py", "host/isolate.py", "protocol/wire.py", "host/cgroups/__init__.py", "jobs/manager.py", "output/log.py"):
        assert (installed / "jobworker" / module).is_file(), module
    # PEP 561: embedders' type checkers use our annotations.
    assert (installed / "jobworker" / "py.typed").is_file()


def test_license_matches_the_metadata(installed):
    from email.parser import Parser

    (info,) = installed.glob("jobworker-*.dist-info")
    metadata = Parser().parsestr((info / "METADATA").read_text())
    import jobworker

    assert metadata["Version"] == jobworker.__version__
    assert metadata["License"] == "MIT"
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    shipped = list(info.rglob("LICENSE"))
    assert shipped and shipped[0].read_text() == license_text


def test_installed_plugin_is_discovered(installed):
    result = _probe(installed, _PLUGIN_PROBE.format())
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    report = json.loads(result.stdout)
    assert "jobworker" in report["tapnames"], report["tapnames"]
    # ... from the install, not from the checkout.
    assert Path(report["plugin_file"]).resolve().is_relative_to(installed.resolve()), report
    assert Path(report["service_file"]).resolve().is_relative_to(installed.resolve()), report
    assert report["listen_default"] == []  # tcp:8443 unless --listen is given (see test_config)


def test_twistd_help_lists_jobworker(installed):
    result = _probe(installed, _TWISTD_HELP)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert re.search(rb"^\s+jobworker\s+\S", result.stdout, re.MULTILINE), result.stdout.decode()[-3000:]


def test_the_probe_does_not_see_the_checkout(tmp_path):
    # Without the install on the path, the plugin must not be found: the
    # checkout's twisted/plugins is hidden from the probes above, so what
    # they find is the install's.
    result = _probe(tmp_path, _PLUGIN_PROBE.format())
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert "jobworker" not in json.loads(result.stdout)["tapnames"]


@pytest.mark.parametrize("script, usage", [("jobcli", b"usage: jobcli"), ("jobworker-pki", b"usage: jobworker-pki")])
def test_console_scripts(script, usage, installed):
    for directory in (BIN, installed / "bin"):
        path = directory / script
        assert path.is_file() and os.access(path, os.X_OK), path
    result = subprocess.run(
        [str(BIN / script), "--help"], capture_output=True, timeout=60, cwd=str(REPO),
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.startswith(usage), result.stdout[:200]
