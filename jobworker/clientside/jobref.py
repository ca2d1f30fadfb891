"""
Job references as a library caller gives them: a L{uuid.UUID} or its text.
"""

from __future__ import annotations

import uuid

from jobworker.errors import ErrorCode, RequestError

__all__ = ["JobRef", "as_job_id"]

# What a library caller may pass where a job id is wanted.
JobRef = uuid.UUID | str


def as_job_id(job_id: JobRef) -> uuid.UUID:
    """
    A job id given as a L{uuid.UUID} or its text (with or without dashes).

    @raise RequestError: (C{BAD_REQUEST}) text that is not a whole id.
    """
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(job_id)
    except (ValueError, TypeError, AttributeError):
        raise RequestError(f"{job_id!r} is not a job id", ErrorCode.BAD_REQUEST) from None
