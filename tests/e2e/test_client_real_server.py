"""
The embeddable Twisted client (L{jobworker.client}) against a real server
(C{twistd jobworker} over TLS on loopback, the shared C{server} fixture); its
unit tests, against an in-memory server, are L{tests.unit.test_client}.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from twisted.internet import defer

from jobworker.client import ClientConnectionLost, JobworkerClientProtocol, connect
from jobworker.errors import ErrorCode, RequestError
from jobworker.protocol import messages as m
from tests.unit.test_client import Recorder

# Each test against the real server must end within this many seconds: a
# stream or wait that never ends fails its test rather than hanging the run.
REAL_TEST_TIMEOUT_S = 60


def real_server_test(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., defer.Deferred[None]]:
    """
    Run an async test in the reactor (pytest-twisted waits for the Deferred
    it returns), cancelled after L{REAL_TEST_TIMEOUT_S}.
    """

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> defer.Deferred[None]:
        from twisted.internet import reactor

        return defer.ensureDeferred(test(*args, **kwargs)).addTimeout(REAL_TEST_TIMEOUT_S, reactor)

    return run


def connect_to(server: Any, identity: str = "admin", **options: Any) -> defer.Deferred[JobworkerClientProtocol]:
    from twisted.internet import reactor

    certs = server.certs
    return connect(
        reactor, ("127.0.0.1", server.port),
        ca=certs / "ca.pem", cert=certs / f"{identity}.pem", key=certs / f"{identity}.key", **options,
    )


@real_server_test
async def test_real_echo_job(server) -> None:
    client = await connect_to(server)
    try:
        assert (client.hello.identity, client.hello.role) == ("admin", "admin")
        job_id = await client.start(["echo", "hello from twisted"])
        recorder = Recorder()
        final = await client.follow(job_id, recorder).done
        assert recorder.events == [("output", 1, b"hello from twisted\n")]
        assert (final.state, final.exit_code) == (m.JobState.EXITED, 0)
        assert (await client.wait(job_id)).exit_code == 0
        status = await client.status(job_id)
        assert status.argv == ("echo", "hello from twisted")
        assert status.output_bytes == len(b"hello from twisted\n")
        assert job_id in {job.job_id for job in await client.list()}
        with pytest.raises(RequestError) as missing:
            await client.status(uuid.uuid4())
        assert missing.value.code is ErrorCode.NOT_FOUND
    finally:
        await client.close()


@real_server_test
async def test_real_concurrent_followers_get_identical_bytes(server) -> None:
    """
    Three followers on one connection, with windows small enough that
    each needs many rounds of credit, all get every byte in order.
    """
    client = await connect_to(server)
    try:
        script = "i=0; while [ $i -lt 20000 ]; do echo line $i; i=$((i+1)); done; echo done >&2"
        job_id = await client.start(["sh", "-c", script])
        recorders = [Recorder() for _ in range(3)]
        followers = [client.follow(job_id, recorder, window=16 << 10) for recorder in recorders]
        statuses = await defer.gatherResults([follower.done for follower in followers])
        expected = "".join(f"line {i}\n" for i in range(20000)).encode()
        for recorder in recorders:
            assert recorder.data == expected + b"done\n"
            assert recorder.events[-1] == ("output", 2, b"done\n")
        assert all(status.state is m.JobState.EXITED for status in statuses)
        assert {follower.offset for follower in followers} == {len(expected) + 5}
    finally:
        await client.close()


@real_server_test
async def test_real_paused_follower_holds_at_most_its_window(server) -> None:
    """
    A paused follower stops the server at its window, and resuming picks
    up where it stopped.
    """
    from twisted.internet import reactor, task

    window = 16 << 10
    client = await connect_to(server)
    try:
        job_id = await client.start(["sh", "-c", "head -c 300000 /dev/zero"])
        await client.wait(job_id)
        recorder = Recorder()
        follower = client.follow(job_id, recorder, window=window)
        follower.pause()
        await task.deferLater(reactor, 0.5, lambda: None)
        assert recorder.data == b""
        # What arrived while paused is delivered during resume() itself.
        follower.resume()
        held = len(recorder.data)
        assert 0 < held <= window
        await follower.done
        assert recorder.data == bytes(300000)
    finally:
        await client.close()


@real_server_test
async def test_real_request_denied(server) -> None:
    """
    A viewer may look but not start; the connection goes on after the
    refusal.
    """
    viewer = await connect_to(server, "viewer")
    try:
        assert viewer.hello.role == "viewer"
        with pytest.raises(RequestError) as denied:
            await viewer.start(["true"])
        assert denied.value.code is ErrorCode.PERMISSION_DENIED
        assert isinstance(await viewer.list(), tuple)
    finally:
        await viewer.close()


@real_server_test
async def test_real_server_not_named_by_its_certificate(server) -> None:
    from service_identity import VerificationError

    with pytest.raises(ClientConnectionLost, match="before the server's hello") as refused:
        await connect_to(server, hostname="jobs.example.org")
    assert isinstance(refused.value.reason, VerificationError)


@real_server_test
async def test_real_client_certificate_from_another_ca(server, tmp_path) -> None:
    """
    In TLS 1.3 the server refuses the client's certificate after the
    client's side of the handshake is done; connect() still fails, before
    any hello.
    """
    from twisted.internet import reactor

    from tests.support import make_pki

    stranger = make_pki(tmp_path)
    with pytest.raises(ClientConnectionLost, match="before the server's hello"):
        await connect(
            reactor, f"127.0.0.1:{server.port}",
            ca=server.certs / "ca.pem", cert=stranger / "admin.pem", key=stranger / "admin.key",
        )


@real_server_test
async def test_real_names_labels_and_output_times(server) -> None:
    """
    The embeddable client starts a named, labelled job, lists by label on
    the server, and follows with times: C{time_mark} is called before the
    output it dates, C{since} skips what was read before.
    """
    import time as _time

    client = await connect_to(server)
    try:
        name = f"tw-{uuid.uuid4().hex[:8]}"
        job_id = await client.start(["sh", "-c", "echo a; sleep 0.5; echo b"], name=name, labels={"via": name})
        await client.wait(job_id)
        [listed] = await client.list(labels=[f"via={name}"])
        assert (listed.job_id, listed.name, listed.labels) == (job_id, name, (("via", name),))
        outputs: list[bytes] = []
        # (offset, time, bytes of output delivered before the mark)
        marks: list[tuple[int, float, int]] = []
        follower = client.follow(
            job_id,
            lambda fd, data: outputs.append(data),
            follow=False,
            timestamps=True,
            time_mark=lambda offset, when: marks.append((offset, when, sum(map(len, outputs)))),
        )
        await follower.done
        assert [offset for offset, _, _ in marks] == [0, 2]
        assert b"".join(outputs) == b"a\nb\n"
        # Each mark comes before the output that holds its offset.
        assert all(delivered <= offset for offset, _, delivered in marks)
        (_, first, _), (_, second, _) = marks
        assert isinstance(first, float) and isinstance(second, float)
        assert 0.4 <= second - first < 5 and abs(first - _time.time()) < 60
        assert follower.time == second
        later: list[bytes] = []
        await client.follow(job_id, lambda fd, data: later.append(data), follow=False, since=(first + second) / 2).done
        assert b"".join(later) == b"b\n"
    finally:
        await client.close()
