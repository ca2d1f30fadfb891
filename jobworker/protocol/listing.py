"""
One page of a job list, filtered and cut to fit the client's frame (spec
section 6.4, C{ListRequest}).  Pure: it reads the jobs it is given and
builds the response; the server supplies the jobs the caller may see.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Protocol

from jobworker.errors import ErrorCode, RequestError
from jobworker.jobnames import MAX_LABEL_FILTERS, NameError_, check_label_filter, check_name, labels_match
from jobworker.protocol import messages as m
from jobworker.protocol.wire import status_size

__all__ = ["ListedJob", "list_order", "list_page", "check_list_filters", "LIST_RESPONSE_OVERHEAD"]

# Frame bytes of a ListResponse besides its statuses: type (1), request id
# (4), job count (4), the more flag (1).
LIST_RESPONSE_OVERHEAD = 1 + 4 + 4 + 1


class ListedJob(Protocol):
    """
    What a page needs of a job: the cheap fields it filters and orders on,
    and its status, asked for only when the job is in the page.
    """

    job_id: uuid.UUID
    owner: str
    created_at: int
    name: str
    labels: tuple[tuple[str, str], ...]

    @property
    def state(self) -> m.JobState: ...

    def status(self) -> m.JobStatus: ...


def list_order(job: ListedJob) -> tuple[int, int]:
    """
    The list order: by C{created_at}, then by the job id as a number.
    """
    return (job.created_at, job.job_id.int)


def check_list_filters(request: m.ListRequest) -> None:
    """
    Refuse a list request whose name or label filters no job could match
    because they break the syntax or the caps of L{jobworker.jobnames}.

    @raise RequestError: C{BAD_REQUEST}, saying which filter and why.
    """
    if len(request.labels) > MAX_LABEL_FILTERS:
        raise RequestError(f"{len(request.labels)} label filters; at most {MAX_LABEL_FILTERS}", ErrorCode.BAD_REQUEST)
    try:
        check_name(request.name)
        for text in request.labels:
            check_label_filter(text)
    except NameError_ as exc:
        raise RequestError(str(exc), ErrorCode.BAD_REQUEST) from None


def list_page(
    jobs: Iterable[ListedJob],
    request: m.ListRequest,
    max_frame_size: int,
    unencodable: Callable[[ListedJob, Exception], m.JobStatus] | None = None,
) -> m.ListResponse:
    """
    The page that answers C{request}, out of C{jobs} (those the caller may
    see), for a client that accepts frames of C{max_frame_size} bytes.

    Every page that could hold a job holds at least one: a status that alone
    would not fit is abridged (L{m.abridge}).

    @param unencodable: called for a job whose status cannot be read or
        encoded at all (a damaged record, a bug); returns the status to list
        instead.  Without it, the error propagates.
    """
    after = (request.after_created_at, request.after_job_id.int)
    budget = max_frame_size - LIST_RESPONSE_OVERHEAD
    page: list[m.JobStatus] = []
    used = 0
    more = False
    for job in sorted(jobs, key=list_order):
        if list_order(job) <= after:
            continue
        if request.states and not request.states >> int(job.state) & 1:
            continue
        if request.owner and job.owner != request.owner:
            continue
        if request.name and job.name != request.name:
            continue
        if request.labels and not labels_match(job.labels, request.labels):
            continue
        if request.max_jobs and len(page) >= request.max_jobs:
            more = True
            break
        try:
            status = job.status()
            size = status_size(status)
        except Exception as exc:
            # Unencodable (ValueError) or not readable at all: either way
            # one job must not make the list fail for everyone.
            if unencodable is None:
                raise
            status = unencodable(job, exc)
            size = status_size(status)
        if size > budget:
            status = m.abridge(status)
            size = status_size(status)
        if used + size > budget:
            more = True
            break
        page.append(status)
        used += size
    return m.ListResponse(request.request_id, tuple(page), more)
