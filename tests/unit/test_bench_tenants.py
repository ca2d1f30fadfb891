"""
C{bench/tenants.py}'s default baseline: the tree just before the tenant
work (the first commit that added the uid allocator), whatever path the
allocator has been moved to since.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import types

import pytest

from tests.support import REPO


def _load_tenants() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("bench_tenants_under_test", REPO / "bench" / "tenants.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exists(revision: str, path: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{revision}:{path}"], cwd=REPO, capture_output=True).returncode == 0


def test_the_default_baseline_predates_the_uid_allocator() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the checkout's git history")
    if subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=REPO, capture_output=True, text=True).stdout.strip() == "true":
        pytest.skip("a shallow clone has not the tenant work's first commit")
    baseline = _load_tenants().default_baseline()
    assert not _exists(baseline, "jobworker/uids.py"), baseline
    assert not _exists(baseline, "jobworker/host/uids.py"), baseline
    # ... and it is the commit just before one that has the allocator.
    assert _exists(baseline.removesuffix("^"), "jobworker/uids.py") or _exists(baseline.removesuffix("^"), "jobworker/host/uids.py")
