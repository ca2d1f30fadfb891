"""
C{sudo jobworker-pki dev DIR} (as root): the files belong to the invoking
user; the PKI tool's other tests are L{tests.unit.test_pki_tool}.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import need_root
from tests.unit.test_pki_tool import pki


@pytest.fixture
def open_tmp():
    """
    A directory under /tmp that other users may enter (pytest's own is
    root-only), removed afterwards.
    """
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="jobworker-test-"))
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base)


def test_under_sudo_the_files_belong_to_the_invoking_user(open_tmp):
    """
    As C{sudo jobworker-pki dev DIR} leaves them: owned by SUDO_UID, keys
    still 0600, and readable by that user's own shell.
    """
    need_root()
    import pwd

    nobody = pwd.getpwnam("nobody")
    tmp_path = open_tmp
    target = tmp_path / "certs"
    env = dict(os.environ, SUDO_UID=str(nobody.pw_uid), SUDO_GID=str(nobody.pw_gid), SUDO_USER="nobody")
    assert pki("dev", str(target), env=env).returncode == 0
    assert target.stat().st_uid == nobody.pw_uid
    for path in target.iterdir():
        stat = path.stat()
        assert (stat.st_uid, stat.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
        if path.suffix == ".key":
            assert stat.st_mode & 0o777 == 0o600, path
    read = subprocess.run(
        ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups", "--",
         "cat", str(target / "admin.key")],
        capture_output=True, timeout=30,
    )
    assert read.returncode == 0 and b"PRIVATE KEY" in read.stdout, read.stderr
    # Without sudo (no SUDO_UID), root keeps its files.
    plain = tmp_path / "plain"
    env.pop("SUDO_UID")
    assert pki("dev", str(plain), env=env).returncode == 0
    assert (plain / "admin.key").stat().st_uid == 0
