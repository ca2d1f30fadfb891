"""
Parsers for the two files that say where a process sits in the cgroup
hierarchies: C{/proc/self/cgroup} and C{/proc/self/mountinfo}.

Pure: text in, records out.  Both files are written by the kernel, but the
paths inside them are chosen by whoever named the cgroups and mount points,
so the parsers treat them as untrusted: a malformed line raises
C{ValueError}, never anything else.

C{/proc/self/cgroup}, one line per hierarchy::

    ID:CONTROLLERS:PATH        e.g.  4:cpu,cpuacct:/system.slice/x.service
                                     0::/system.slice/x.service     (cgroup v2)

PATH may itself contain colons, so only the first two split the line.  It is
relative to the cgroup namespace root of the reading process.

C{/proc/self/mountinfo}, see proc(5)::

    36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2)(3)   (4)   (5)         (6)       (7...)   (8)(9)   (10)     (11)

Field 4 is the directory of the filesystem that is mounted (for a cgroup
filesystem: the cgroup that appears at the mount point), field 5 the mount
point; in both, space, tab, newline and backslash are written as octal
escapes (C{\\040}).  Fields 7 and on, up to the lone C{-}, are optional tags.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

__all__ = [
    "Membership",
    "Mount",
    "parse_proc_cgroup",
    "parse_mountinfo",
    "escape_mount_field",
    "unescape_mount_field",
    "cgroup_directory",
]

_DIGITS = re.compile(r"[0-9]+")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
# The characters the kernel's seq_path()/mangle() escape in mountinfo.
_ESCAPED = " \t\n\\"


@dataclass(frozen=True)
class Membership:
    """
    One line of C{/proc/self/cgroup}.

    @ivar hierarchy_id: 0 for the cgroup v2 (unified) hierarchy.
    @ivar controllers: the controllers bound to the hierarchy as listed
        (C{("cpu", "cpuacct")}, C{("name=systemd",)}); empty for v2.
    @ivar path: the process's cgroup, absolute within the hierarchy.
    """

    hierarchy_id: int
    controllers: tuple[str, ...]
    path: str


@dataclass(frozen=True)
class Mount:
    """
    One line of C{/proc/self/mountinfo}, escapes decoded.
    """

    mount_id: int
    parent_id: int
    device: str
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    fs_type: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.mount_options or "ro" in self.super_options


def parse_proc_cgroup(text: str) -> list[Membership]:
    """
    Parse the whole of a C{/proc/<pid>/cgroup} file.

    @raise ValueError: a line is not C{ID:CONTROLLERS:/PATH}.
    """
    memberships = []
    # split("\n"), not splitlines(): a cgroup name may hold \r or \x1c,
    # which splitlines() would take for line ends.
    for line in text.split("\n"):
        if not line:
            continue
        id_text, colon1, rest = line.partition(":")
        controllers_text, colon2, path = rest.partition(":")
        if not colon1 or not colon2:
            raise ValueError(f"cgroup membership line without two colons: {line!r}")
        if not _DIGITS.fullmatch(id_text):
            raise ValueError(f"cgroup hierarchy id is not a number: {line!r}")
        if not path.startswith("/"):
            raise ValueError(f"cgroup path is not absolute: {line!r}")
        controllers = tuple(controllers_text.split(",")) if controllers_text else ()
        if "" in controllers:
            raise ValueError(f"empty controller name: {line!r}")
        memberships.append(Membership(int(id_text), controllers, path))
    return memberships


def unescape_mount_field(field: str) -> str:
    """
    Decode the octal escapes (C{\\040} for a space) of a mountinfo field.
    """
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def escape_mount_field(text: str) -> str:
    """
    Encode C{text} the way the kernel writes a path into mountinfo.
    """
    return "".join(f"\\{ord(c):03o}" if c in _ESCAPED else c for c in text)


def _parse_mount_line(line: str) -> Mount:
    fields = line.split(" ")
    try:
        separator = fields.index("-", 6)
    except ValueError:
        raise ValueError(f"mountinfo line without the ' - ' separator: {line!r}") from None
    if len(fields) != separator + 4:
        raise ValueError(
            f"mountinfo line with {len(fields) - separator - 1} fields after '-', not 3: {line!r}"
        )
    mount_id, parent_id, device, root, mount_point, options = fields[:6]
    if not _DIGITS.fullmatch(mount_id) or not _DIGITS.fullmatch(parent_id):
        raise ValueError(f"mountinfo mount ids are not numbers: {line!r}")
    if not re.fullmatch(r"[0-9]+:[0-9]+", device):
        raise ValueError(f"mountinfo device is not MAJOR:MINOR: {line!r}")
    fs_type, source, super_options = fields[separator + 1 :]
    return Mount(
        mount_id=int(mount_id),
        parent_id=int(parent_id),
        device=device,
        root=unescape_mount_field(root),
        mount_point=unescape_mount_field(mount_point),
        mount_options=tuple(options.split(",")),
        fs_type=unescape_mount_field(fs_type),
        source=unescape_mount_field(source),
        super_options=tuple(super_options.split(",")),
    )


def parse_mountinfo(text: str) -> list[Mount]:
    """
    Parse the whole of a C{/proc/<pid>/mountinfo} file.

    @raise ValueError: a line does not have the layout of proc(5).
    """
    return [_parse_mount_line(line) for line in text.split("\n") if line]


def cgroup_directory(mount: Mount, cgroup_path: str) -> str | None:
    """
    Where the cgroup C{cgroup_path} (from C{/proc/self/cgroup}) appears
    under C{mount}.

    A mount shows the part of the hierarchy below its root (field 4): in a
    container that bind-mounts C{/docker/abc} at C{/sys/fs/cgroup/memory},
    the cgroup C{/docker/abc/x} is C{/sys/fs/cgroup/memory/x}.

    @return: an absolute directory, or C{None} if the cgroup lies outside
        what the mount shows (then this mount cannot reach it), or the path
        is not a plain absolute path.
    """
    if not cgroup_path.startswith("/") or ".." in cgroup_path.split("/"):
        return None
    root = mount.root.rstrip("/")
    if cgroup_path != root and not cgroup_path.startswith(root + "/"):
        return None
    relative = cgroup_path[len(root) :].strip("/")
    if not relative:
        return posixpath.normpath(mount.mount_point)
    return posixpath.normpath(posixpath.join(mount.mount_point, relative))
