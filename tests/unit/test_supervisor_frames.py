"""
The supervisor's frames (L{jobworker.host.contract}), its backlog as the
server reads it (L{jobworker.jobs.supervisor.BacklogReader}), and what the
output log does for a job taken back (L{jobworker.output.log.OutputLog}).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given, strategies as st
from twisted.internet.error import ProcessDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from jobworker.host import contract
from jobworker.jobs.supervisor import BacklogReader, Zygote, read_end_record
from jobworker.output.log import GAP_FD, MemorySpool, OutputLog

chunks = st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(min_size=1, max_size=300)), max_size=20)


@given(chunks, st.integers(min_value=0, max_value=2**40), st.data())
def test_data_frames_split_anywhere_come_back_whole_and_in_order(pieces, start, data):
    stream = b""
    offset = start
    for fd, chunk in pieces:
        stream += contract.data_header(fd, offset, len(chunk)) + chunk
        offset += len(chunk)
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)))
    first, used = contract.split_frames(stream[:cut])
    rest, used_rest = contract.split_frames(stream[used:])
    assert used + used_rest == len(stream)
    got = [contract.parse_data(payload) for _, payload in first + rest]
    offset = start
    expected = []
    for fd, chunk in pieces:
        expected.append((fd, offset, chunk))
        offset += len(chunk)
    assert got == expected


def test_a_frame_longer_than_the_limit_is_refused_before_it_is_buffered():
    header = bytes((contract.DATA,)) + (contract.MAX_FRAME + 1).to_bytes(4, "big")
    with pytest.raises(ValueError):
        contract.split_frames(header)


@pytest.mark.parametrize("payload", [b"", b"\x01" + b"\0" * 7, b"\x03" + b"\0" * 8 + b"x", b"\x00" + b"\0" * 8])
def test_a_bad_data_frame_is_refused(payload):
    with pytest.raises(ValueError):
        contract.parse_data(payload)


def write_backlog(path, pieces, start=0):
    offset = start
    with open(path, "wb") as handle:
        for fd, chunk in pieces:
            handle.write(contract.data_header(fd, offset, len(chunk)) + chunk)
            offset += len(chunk)


def read_all(reader):
    got = []
    while (step := reader.step()) is not None:
        got.extend(step)
    return got


def test_the_backlog_is_read_back_in_order(tmp_path):
    path = tmp_path / "x.backlog"
    write_backlog(path, [(1, b"a" * 5000), (2, b"b"), (1, b"c" * 70000)], start=10)
    assert read_all(BacklogReader(str(path))) == [(1, 10, b"a" * 5000), (2, 5010, b"b"), (1, 5011, b"c" * 70000)]


def test_a_torn_backlog_ends_at_its_last_whole_frame(tmp_path):
    path = tmp_path / "x.backlog"
    write_backlog(path, [(1, b"whole"), (1, b"torn" * 100)])
    os.truncate(path, os.path.getsize(path) - 10)
    reader = BacklogReader(str(path))
    assert read_all(reader) == [(1, 0, b"whole")]
    assert reader.damage is None  # a supervisor killed mid-write: no damage, a gap by offset


def test_a_damaged_backlog_stops_at_the_damage_and_says_so(tmp_path):
    path = tmp_path / "x.backlog"
    write_backlog(path, [(1, b"good")])
    with open(path, "ab") as handle:
        handle.write(contract.frame(contract.LINE, b"not output"))
    reader = BacklogReader(str(path))
    assert read_all(reader) == [(1, 0, b"good")]
    assert reader.damage is not None and "not a data frame" in reader.damage


def test_no_backlog_is_an_empty_one(tmp_path):
    assert read_all(BacklogReader(str(tmp_path / "missing"))) == []


def test_an_end_record_is_read_only_when_it_says_the_job_ended(tmp_path):
    path = tmp_path / "x.end"
    assert read_end_record(str(path)) is None
    path.write_text('{"ended": false}')
    assert read_end_record(str(path)) is None
    path.write_text("garbage")
    assert read_end_record(str(path)) is None
    path.write_text('{"ended": true, "exit": [7, 0], "lines": ["started", "exit 7"]}')
    assert read_end_record(str(path))["exit"] == [7, 0]


def test_skip_to_makes_a_gap_that_readers_and_the_spool_see():
    spool = MemorySpool()
    log = OutputLog(spool)
    log.append(1, b"before")
    log.skip_to(100)
    log.append(2, b"after")
    chunks = log.read(0, 1 << 20)
    assert chunks[0].data == b"before"
    gap = log.read(6, 1 << 20)[0]
    assert (gap.fd, gap.offset, gap.size) == (GAP_FD, 6, 94)
    assert bytes(log.read(100, 1 << 20)[0].data) == b"after"
    assert log.lost_bytes == 94
    # The spool alone tells the same after a restart.
    reopened = OutputLog.from_spool(spool)
    assert [(c.fd, c.offset, c.size) for c in reopened.read(0, 1 << 20)] == [(1, 0, 6)]
    assert [(c.fd, c.offset, c.size) for c in reopened.read(6, 1 << 20)] == [(GAP_FD, 6, 94)]
    assert reopened.end == 105


def test_a_log_reopened_for_a_job_taken_back_goes_on_after_its_spool():
    spool = MemorySpool()
    log = OutputLog(spool)
    log.append(1, b"first ")
    reopened = OutputLog.from_spool(spool)
    reopened.continue_on(spool, retention=1 << 30)
    reopened.append(1, b"second")
    assert b"".join(bytes(c.data) for c in reopened.read(0, 1 << 20)) == b"first second"
    assert b"".join(bytes(c.data) for c in OutputLog.from_spool(spool).read(0, 1 << 20)) == b"first second"


def test_stored_end_waits_for_the_spool_to_write():
    class SlowSpool(MemorySpool):
        first_unwritten: int | None = None

    spool = SlowSpool()
    log = OutputLog(spool)
    log.append(1, b"x" * 10)
    assert log.stored_end == 10
    spool.first_unwritten = 4
    log.append(1, b"y" * 10)
    assert log.stored_end == 4


class Events:
    def __init__(self):
        self.got: list = []

    def supervisor_hello(self, hello):
        self.got.append(("hello", hello["offset"]))

    def supervisor_line(self, line):
        self.got.append(("line", line))

    def supervisor_output(self, fd, offset, data):
        self.got.append(("data", offset))

    def supervisor_output_closed(self):
        self.got.append(("closed",))

    def supervisor_gone(self, end):
        self.got.append(("gone", end))


def test_frames_wait_until_every_reason_to_pause_is_gone():
    # Reading a backlog pauses the link; the spool's congestion pauses and
    # resumes it meanwhile: the newer output must still wait for the
    # backlog (it once came first, and the backlog's rest read as a gap).
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from jobworker.jobs.supervisor import SupervisorLink

    events = Events()
    link = SupervisorLink(Clock(), events, None, lambda: 0)
    link.makeConnection(StringTransport())
    link.pause("backlog")
    link.pause("spool")
    link.dataReceived(contract.data_header(1, 100, 1) + b"x" + contract.frame(contract.END, b"0 0"))
    link.resume("spool")
    assert events.got == []
    link.connectionLost()
    assert events.got == []  # told after the frames it holds
    link.resume("backlog")
    assert events.got == [("data", 100), ("gone", (0, 0))]


@given(chunks, st.lists(st.integers(min_value=1, max_value=400), max_size=30))
def test_the_link_takes_frames_however_the_socket_splits_them(pieces, cuts):
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from jobworker.jobs.supervisor import SupervisorLink

    events = Events()
    events.supervisor_output = lambda fd, offset, data: events.got.append(("data", fd, offset, bytes(data)))
    link = SupervisorLink(Clock(), events, None, lambda: 0)
    link.makeConnection(StringTransport())
    stream = contract.frame(contract.LINE, b"started")
    offset = 0
    for fd, chunk in pieces:
        stream += contract.data_header(fd, offset, len(chunk)) + chunk
        offset += len(chunk)
    stream += contract.frame(contract.END, b"0 0")
    position = 0
    for cut in cuts:
        link.dataReceived(stream[position : position + cut])
        position += cut
    link.dataReceived(stream[position:])
    expected = [("line", "started")]
    offset = 0
    for fd, chunk in pieces:
        expected.append(("data", fd, offset, chunk))
        offset += len(chunk)
    assert events.got == expected
    assert link.end == (0, 0)


@pytest.mark.parametrize("content", [b"", b"not json", b"[2]", b'{"format": "2"}', b'{"format": true}', b"\xff\xfe"])
def test_a_damaged_format_file_refuses_the_state_directory(tmp_path, content):
    from jobworker.jobs.store import StateFormatTooNew, check_state_format

    (tmp_path / "format").write_bytes(content)
    with pytest.raises(StateFormatTooNew, match="damaged format file"):
        check_state_format(str(tmp_path))


def test_state_formats_up_to_this_one_are_read_and_none_is_new(tmp_path):
    from jobworker.jobs.store import STATE_FORMAT, StateFormatTooNew, check_state_format

    assert check_state_format(str(tmp_path)) is None
    (tmp_path / "format").write_text('{"format": 1}')
    assert check_state_format(str(tmp_path)) == 1
    (tmp_path / "format").write_text(f'{{"format": {STATE_FORMAT + 1}}}')
    with pytest.raises(StateFormatTooNew, match="this server reads formats up to"):
        check_state_format(str(tmp_path))


# -- the zygote's end ----------------------------------------------------------------


class _Spawner:
    """
    Just enough of a process reactor for L{Zygote}: the spawned protocol
    is kept, and the test ends it.
    """

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def spawnProcess(self, process: Any, *args: Any, **kwargs: Any) -> Any:
        self.protocols.append(process)
        transport = StringTransport()
        transport.pid = 4242
        return transport


def test_closing_the_zygote_fires_once_it_has_ended() -> None:
    # The server waits for it at shutdown: a zygote that exits once the
    # reactor has stopped delivers its SIGCHLD after Twisted's handler is
    # gone, and Python writes a traceback into the server's log.
    reactor = _Spawner()
    zygote = Zygote(reactor, "/no/helper")
    zygote._start()
    closed = zygote.close()
    fired: list[object] = []
    closed.addBoth(fired.append)
    assert fired == []
    reactor.protocols[0].processEnded(Failure(ProcessDone(0)))
    assert fired == [None]
    # None running: at once.
    again: list[object] = []
    zygote.close().addBoth(again.append)
    assert again == [None]
