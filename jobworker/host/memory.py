"""
Giving freed memory back to the operating system.

glibc's allocator keeps what a process frees for its next allocations: the
heap shrinks only from its top, and once a large block (above the mmap
threshold, 128 KiB at first) has been freed the threshold rises, so later
large blocks come from the heap too.  A server that held a few dozen MiB
for hostile connections (partial frames, unsent answers) would keep them
resident for ever after those connections closed.  C{malloc_trim(0)}
returns every free page of every arena to the kernel (C{MADV_DONTNEED});
its cost grows with the heap (about a millisecond per 100 MiB), so the
server calls it at most once a second, after connections close.

Elsewhere (another C library, no C{ctypes}) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

__all__ = ["release_free_memory"]


def _trim() -> Callable[[], None] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0) and None


_release = _trim()


def release_free_memory() -> bool:
    """
    Return the process's free heap pages to the kernel; True if it could.
    """
    if _release is None:
        return False
    _release()
    return True
