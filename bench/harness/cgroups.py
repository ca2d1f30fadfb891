"""
A cgroup of its own for each jobworker server the benchmarks start.
"""

from __future__ import annotations

import os

# The v1 hierarchies jobworker's cgroup driver uses (see jobworker/host/cgroups/v1.py).
V1_CONTROLLERS = {"cpu", "cpuacct", "memory", "blkio", "pids", "freezer"}


class ServerCgroup:
    """
    A cgroup of its own for one jobworker server, in every v1 hierarchy the
    server's cgroup driver uses, as a service manager would give it.

    The server keeps its job cgroups under the cgroup it starts in, and at
    start-up kills and removes every job cgroup found there as "left by an
    earlier server".  Two servers started in one cgroup therefore kill each
    other's running jobs; so do other people's test servers on this machine.
    A cgroup per server keeps the measurements apart from all of them.

    On a host without v1 hierarchies (pure cgroup v2) this does nothing and
    the servers share the driver's cgroup.
    """

    def __init__(self, name: str) -> None:
        self.directories: list[str] = []
        mounts: dict[frozenset[str], str] = {}
        with open("/proc/self/mountinfo") as handle:
            for line in handle:
                before, _, after = line.partition(" - ")
                fields, tail_fields = before.split(), after.split()
                if tail_fields[:1] == ["cgroup"] and fields[3] == "/":
                    options = set(tail_fields[2].split(","))
                    mounts[frozenset(options & (V1_CONTROLLERS | {"name=systemd"}))] = fields[4]
        with open("/proc/self/cgroup") as handle:
            for line in handle:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                names = frozenset(controllers.split(",")) if controllers else frozenset()
                if not names & V1_CONTROLLERS or names not in mounts:
                    continue
                directory = os.path.join(mounts[names], path.lstrip("/"), name)
                os.makedirs(directory, exist_ok=True)
                self.directories.append(directory)

    def wrap(self, command: list[str]) -> list[str]:
        """
        C{command}, run by a shell that first moves itself into the cgroups
        (so the server is in them from its first instruction).
        """
        if not self.directories:
            return command
        moves = "".join(f'echo $$ > "{directory}/cgroup.procs" && ' for directory in self.directories)
        return ["sh", "-c", moves + 'exec "$@"', "sh", *command]

    def remove(self) -> list[str]:
        """
        Remove the (now empty) cgroups, deepest first; what could not go.
        """
        left = []
        for directory in self.directories:
            for inner, _, _ in sorted(os.walk(directory), key=lambda entry: -len(entry[0])):
                try:
                    os.rmdir(inner)
                except OSError as exc:
                    left.append(f"{inner}: {exc.strerror}")
        return left
