"""
The on-disk spool of a job's output: one append-only file per job.
"""

from __future__ import annotations

import os

__all__ = ["FileSpool"]


class FileSpool:
    """
    An append-only file that an L{jobworker.outputlog.OutputLog} writes its
    records to.

    Writes go straight to the kernel (no user-space buffer) so a follower
    reading the file sees every record the log has announced.  Reads open the
    file per call: a server holding thousands of finished jobs then holds no
    descriptor for them.
    """

    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = path
        self._fd: int | None = None
        if create:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._size = os.fstat(self._fd).st_size if self._fd is not None else os.stat(path).st_size

    @property
    def size(self) -> int:
        return self._size

    def append(self, data: bytes) -> None:
        if self._fd is None:
            raise ValueError(f"spool {self.path} is sealed")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._size += len(data)

    def pread(self, position: int, size: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(fd, size, position)
        finally:
            os.close(fd)

    def seal(self) -> None:
        """
        No more appends: close the write descriptor.
        """
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.seal()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
