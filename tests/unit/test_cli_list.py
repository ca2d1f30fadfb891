"""
C{jobcli list} streams (issue 17 item 3): each page is printed as it
arrives, the newest job first, before the next page is asked for; the
table's columns line up across pages; C{--json} prints the bytes it printed
when it had the whole list; a refusal is one line on stderr and nothing on
stdout; a server of protocol version 3, which pages oldest first only, is
still listed newest first.

No network: C{jobcli}'s client talks to L{ListingServer}, the real server
core (L{Connection}) and the real paging (L{ListIndex}, L{list_page}) over
jobs given as statuses, in memory.  The server cuts pages of
L{PAGE} jobs, and notes what C{jobcli} had printed when each list request
came.
"""

from __future__ import annotations

import json
import re
import ssl
import uuid
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any

import pytest

import jobworker.cli.session as session_module
from jobworker.blocking import BlockingClient
from jobworker.cli import main
from jobworker.cli.commands import LIST_FIRST_PAGE
from jobworker.cli.formatting import short_id, status_json
from jobworker.errors import ErrorCode
from jobworker.protocol import messages as m
from jobworker.protocol.connection import Connection, Role
from jobworker.protocol.listing import ListIndex, list_page

T0 = 1_717_243_200_000_000
# Jobs per page of the fake server: pages of its own size, as a server
# whose frames hold only so many.
PAGE = 2


class ListedStatus:
    """
    A status as the paging reads a job (L{jobworker.protocol.listing.ListedJob}).
    """

    def __init__(self, status: m.JobStatus) -> None:
        self._status = status
        self.job_id = status.job_id
        self.owner = status.owner
        self.created_at = status.created_at
        self.name = status.name
        self.labels = status.labels
        self.state = status.state

    def status(self) -> m.JobStatus:
        return self._status


class ListingServer:
    """
    The server's end of one connection, standing in for the client's TLS
    channel: what the client sends is read by the server core at once, and
    each list request answered with a page (or refused with C{refusal}).

    @ivar printed: for each list request, in order, what C{jobcli} had
        written to stdout by the time it came.
    """

    def __init__(
        self,
        jobs: list[m.JobStatus],
        stdout: Callable[[], str],
        versions: Collection[int] = m.SUPPORTED_VERSIONS,
        refusal: m.ErrorResponse | None = None,
        refuse_from: int = 0,
    ) -> None:
        """
        @param refusal: the answer to list requests from number
            C{refuse_from} (0: the first) on, instead of a page.
        """
        self.conn = Connection(Role.SERVER, versions=versions)
        self.jobs = [ListedStatus(status) for status in jobs]
        self.index: ListIndex[ListedStatus] = ListIndex()
        self.stdout = stdout
        self.refusal = refusal
        self.refuse_from = refuse_from
        self.requests: list[m.ListRequest] = []
        self.printed: list[str] = []
        self.to_client = bytearray(
            self.conn.send(m.ServerHello(self.conn.version, self.conn.max_frame_size, "fake", "alice", "admin"))
        )

    def sendall(self, data: bytes) -> None:
        for message in self.conn.receive_data(bytes(data)):
            if not isinstance(message, m.ListRequest):
                continue
            self.requests.append(message)
            self.printed.append(self.stdout())
            if self.refusal is not None and len(self.requests) > self.refuse_from:
                self.to_client += self.conn.send(replace(self.refusal, request_id=message.request_id))
                continue
            cursor = (message.after_created_at, message.after_job_id.int)
            found = self.index.before(self.jobs, cursor) if message.newest_first else self.index.after(self.jobs, cursor)
            page = list_page(found, replace(message, max_jobs=min(message.max_jobs or PAGE, PAGE)), self.conn.peer_max_frame_size)
            self.to_client += self.conn.send(page)

    def recv_into(self, view: memoryview) -> int:
        size = min(len(view), len(self.to_client))
        view[:size] = self.to_client[:size]
        del self.to_client[:size]
        return size

    def close(self) -> None:
        pass


class InMemoryClient(BlockingClient):
    """
    A blocking client connected to a L{ListingServer} instead of a server's
    TLS port.
    """

    def __init__(self, server: ListingServer) -> None:
        super().__init__(("127.0.0.1", 1), ssl.create_default_context())
        self.server = server

    def connect(self) -> m.ServerHello:
        self._sock = self.server  # type: ignore[assignment]  # a channel's stand-in
        hello = self._next_message()
        assert isinstance(hello, m.ServerHello)
        self.hello = hello
        self._write(self.conn.send(m.ClientHello(self.conn.version, self.conn.max_frame_size)))
        return hello


def job(index: int, name: str = "", owner: str = "alice", **fields: Any) -> m.JobStatus:
    # Pairs of jobs created in the same microsecond: the order must break
    # their ties (by id) across pages too.
    return m.JobStatus(
        uuid.UUID(int=((index * 7919) % 1000 + 1) << 112),
        owner,
        ("sleep", str(index)),
        m.JobState.EXITED,
        exit_code=0,
        created_at=T0 + index // 2,
        started_at=T0 + index // 2,
        ended_at=T0 + index // 2 + 1000,
        name=name,
        **fields,
    )


