"""
The block devices whose bandwidth an I/O limit throttles.

Both cgroup versions throttle per device (v2 C{io.max}, v1
C{blkio.throttle.*_bps_device}), and a job may write to any filesystem of
the host, so an I/O limit is applied to every device that carries one.  The
list is read from C{/sys/block}, which holds one entry per whole disk
(partitions live below their disk and cannot be throttled on their own:
the kernel takes whole-disk numbers only):

  - kept: real and virtual disks (C{sd*}, C{vd*}, C{nvme*n*}, C{xvd*},
    C{mmcblk*}), stacked devices (C{dm-*} for LVM and dm-crypt, C{md*} for
    software RAID) and network disks (C{nbd*}, C{rbd*}).  A filesystem on a
    stacked device submits its I/O to that device, so that is where the
    limit has to be; the disks below it are throttled too, with the same
    rate, which changes nothing for the job.
  - skipped by name: C{loop*} (a loop device is a file on another
    filesystem, whose disk is already throttled), C{ram*} and C{zram*}
    (memory, not a disk: there is no bandwidth to share, and memory use is
    the memory limit's business).
  - skipped by state: devices of size 0 (an unattached loop or nbd device,
    a card reader or optical drive without a medium), which accept no I/O
    and may refuse a throttle rule; C{hidden} devices (the per-path nodes
    of NVMe multipath), which are reached only through their visible head
    node.

The list is read once, when the driver is made: disks hot-plugged later are
not throttled until the service restarts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

__all__ = ["BlockDevice", "throttled_block_devices"]

_NOT_DISKS = ("loop", "ram", "zram")
_NUMBER = re.compile(r"([0-9]+):([0-9]+)")


@dataclass(frozen=True)
class BlockDevice:
    """
    A whole-disk block device: its name in C{/sys/block} and its number.
    """

    name: str
    major: int
    minor: int

    @property
    def number(self) -> str:
        """
        C{"MAJOR:MINOR"}, as the cgroup throttle files spell a device.
        """
        return f"{self.major}:{self.minor}"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def throttled_block_devices(sys_block: str = "/sys/block") -> tuple[BlockDevice, ...]:
    """
    The devices an I/O limit is applied to, by name (see the module
    docstring for which and why).  Empty if C{sys_block} cannot be read.
    """
    try:
        names = sorted(os.listdir(sys_block))
    except OSError:
        return ()
    devices = []
    for name in names:
        if name.startswith(_NOT_DISKS):
            continue
        entry = os.path.join(sys_block, name)
        number = _read(os.path.join(entry, "dev"))
        size = _read(os.path.join(entry, "size"))
        if number is None or size is None:
            continue
        match = _NUMBER.fullmatch(number)
        if match is None or not re.fullmatch(r"[0-9]+", size):
            continue
        if int(size) == 0 or _read(os.path.join(entry, "hidden")) == "1":
            continue
        devices.append(BlockDevice(name, int(match.group(1)), int(match.group(2))))
    return tuple(devices)
