"""
The parts of C{.ci/guest.py} that need no qemu: the initramfs archive, the
module order, the figures table.  (The guest itself is proven by booting
it: C{python3 dev.py guest}, CI's second step.)
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO

_spec = importlib.util.spec_from_file_location("ci_guest", REPO / ".ci" / "guest.py")
assert _spec is not None and _spec.loader is not None, "cannot load .ci/guest.py"
guest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(guest)


def read_newc(archive: bytes) -> list[tuple[str, int, tuple[int, int], bytes]]:
    """
    Parse a newc cpio archive, written from its specification (cpio(5)):
    C{(name, mode, (rdevmajor, rdevminor), data)} per entry.
    """
    entries: list[tuple[str, int, tuple[int, int], bytes]] = []
    offset = 0
    while True:
        header = archive[offset : offset + 110]
        assert header[:6] == b"070701", header[:6]
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name_end = offset + 110 + namesize
        name = archive[offset + 110 : name_end - 1].decode()
        assert archive[name_end - 1] == 0
        data_start = name_end + (-name_end % 4)
        data = archive[data_start : data_start + size]
        offset = data_start + size + (-(data_start + size) % 4)
        if name == "TRAILER!!!":
            assert offset == len(archive)
            return entries
        entries.append((name, mode, rdev, data))


def test_newc_archive_round_trips() -> None:
    files = [("bin", 0o040755, b""), ("init", 0o100755, b"#!/bin/sh\n"), ("odd", 0o100644, b"x" * 5)]
    archive = guest.newc_archive(files, [("dev/console", 5, 1)])
    assert read_newc(archive) == [
        ("bin", 0o040755, (0, 0), b""),
        ("init", 0o100755, (0, 0), b"#!/bin/sh\n"),
        ("odd", 0o100644, (0, 0), b"xxxxx"),
        ("dev/console", 0o020600, (5, 1), b""),
    ]


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio to cross-check with")
def test_newc_archive_reads_with_cpio(tmp_path: Path) -> None:
    archive = guest.newc_archive([("a", 0o040755, b""), ("a/b", 0o100644, b"hello")], [])
    listing = subprocess.run(["cpio", "-t", "--quiet"], input=archive, capture_output=True, check=True)
    assert listing.stdout.split() == [b"a", b"a/b"]


def fake_module(directory: Path, name: str, depends: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.ko").write_bytes(b"\x7fELF junk\0license=GPL\0depends=" + depends.encode() + b"\0vermagic=6\0")


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    fake_module(tmp_path / "fs/9p", "9p", "9pnet,netfs")
    fake_module(tmp_path / "net/9p", "9pnet", "")
    fake_module(tmp_path / "fs/netfs", "netfs", "")
    fake_module(tmp_path / "net/9p", "9pnet_virtio", "virtio,9pnet")
    fake_module(tmp_path / "drivers/virtio", "virtio", "")
    order = [name for name, _ in guest.module_order(str(tmp_path), ("9pnet_virtio", "9p"))]
    assert order == ["virtio", "9pnet", "9pnet_virtio", "netfs", "9p"]


def test_module_order_names_a_missing_module(tmp_path: Path) -> None:
    fake_module(tmp_path, "ext4", "jbd2")
    with pytest.raises(guest.GuestError, match="jbd2"):
        guest.module_order(str(tmp_path), ("ext4",))


def junit(path: Path, lines: list[str]) -> str:
    cases = "".join(f"<testcase name='t{i}'><system-out>{line}\nnoise</system-out></testcase>" for i, line in enumerate(lines))
    path.write_text(f"<testsuites><testsuite>{cases}</testsuite></testsuites>")
    return str(path)


def test_figure_table_sets_layouts_side_by_side(tmp_path: Path) -> None:
    host = junit(tmp_path / "host.xml", ["figure: [v1] e2e --cpu 0.2: 0.199 of a core", "figure: [v1] e2e stop: gone"])
    inside = junit(tmp_path / "guest.xml", ["figure: [v2] e2e --cpu 0.2: 0.201 of a core"])
    assert guest.figure_table([host, inside]).splitlines() == [
        "| measure | v1 | v2 |",
        "|---|---|---|",
        "| e2e --cpu 0.2 | 0.199 of a core | 0.201 of a core |",
        "| e2e stop | gone |  |",
    ]


def test_busybox_check_refuses_a_dynamic_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest, "BUSYBOX", "/bin/sh")
    assert not guest.busybox_is_static()
