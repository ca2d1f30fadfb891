"""
One page of a job list, filtered and cut to fit the client's frame (spec
section 6.4, C{ListRequest}).  Pure: it reads the jobs it is given and
builds the response; the server supplies the jobs the caller may see.
"""

from __future__ import annotations

import uuid
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from jobworker.errors import ErrorCode, RequestError
from jobworker.jobnames import MAX_LABEL_FILTERS, NameError_, check_label_filter, check_name, labels_match
from jobworker.protocol import messages as m
from jobworker.protocol.statuses import encode_status
from jobworker.protocol.wire import list_response

__all__ = ["ListedJob", "ListIndex", "OrderedJob", "list_order", "list_page", "check_list_filters", "LIST_RESPONSE_OVERHEAD"]

# Frame bytes of a ListResponse besides its statuses: type (1), request id
# (4), job count (4), the more flag (1).
LIST_RESPONSE_OVERHEAD = 1 + 4 + 4 + 1


class ListedJob(Protocol):
    """
    What a page needs of a job: the cheap fields it filters and orders on,
    and its status, asked for only when the job is in the page.
    """

    @property
    def job_id(self) -> uuid.UUID: ...

    @property
    def owner(self) -> str: ...

    @property
    def created_at(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def labels(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def state(self) -> m.JobState: ...

    def status(self) -> m.JobStatus: ...


class OrderedJob(Protocol):
    """
    What the list order needs of a job (L{ListIndex}).
    """

    @property
    def job_id(self) -> uuid.UUID: ...

    @property
    def created_at(self) -> int: ...


def list_order(job: OrderedJob) -> tuple[int, int]:
    """
    The list order: by C{created_at}, then by the job id as a number (a
    newest-first list has it reversed).
    """
    return (job.created_at, job.job_id.int)


Job = TypeVar("Job", bound=OrderedJob)


def _order_key(job: OrderedJob) -> int:
    # list_order as one number: ints compare faster than tuples, and a
    # sort of 10,000 jobs by it takes a few milliseconds.
    return job.created_at << 128 | job.job_id.int


class ListIndex(Generic[Job]):
    """
    The jobs in list order, kept from one page to the next, so that a page
    costs what it lists, not what the server knows: finding where a page
    starts is a binary search, and a change to the set of jobs (a start, a
    removal) is merged in, never a sort of them all again.

    A job's C{created_at} and id never change while it is known, which is
    what lets the order be kept.
    """

    def __init__(self) -> None:
        self._known: list[Job] = []  # the jobs as last given, in their order
        self._members: set[Job] = set()
        self._ordered: list[Job] = []
        self._keys: list[int] = []  # _order_key of each of _ordered

    def after(self, jobs: Sequence[Job], after: tuple[int, int]) -> Iterator[Job]:
        """
        The jobs of C{jobs} that come after C{after} (a L{list_order} key)
        in list order.

        @param jobs: every job, in a stable order (a dict's, say): comparing
            it with the last one given (by identity, at C's speed: ~20 us
            per 10,000 jobs) is how a change is noticed.
        """
        self._refresh(jobs)
        ordered = self._ordered
        start = bisect_right(self._keys, after[0] << 128 | after[1])
        return (ordered[index] for index in range(start, len(ordered)))

    def before(self, jobs: Sequence[Job], before: tuple[int, int]) -> Iterator[Job]:
        """
        The jobs of C{jobs} that come before C{before} (a L{list_order}
        key) in list order, the newest first: every job, the newest first,
        for C{(0, 0)} (a newest-first list's first page).

        @param jobs: as for L{after}.
        """
        self._refresh(jobs)
        ordered = self._ordered
        stop = len(ordered) if before == (0, 0) else bisect_left(self._keys, before[0] << 128 | before[1])
        return (ordered[index] for index in range(stop - 1, -1, -1))

    def _refresh(self, jobs: Sequence[Job]) -> None:
        if len(jobs) != len(self._known) or jobs != self._known:
            self._update(list(jobs))

    def _update(self, jobs: list[Job]) -> None:
        members = set(jobs)
        keys, ordered = self._keys, self._ordered
        if len(members) < len(self._members) or not members >= self._members:
            kept = [(key, job) for key, job in zip(keys, ordered) if job in members]
            keys = [key for key, _ in kept]
            ordered = [job for _, job in kept]
        added = sorted(((_order_key(job), job) for job in jobs if job not in self._members), key=lambda pair: pair[0])
        for key, job in added:
            if not keys or key > keys[-1]:
                keys.append(key)
                ordered.append(job)
            else:
                at = bisect_right(keys, key)
                keys.insert(at, key)
                ordered.insert(at, job)
        self._known, self._members, self._keys, self._ordered = jobs, members, keys, ordered


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
    see, in list order, from the first after the request's cursor on:
    L{ListIndex.after}; in reverse from the first before it for a
    newest-first request: L{ListIndex.before}), for a client that accepts frames of
    C{max_frame_size} bytes.  It reads C{jobs} only as far as the page goes,
    and asks for (and encodes) the status of only the jobs it lists.

    Every page that could hold a job holds at least one: a status that alone
    would not fit is abridged (L{m.abridge}).

    @param unencodable: called for a job whose status cannot be read or
        encoded at all (a damaged record, a bug); returns the status to list
        instead.  Without it, the error propagates.
    """
    budget = max_frame_size - LIST_RESPONSE_OVERHEAD
    page: list[m.JobStatus] = []
    # Each status's bytes, measured here and sent as they are (list_response).
    encoded: list[bytes] = []
    used = 0
    more = False
    states, owner, name, labels = request.states, request.owner, request.name, request.labels
    for job in jobs:
        if states and not states >> int(job.state) & 1:
            continue
        if owner and job.owner != owner:
            continue
        if name and job.name != name:
            continue
        if labels and not labels_match(job.labels, labels):
            continue
        if request.max_jobs and len(page) >= request.max_jobs:
            more = True
            break
        try:
            status = job.status()
            data = encode_status(status)
        except Exception as exc:
            # Unencodable (ValueError) or not readable at all: either way
            # one job must not make the list fail for everyone.
            if unencodable is None:
                raise
            status = unencodable(job, exc)
            data = encode_status(status)
        if len(data) > budget:
            status = m.abridge(status)
            data = encode_status(status)
        if used + len(data) > budget:
            more = True
            break
        page.append(status)
        encoded.append(data)
        used += len(data)
    return list_response(request.request_id, page, encoded, more)
