"""
Admission (L{jobworker.jobs.admission.admit}) without a reactor: every rule
of a start request, the order of the rules, and what the admitted
L{JobSpec} holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, strategies as st

from jobworker.errors import ErrorCode, RequestError
from jobworker.jobs.admission import (
    MAX_ARGV_ITEMS,
    MAX_ENV_BYTES,
    AdmissionConfig,
    admit,
    enforceable_limits,
)
from jobworker.jobs.spec import JobSpec
from jobworker.limits import Limits
from jobworker.policy import Identity, Role
from jobworker.protocol.messages import InvalidLimits, Network, StartRequest

ADMIN = Identity("root-ops", Role.ADMIN)
USER = Identity("alice", Role.USER)
VIEWER = Identity("bob", Role.VIEWER)
NOBODY = Identity("eve", None)
ALL_CONTROLLERS = frozenset({"cpu", "memory", "io", "pids"})
CONFIG = AdmissionConfig(
    default_limits=Limits(pids=1024, memory_bytes=1 << 30),
    caps=Limits(memory_bytes=2 << 30, cpu_millicores=2000),
    default_user="jobs",
    controllers=ALL_CONTROLLERS,
    max_jobs_per_identity=3,
)


def request(**fields: Any) -> StartRequest:
    return StartRequest(**{"request_id": 7, "argv": ("echo", "hi"), **fields})


def refused(identity: Identity, start: StartRequest, config: AdmissionConfig = CONFIG, running: int = 0) -> ErrorCode:
    with pytest.raises(RequestError) as error:
        admit(identity, start, config, running=running)
    return error.value.code


def test_an_admitted_job_holds_what_was_decided() -> None:
    spec = admit(USER, request(env=(("A", "1"),), network=Network.NONE, limits=Limits(cpu_millicores=500)), CONFIG)
    assert spec == JobSpec(
        owner="alice",
        argv=("echo", "hi"),
        env=(("A", "1"),),
        workdir="/",
        network=Network.NONE,
        user="jobs",
        # asked for, then the defaults; both within the caps; no cpu default is capped in.
        limits=Limits(cpu_millicores=500, memory_bytes=1 << 30, pids=1024),
        cgroup_limits=Limits(cpu_millicores=500, memory_bytes=1 << 30, pids=1024),
    )
    assert spec.timeout_s is None and not spec.has_own_uid
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.user = "root"  # type: ignore[misc]


def test_a_non_admin_gets_the_caps_where_nothing_was_asked() -> None:
    config = dataclasses.replace(CONFIG, default_limits=Limits(memory_bytes=4 << 30))
    spec = admit(USER, request(), config)
    assert spec.limits == Limits(memory_bytes=2 << 30, cpu_millicores=2000)
    # An admin is not capped.
    assert admit(ADMIN, request(), config).limits == Limits(memory_bytes=4 << 30)


def test_the_timeout_in_seconds() -> None:
    assert admit(USER, request(limits=Limits(timeout_ms=1500)), CONFIG).timeout_s == 1.5


def test_workdir_and_user() -> None:
    assert admit(USER, request(workdir="/srv"), CONFIG).workdir == "/srv"
    assert admit(USER, request(user="jobs"), CONFIG).user == "jobs"  # the default, named
    assert admit(ADMIN, request(user="postgres"), CONFIG).user == "postgres"
    own = admit(USER, request(), dataclasses.replace(CONFIG, default_user=""))
    assert own.user == "" and own.has_own_uid


@pytest.mark.parametrize(
    "identity, fields, running, config, code",
    [
        (VIEWER, {}, 0, CONFIG, ErrorCode.PERMISSION_DENIED),
        (NOBODY, {}, 0, CONFIG, ErrorCode.PERMISSION_DENIED),
        (USER, {"limits": InvalidLimits("pids: -1 is out of range")}, 0, CONFIG, ErrorCode.INVALID_LIMITS),
        (USER, {"argv": ()}, 0, CONFIG, ErrorCode.BAD_REQUEST),
        (USER, {"argv": ("",)}, 0, CONFIG, ErrorCode.BAD_REQUEST),
        (USER, {"argv": ("x",) * (MAX_ARGV_ITEMS + 1)}, 0, CONFIG, ErrorCode.BAD_REQUEST),
        (USER, {"env": (("BIG", "v" * MAX_ENV_BYTES),)}, 0, CONFIG, ErrorCode.BAD_REQUEST),
        (USER, {"env": (("A=B", "v"),)}, 0, CONFIG, ErrorCode.BAD_REQUEST),
        (USER, {"workdir": "tmp"}, 0, CONFIG, ErrorCode.BAD_REQUEST),
        (USER, {"limits": Limits(memory_bytes=3 << 30)}, 0, CONFIG, ErrorCode.INVALID_LIMITS),
        (USER, {"user": "root"}, 0, CONFIG, ErrorCode.PERMISSION_DENIED),
        (USER, {"network": Network.HOST}, 0, CONFIG, ErrorCode.PERMISSION_DENIED),
        (USER, {}, 3, CONFIG, ErrorCode.TOO_MANY_JOBS),
        (ADMIN, {}, 3, CONFIG, ErrorCode.TOO_MANY_JOBS),
        (ADMIN, {"limits": Limits(pids=10)}, 0, dataclasses.replace(CONFIG, controllers=None), ErrorCode.UNSUPPORTED_LIMIT),
    ],
    ids=repr,
)
def test_each_rule_refuses_with_its_code(
    identity: Identity, fields: dict[str, Any], running: int, config: AdmissionConfig, code: ErrorCode
) -> None:
    assert refused(identity, request(**fields), config, running) is code


def test_the_last_job_below_the_limit_is_admitted() -> None:
    admit(USER, request(), CONFIG, running=2)


def test_without_cgroups_a_timeout_is_still_enforceable() -> None:
    config = dataclasses.replace(CONFIG, controllers=None)
    spec = admit(ADMIN, request(limits=Limits(timeout_ms=1000)), config)
    assert spec.limits.timeout_ms == 1000
    # The server's own defaults do not make a start fail there.
    assert spec.limits.pids == 1024


def test_defaults_the_host_cannot_enforce_are_left_out_of_the_cgroup() -> None:
    spec = admit(ADMIN, request(limits=Limits(cpu_millicores=100)), dataclasses.replace(CONFIG, controllers=frozenset({"cpu"})))
    assert spec.limits == Limits(cpu_millicores=100, memory_bytes=1 << 30, pids=1024)
    assert spec.cgroup_limits == Limits(cpu_millicores=100)
    # One that was asked for stays, for the driver to refuse clearly.
    asked = Limits(memory_bytes=5 << 20)
    assert enforceable_limits(asked, asked, frozenset()) == asked


# -- the order of the rules --------------------------------------------------------

# Each a way to be wrong, in the order admit checks them.
WRONGS: list[tuple[str, dict[str, Any], ErrorCode]] = [
    ("role", {"identity": VIEWER}, ErrorCode.PERMISSION_DENIED),
    ("invalid limits", {"limits": InvalidLimits("bad")}, ErrorCode.INVALID_LIMITS),
    ("NUL", {"argv": ("ec\0ho",)}, ErrorCode.BAD_REQUEST),
    ("cap", {"limits": Limits(cpu_millicores=3000)}, ErrorCode.INVALID_LIMITS),
    ("user", {"user": "root"}, ErrorCode.PERMISSION_DENIED),
    ("network", {"network": Network.HOST}, ErrorCode.PERMISSION_DENIED),
    ("too many", {"running": 3}, ErrorCode.TOO_MANY_JOBS),
]


@given(st.sets(st.sampled_from(range(len(WRONGS))), min_size=1))
def test_a_request_wrong_in_several_ways_gets_the_first_rules_answer(wrong: set[int]) -> None:
    fields: dict[str, Any] = {}
    for index in sorted(wrong):
        _, change, _ = WRONGS[index]
        if "limits" in change and "limits" in fields:
            continue  # one limits field: the earlier wrong keeps it
        fields.update(change)
    identity = fields.pop("identity", USER)
    running = fields.pop("running", 0)
    assert refused(identity, request(**fields), CONFIG, running) is WRONGS[min(wrong)][2]


limits_values = st.builds(
    Limits,
    cpu_millicores=st.integers(0, 8000),
    memory_bytes=st.integers(0, 8 << 30),
    pids=st.integers(0, 4096),
    timeout_ms=st.integers(0, 10**6),
)


@given(requested=limits_values, defaults=limits_values, caps=limits_values, admin=st.booleans())
def test_admitted_limits_keep_to_the_caps_and_fill_every_gap(
    requested: Limits, defaults: Limits, caps: Limits, admin: bool
) -> None:
    config = AdmissionConfig(default_limits=defaults, caps=caps, controllers=ALL_CONTROLLERS)
    try:
        spec = admit(ADMIN if admin else USER, request(limits=requested), config)
    except RequestError as error:
        # Only a non-admin asking above a cap is refused.
        assert not admin and requested.above(caps) and error.code is ErrorCode.INVALID_LIMITS
        return
    for field in dataclasses.fields(Limits):
        name = field.name
        asked, default, cap, got = (getattr(x, name) for x in (requested, defaults, caps, spec.limits))
        if asked:
            assert got == asked  # what was asked is what is given
        elif admin or not cap:
            assert got == default
        else:
            assert got == (min(default, cap) if default else cap)
    assert spec.cgroup_limits == spec.limits  # every controller present