JOBS = [job(index, name=f"job-{index}" if index % 2 else "") for index in range(7)]
NEWEST_FIRST = sorted(JOBS, key=lambda status: (status.created_at, status.job_id.int), reverse=True)


class Run:
    def __init__(self, code: int, out: str, err: str, server: ListingServer) -> None:
        self.code, self.out, self.err, self.server = code, out, err, server


@pytest.fixture
def jobcli(monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tmp_path: Any) -> Callable[..., Run]:
    """
    Run C{jobcli ARGS} against a L{ListingServer} of C{jobs}.
    """
    monkeypatch.setenv("JOBWORKER_CONFIG", str(tmp_path / "none.toml"))
    for name in ("JOBWORKER_SERVER", "JOBWORKER_CA", "JOBWORKER_CERT", "JOBWORKER_KEY"):
        monkeypatch.delenv(name, raising=False)
    capfd.readouterr()
    seen: list[str] = []

    def stdout() -> str:
        seen.append(capfd.readouterr().out)
        return "".join(seen)

    def run(*args: str, jobs: list[m.JobStatus] = JOBS, **options: Any) -> Run:
        seen.clear()
        server = ListingServer(jobs, stdout, **options)
        monkeypatch.setattr(session_module, "connect_target", lambda args, target: InMemoryClient(server))
        code = main(["list", *args])
        captured = capfd.readouterr()
        return Run(code, stdout() + captured.out, captured.err, server)

    return run


def test_a_table_page_is_printed_before_the_next_is_asked_for(jobcli: Callable[..., Run]) -> None:
    run = jobcli()
    assert run.code == 0
    lines = run.out.splitlines()
    assert lines[0].startswith("ID ") and len(lines) == 1 + len(JOBS)
    assert len(run.server.requests) == 4  # pages of 2, 2, 2, 1
    assert all(request.newest_first for request in run.server.requests)
    # Nothing before the first page; the header and the first page before
    # the second is asked for, and so on.
    assert [len(printed.splitlines()) for printed in run.server.printed] == [0, 1 + PAGE, 1 + 2 * PAGE, 1 + 3 * PAGE]
    assert run.server.printed[1].splitlines() == lines[: 1 + PAGE]
    # A small first page, to be printed at once; then pages of a frame.
    assert [request.max_jobs for request in run.server.requests] == [LIST_FIRST_PAGE, 0, 0, 0]


def test_the_table_is_newest_first_across_pages(jobcli: Callable[..., Run]) -> None:
    run = jobcli()
    assert [line.split()[0] for line in run.out.splitlines()[1:]] == [short_id(status.job_id) for status in NEWEST_FIRST]


def test_columns_line_up_across_pages(jobcli: Callable[..., Run]) -> None:
    """
    The NAME column is 20 wide whatever names the later pages hold: a
    longer name is cut to 19 characters and an ellipsis, and COMMAND starts
    at the same column in every row.
    """
    jobs = [
        job(0, name="a"),
        job(1),
        job(2, name="n" * 20),
        job(3, name="x" * 35),
        job(4, name="b"),
        job(5, name="c" * 30, owner="someone-with-a-long-name"),
    ]
    run = jobcli(jobs=jobs)
    lines = run.out.splitlines()
    column = lines[0].index("COMMAND")
    assert lines[0].index("NAME") + 20 + 2 == column
    for line in lines[1:]:
        assert line[column - 2 : column] == "  " and line[column:].startswith("sleep "), (line, column)
    names = [line[lines[0].index("NAME") : column].rstrip() for line in lines[1:]]
    newest = sorted(jobs, key=lambda status: (status.created_at, status.job_id.int), reverse=True)
    cut = {"x" * 35: "x" * 19 + "…", "c" * 30: "c" * 19 + "…", "": "-"}
    assert names == [cut.get(status.name, status.name) for status in newest]


def test_no_trunc_prints_whole_names_and_still_streams(jobcli: Callable[..., Run]) -> None:
    jobs = [job(index, name=f"{index}" * 30) for index in range(5)]
    run = jobcli("--no-trunc", jobs=jobs)
    lines = run.out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == [str(status.job_id) for status in sorted(
        jobs, key=lambda status: (status.created_at, status.job_id.int), reverse=True)]
    assert all(f"{index}" * 30 in run.out for index in range(5))
    assert run.server.printed[1].splitlines() == lines[: 1 + PAGE]


