"""
The isolation helper's tenant options, run for real as the server runs it:
scratch mounts, a read-only host, the job's own /sys, hidden paths, and its
own IPC namespace.  (The service-level tests are in test_e2e_tenants.py.)
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobworker.host import isolate
from tests.host.test_isolate import PYTHON, TIMEOUT, need_namespaces, run, shell
from tests.support import need_root

UID = 2**31 - 7  # a uid no one has; the helper needs none to exist

# A place for test directories outside /tmp, which a job has its own of.
OUTSIDE_TMP = "/srv" if os.path.isdir("/srv") else "/var/lib"


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """
    A world-readable directory outside /tmp (a job's /tmp is its own).
    """
    need_root()
    directory = Path(tempfile.mkdtemp(prefix="jobworker-test-", dir=OUTSIDE_TMP))
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.mark.parametrize(
    "options",
    [
        {"scratch_bytes": -1},
        {"scratch_bytes": "1M"},
        {"private_sys": 1},
        {"read_only_root": "yes"},
        {"hide": "/etc"},
        {"hide": ["relative"]},
        {"inaccessible_file": "relative"},
        {"session_keyring": 1},
        {"clear_user_keyrings": "yes"},
    ],
)
def test_bad_tenant_options_are_setup_failures(options: dict) -> None:
    import json

    helper = subprocess.run(
        [PYTHON, "-I", "-S", isolate.__file__, json.dumps({"argv": ["true"], **options})],
        capture_output=True,
        preexec_fn=lambda: os.dup2(1, isolate.STATUS_FD),
        close_fds=False,
        timeout=TIMEOUT,
    )
    assert helper.stdout.startswith(f"failed setup {errno.EINVAL} bad config: ".encode()), helper.stdout
    assert helper.returncode == 125


@pytest.mark.privileged
def test_read_only_root_leaves_only_scratch_writable(outside_tmp: Path) -> None:
    need_namespaces()
    os.chmod(outside_tmp, 0o1777)
    script = f"touch {outside_tmp}/x 2>&1; touch /tmp/x && echo tmp-ok; echo > /dev/null && echo null-ok"
    job = run(shell(script, uid=UID, gid=UID, scratch_bytes=1 << 20, read_only_root=True))
    lines = job.stdout.decode().splitlines()
    assert lines[0].endswith("Read-only file system"), lines
    assert lines[1:] == ["tmp-ok", "null-ok"]
    assert not (outside_tmp / "x").exists()
    # Without the option, the same job writes to the host's directory.
    job = run(shell(f"touch {outside_tmp}/x", uid=UID, gid=UID))
    assert job.returncode == 0 and (outside_tmp / "x").exists()


@pytest.mark.privileged
def test_hidden_paths(outside_tmp: Path) -> None:
    need_namespaces()
    secret_dir = outside_tmp / "state"
    secret_dir.mkdir(mode=0o755)
    (secret_dir / "record").write_text("secret")
    key = outside_tmp / "server.key"
    key.write_text("key")
    os.chmod(key, 0o644)
    blank = outside_tmp / "inaccessible"
    blank.touch(mode=0o644)  # loosened: the helper makes it 000 again
    script = f"cat {secret_dir}/record {key} 2>&1; ls {secret_dir} 2>&1; echo done"
    job = run(
        shell(
            script,
            uid=UID,
            gid=UID,
            hide=[str(secret_dir), str(key), str(outside_tmp / "missing")],
            inaccessible_file=str(blank),
        )
    )
    text = job.stdout.decode()
    assert "secret" not in text and "key\n" not in text.replace("server.key", "")
    assert text.count("Permission denied") == 3, text
    assert text.endswith("done\n")
    assert os.stat(blank).st_mode & 0o7777 == 0
    # A hidden file without a source to cover it with is refused.
    job = run(shell("true", hide=[str(key)]))
    assert job.statuses[0].startswith(f"failed setup {errno.EINVAL} "), job.statuses


@pytest.mark.privileged
def test_own_ipc_namespace_and_sysfs() -> None:
    need_namespaces()
    job = run(shell("readlink /proc/self/ns/ipc; ls /sys/class/net", private_sys=True))
    ipc, *interfaces = job.stdout.decode().split()
    assert ipc != os.readlink("/proc/self/ns/ipc")
    assert interfaces == ["lo"]
    # On the host's network the job keeps the host's /sys.
    job = run(shell("ls /sys/class/net", private_sys=True, network="host"))
    assert sorted(job.stdout.decode().split()) == sorted(os.listdir("/sys/class/net"))
