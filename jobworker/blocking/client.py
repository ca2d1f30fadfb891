"""
The blocking client's operations (L{BlockingClient}): start, status, wait,
list, stop, signal, remove, and job ids by unique prefix, over a
L{BlockingConnection}; and a client for a server the configuration names
(L{BlockingClient.from_config}).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator

from jobworker.blocking.connection import BlockingConnection
from jobworker.clientside.address import parse_address
from jobworker.clientside.jobref import JobRef, as_job_id
from jobworker.errors import ErrorCode, RequestError
from jobworker.jobnames import NameError_, check_name
from jobworker.protocol import messages as m
from jobworker.protocol.keepalive import DEFAULT_KEEPALIVE_INTERVAL

__all__ = ["MAX_CANDIDATES", "MIN_PREFIX", "BlockingClient"]

# A job id prefix shorter than this matches too much to be safe to act on
# (stop, rm): 4 hex digits leave 1 in 65,536 chance per other job.
MIN_PREFIX = 4
# How many candidates an ambiguous prefix's error names.
MAX_CANDIDATES = 10


class BlockingClient(BlockingConnection):
    """
    One connection to a server, with an operation per request; see
    L{BlockingConnection} for its parameters, its time limits and L{follow
    <BlockingConnection.follow>}.
    """

    # -- operations ------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        server: str | None = None,
        *,
        config_path: str | None = None,
        timeout: float | None = 30.0,
        keepalive_interval: float | None = DEFAULT_KEEPALIVE_INTERVAL,
    ) -> BlockingClient:
        """
        A client (not yet connected; use it in a C{with} block) for the
        server C{server} names, with the credentials that C{jobcli} would
        use: see L{jobworker.clientside.config} for the order of flags, the
        environment and the configuration file (C{config_path}, default
        C{$XDG_CONFIG_HOME/jobworker/config.toml}).

        @raise jobworker.clientside.config.ClientConfigError: a bad file, or
            C{server} names several servers.
        @raise jobworker.blocking.tls.ClientTLSError: unusable credentials.
        """
        from jobworker.blocking.tls import client_ssl_context
        from jobworker.clientside.config import ClientConfigError, load_client_config, resolve_targets

        targets = resolve_targets(load_client_config(config_path), server=server)
        if len(targets) != 1:
            raise ClientConfigError(f"{server!r} names {len(targets)} servers; a client talks to one")
        target = targets[0]
        try:
            address = parse_address(target.address.value)
        except ValueError as exc:
            raise ClientConfigError(f"{target.address.value!r} ({target.address.source}): {exc}") from None
        context = client_ssl_context(target.ca.value, target.cert.value, target.key.value)
        return cls(address, context, timeout=timeout, keepalive_interval=keepalive_interval)

    def resolve_job_ids(self, refs: Iterable[JobRef]) -> list[uuid.UUID]:
        """
        Whole job ids for ids or unique prefixes of ids (at least
        L{MIN_PREFIX} hex digits, dashes ignored), in the order given.

        Whole ids are taken as they are, without asking the server; the
        prefixes cost one (paged) list of the jobs this client may see.

        @raise RequestError: C{BAD_REQUEST} for text that is no prefix or
            one that is too short or matches several jobs (the message
            names them), C{NOT_FOUND} for a prefix that matches none.
        """
        resolved: list[uuid.UUID | None] = []
        prefixes: dict[int, str] = {}
        for index, ref in enumerate(refs):
            if isinstance(ref, uuid.UUID):
                resolved.append(ref)
                continue
            text = str(ref).strip().lower()
            digits = text.replace("-", "")
            hexadecimal = bool(digits) and all(c in "0123456789abcdef" for c in digits)
            if len(digits) == 32 and hexadecimal:
                resolved.append(as_job_id(text))
                continue
            # A name next, as docker does (a whole id, then a name, then an
            # id prefix): the server finds it (one list request, filtered).
            by_name = self._job_named(str(ref))
            if by_name is not None:
                resolved.append(by_name)
                continue
            if not hexadecimal or len(digits) > 32:
                raise RequestError(f"no job has the id or name {str(ref)[:80]!r}", ErrorCode.NOT_FOUND)
            if len(digits) < MIN_PREFIX:
                raise RequestError(
                    f"job id prefix {ref!r} is too short: give at least {MIN_PREFIX} characters", ErrorCode.BAD_REQUEST
                )
            prefixes[index] = digits
            resolved.append(None)
        if prefixes:
            known = [job.job_id for job in self.iter_jobs()]
            for index, digits in prefixes.items():
                matches = [job_id for job_id in known if job_id.hex.startswith(digits)]
                if not matches:
                    raise RequestError(f"no job matches the id prefix {digits!r}", ErrorCode.NOT_FOUND)
                if len(matches) > 1:
                    named = ", ".join(str(job_id) for job_id in matches[:MAX_CANDIDATES])
                    more = f" and {len(matches) - MAX_CANDIDATES} more" if len(matches) > MAX_CANDIDATES else ""
                    raise RequestError(
                        f"job id prefix {digits!r} is ambiguous: it matches {named}{more}", ErrorCode.BAD_REQUEST
                    )
                resolved[index] = matches[0]
        return resolved  # type: ignore[return-value]

    def _job_named(self, name: str) -> uuid.UUID | None:
        """
        The job called C{name} among those this client may see; None for
        no such job (or text that cannot be a name).

        @raise RequestError: C{BAD_REQUEST} when jobs of several owners (an
            admin sees them all) have the name; the message names them.
        """
        try:
            check_name(name)
        except NameError_:
            return None
        if not name:
            return None
        jobs = self.list(name=name)
        if len(jobs) > 1:
            named = ", ".join(f"{job.job_id} (owner {job.owner})" for job in jobs[:MAX_CANDIDATES])
            raise RequestError(f"the name {name!r} is ambiguous: jobs of several owners have it: {named}", ErrorCode.BAD_REQUEST)
        return jobs[0].job_id if jobs else None

    def resolve_job_id(self, ref: JobRef) -> uuid.UUID:
        """
        L{resolve_job_ids} for one id or prefix.
        """
        return self.resolve_job_ids([ref])[0]

    def start(self, argv: list[str], **options: object) -> uuid.UUID:
        response = self.request(m.StartRequest(self.conn.next_request_id(), tuple(argv), **options))  # type: ignore[arg-type]
        assert isinstance(response, m.StartResponse)
        return response.job_id

    def status(self, job_id: JobRef) -> m.JobStatus:
        response = self.request(m.StatusRequest(self.conn.next_request_id(), as_job_id(job_id)))
        assert isinstance(response, m.StatusResponse)
        return response.status

    def wait(self, job_id: JobRef) -> m.JobStatus:
        response = self.request(m.WaitRequest(self.conn.next_request_id(), as_job_id(job_id)))
        assert isinstance(response, m.StatusResponse)
        return response.status

    def list(
        self,
        *,
        states: Iterable[m.JobState] = (),
        owner: str = "",
        name: str = "",
        labels: Iterable[str] = (),
        newest_first: bool = False,
    ) -> tuple[m.JobStatus, ...]:
        """
        Every job this client may see, oldest first (newest first with
        C{newest_first}), optionally only those in one of C{states}, owned
        by C{owner}, named C{name} and matching every label filter
        (C{"KEY"} or C{"KEY=VALUE"}); see L{iter_pages}.
        """
        return tuple(
            self.iter_jobs(states=states, owner=owner, name=name, labels=labels, newest_first=newest_first)
        )

    def iter_jobs(
        self,
        *,
        states: Iterable[m.JobState] = (),
        owner: str = "",
        page_size: int = 0,
        name: str = "",
        labels: Iterable[str] = (),
        newest_first: bool = False,
    ) -> Iterator[m.JobStatus]:
        """
        The jobs of L{list}, one after the other, as L{iter_pages} reads
        them.
        """
        for page in self.iter_pages(
            states=states, owner=owner, page_size=page_size, name=name, labels=labels, newest_first=newest_first
        ):
            yield from page

    def iter_pages(
        self,
        *,
        states: Iterable[m.JobState] = (),
        owner: str = "",
        page_size: int = 0,
        name: str = "",
        labels: Iterable[str] = (),
        newest_first: bool = False,
        first_page_size: int = 0,
    ) -> Iterator[tuple[m.JobStatus, ...]]:
        """
        The jobs of L{list}, page after page (spec section 6.4), each page
        as it arrives: the next is asked for only when the caller takes it,
        so a caller can show a page before the next is read.  Each page
        holds what fits one frame (or C{page_size} jobs), so a list of any
        size and any jobs can be read.  The server filters.

        C{first_page_size}, if not 0, caps the first page alone: a page
        that fits a frame holds thousands of jobs, and one of 100 comes (to
        be shown) in milliseconds.

        With C{newest_first}, the newest job comes first.  A server that
        speaks a protocol version before L{m.NEWEST_FIRST_VERSION} pages
        only oldest first: then every page is read first, and the whole
        list comes as one page, newest first.
        """
        mask = m.state_mask(states)
        label_filters = tuple(labels)
        reverse = newest_first and self.conn.version < m.NEWEST_FIRST_VERSION
        gathered: list[m.JobStatus] = []
        after_created_at, after_job_id = 0, uuid.UUID(int=0)
        size = first_page_size or page_size
        while True:
            request = m.ListRequest(
                self.conn.next_request_id(),
                after_created_at,
                after_job_id,
                size,
                mask,
                owner,
                name,
                label_filters,
                newest_first and not reverse,
            )
            response = self.request(request)
            assert isinstance(response, m.ListResponse)
            if reverse:
                gathered.extend(response.jobs)
            else:
                yield response.jobs
            if not response.more or not response.jobs:
                break
            last = response.jobs[-1]
            after_created_at, after_job_id = last.created_at, last.job_id
            size = page_size
        if reverse:
            gathered.sort(key=lambda job: (job.created_at, job.job_id.int), reverse=True)
            yield tuple(gathered)

    def stop(
        self, job_id: JobRef, *, grace: float | None = None, grace_ms: int | None = None, force: bool = False
    ) -> None:
        """
        SIGTERM, then SIGKILL after C{grace} seconds (as in
        L{jobworker.client}; default 10; C{grace_ms} in milliseconds is the
        older spelling), or SIGKILL at once with C{force}.
        """
        if grace is not None and grace_ms is not None:
            raise TypeError("give grace (seconds) or grace_ms, not both")
        if grace_ms is None:
            grace_ms = 10_000 if grace is None else max(0, round(grace * 1000))
        self.request(m.StopRequest(self.conn.next_request_id(), as_job_id(job_id), grace_ms, force))

    def signal(self, job_id: JobRef, signum: int) -> None:
        """
        Send one signal (one of C{messages.SIGNALS_SENT}: HUP, INT, QUIT,
        USR1, USR2, TERM) to the running job's command, without stopping it.
        """
        self.request(m.SignalRequest(self.conn.next_request_id(), as_job_id(job_id), signum))

    def remove(self, job_id: JobRef) -> None:
        self.request(m.RemoveRequest(self.conn.next_request_id(), as_job_id(job_id)))