@pytest.mark.parametrize(
    ("flags", "lines_of"),
    [
        (("-q",), lambda status: [short_id(status.job_id)]),
        (("-q", "--no-trunc"), lambda status: [str(status.job_id)]),
        (("--names",), lambda status: [status.name] if status.name else []),
    ],
)
def test_ids_and_names_stream(
    jobcli: Callable[..., Run], flags: tuple[str, ...], lines_of: Callable[[m.JobStatus], list[str]]
) -> None:
    run = jobcli(*flags)
    assert run.code == 0 and run.out.splitlines() == [line for status in NEWEST_FIRST for line in lines_of(status)]
    # Before each page is asked for, the lines of every page before it.
    for number, printed in enumerate(run.server.printed):
        assert printed.splitlines() == [line for status in NEWEST_FIRST[: number * PAGE] for line in lines_of(status)]
    assert run.server.printed[-1]


def test_the_name_column_is_20_wide_whatever_the_names(jobcli: Callable[..., Run]) -> None:
    run = jobcli(jobs=[job(0, name="a"), job(1)])
    header = run.out.splitlines()[0]
    assert header.index("COMMAND") - header.index("NAME") == 20 + 2


@pytest.mark.parametrize("jobs", [JOBS, JOBS[:1], []], ids=["pages", "one", "none"])
def test_json_is_the_array_it_was_and_streams(jobcli: Callable[..., Run], jobs: list[m.JobStatus]) -> None:
    """
    C{--json} prints the bytes C{print(json.dumps(list, indent=2))} printed
    for the whole list, element by element as the pages come.
    """
    run = jobcli("--json", jobs=jobs)
    newest = sorted(jobs, key=lambda status: (status.created_at, status.job_id.int), reverse=True)
    assert run.code == 0
    assert run.out == json.dumps([status_json(status) for status in newest], indent=2) + "\n"
    if len(jobs) > PAGE:
        assert run.server.printed[0] == ""
        assert run.server.printed[1].startswith("[\n  {") and run.server.printed[1].count('"id"') == PAGE


@pytest.mark.parametrize("flags", [(), ("--json",), ("-q",)])
def test_a_refusal_is_one_line_on_stderr_and_nothing_on_stdout(jobcli: Callable[..., Run], flags: tuple[str, ...]) -> None:
    refusal = m.ErrorResponse(0, int(ErrorCode.PERMISSION_DENIED), "alice may not list jobs")
    run = jobcli(*flags, refusal=refusal)
    assert run.code == 1
    assert run.out == ""
    assert run.err == "jobcli: alice may not list jobs\n"


def test_json_cut_short_by_an_error_is_still_an_array(jobcli: Callable[..., Run]) -> None:
    """
    A list that fails after its first page (the connection, the server)
    has printed that page: the array is closed, so what is on stdout is
    JSON, and the error is on stderr, the exit code 1.
    """
    refusal = m.ErrorResponse(0, int(ErrorCode.INTERNAL), "the server failed")
    run = jobcli("--json", refusal=refusal, refuse_from=1)
    assert run.code == 1 and run.err == "jobcli: the server failed\n"
    assert json.loads(run.out) == [status_json(status) for status in NEWEST_FIRST[:PAGE]]


# -- the blocking client's pages -----------------------------------------------


def connected(jobs: list[m.JobStatus], versions: Collection[int] = m.SUPPORTED_VERSIONS) -> InMemoryClient:
    client = InMemoryClient(ListingServer(jobs, lambda: "", versions))
    client.connect()
    return client


def test_iter_pages_asks_for_a_page_only_when_it_is_taken() -> None:
    client = connected(JOBS)
    pages = client.iter_pages(newest_first=True)
    assert client.server.requests == []
    assert next(pages) == tuple(NEWEST_FIRST[:PAGE])
    assert len(client.server.requests) == 1
    assert [status for page in pages for status in page] == NEWEST_FIRST[PAGE:]
    assert len(client.server.requests) == 4
    assert client.list() == tuple(reversed(NEWEST_FIRST))
    assert client.list(newest_first=True) == tuple(NEWEST_FIRST)


def test_iter_pages_of_a_version_3_server_newest_first_is_one_page_sorted_here() -> None:
    client = connected(JOBS, versions={3})
    assert list(client.iter_pages(newest_first=True)) == [tuple(NEWEST_FIRST)]
    assert len(client.server.requests) == 4 and not any(request.newest_first for request in client.server.requests)
    assert list(client.iter_pages()) == [tuple(reversed(NEWEST_FIRST))[at : at + PAGE] for at in range(0, len(JOBS), PAGE)]


@pytest.mark.parametrize("flags", [(), ("--json",), ("-q", "--no-trunc")])
def test_a_version_3_server_is_listed_newest_first_too(jobcli: Callable[..., Run], flags: tuple[str, ...]) -> None:
    """
    A version 3 server pages oldest first only: jobcli asks it so (its
    requests have no newest_first flag) and prints the list, newest first,
    once it has every page.
    """
    newest = jobcli(*flags)
    older = jobcli(*flags, versions={3})
    assert older.server.conn.version == 3
    assert len(older.server.requests) == 4 and not any(request.newest_first for request in older.server.requests)
    assert older.code == 0
    # The jobs' ages ("912d03h ago") may tick between the two runs.
    assert re.sub(r"\S+ ago", "", older.out) == re.sub(r"\S+ ago", "", newest.out)
