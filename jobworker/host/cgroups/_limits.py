"""
How the fields of L{Limits} become the numbers cgroups take.
"""

from __future__ import annotations

__all__ = ["CPU_PERIOD_USEC", "cpu_bandwidth"]

# The CFS bandwidth period, microseconds: the kernel's default, and short
# enough that a throttled job runs in slices a person does not notice.
CPU_PERIOD_USEC = 100_000
# The kernel refuses a quota under 1 ms, and a period over 1 s.
_MIN_QUOTA_USEC = 1_000
_LONG_PERIOD_USEC = 1_000_000


def cpu_bandwidth(millicores: int) -> tuple[int, int]:
    """
    The CFS quota and period, both microseconds, that allow C{millicores}
    (1000 = one core) of CPU time.

    The quota is C{millicores * 100} per 100 ms period.  Below 10
    millicores that quota would be under the kernel's 1 ms minimum, so the
    period grows to 1 s instead (same share, coarser slices).
    """
    if millicores < 1:
        raise ValueError(f"cpu: {millicores} millicores is not a limit")
    quota = millicores * CPU_PERIOD_USEC // 1000
    if quota >= _MIN_QUOTA_USEC:
        return quota, CPU_PERIOD_USEC
    return millicores * _LONG_PERIOD_USEC // 1000, _LONG_PERIOD_USEC
