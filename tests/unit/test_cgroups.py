"""
Unprivileged tests of the cgroup drivers, on the fake cgroup host of
L{jobworker.host.cgroups.testing}, and of the parsers they rely on.

What the kernel does with the limits is measured for real, as root, in
C{test_cgroups_enforcement.py}.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal

import pytest
from hypothesis import given, strategies as st

from jobworker.errors import ErrorCode, RequestError
from jobworker.host.cgroups import CgroupError, CgroupV1Driver, CgroupV2Driver, Usage, detect
from jobworker.host.cgroups._devices import throttled_block_devices
from jobworker.host.cgroups._host import REMOVE_TIMEOUT
from jobworker.host.cgroups._limits import cpu_bandwidth
from jobworker.host.cgroups._procfs import (
    Membership,
    Mount,
    cgroup_directory,
    escape_mount_field,
    parse_mountinfo,
    parse_proc_cgroup,
)
from jobworker.host.cgroups.testing import FakeCgroupHost
from jobworker.limits import Limits

ALL_LIMITS = Limits(
    cpu_millicores=200, memory_bytes=64 << 20, io_read_bps=1 << 20, io_write_bps=5 << 20, pids=20
)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def subdirectories(path: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir())


def v2_host(tmp_path, **kwargs) -> tuple[FakeCgroupHost, CgroupV2Driver]:
    host = FakeCgroupHost.pure_v2(tmp_path, **kwargs)
    driver = host.detect()
    assert isinstance(driver, CgroupV2Driver)
    driver.prepare()
    host.writes.clear()
    return host, driver


def v1_host(tmp_path, **kwargs) -> tuple[FakeCgroupHost, CgroupV1Driver]:
    host = FakeCgroupHost.hybrid(tmp_path, **kwargs)
    driver = host.detect()
    assert isinstance(driver, CgroupV1Driver)
    driver.prepare()
    host.writes.clear()
    return host, driver


# -- /proc/self/cgroup and mountinfo ---------------------------------------

_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_=", min_size=1, max_size=12)
# Any character but the line end can be in a cgroup name, colons included.
_cgroup_paths = st.lists(
    st.text(st.characters(blacklist_characters="\n/\x00"), min_size=1, max_size=10), max_size=4
).map(lambda parts: "/" + "/".join(parts))


@given(st.integers(0, 2**31), st.lists(_names, max_size=3), _cgroup_paths)
def test_proc_cgroup_round_trip(hierarchy_id, controllers, path):
    line = f"{hierarchy_id}:{','.join(controllers)}:{path}"
    assert parse_proc_cgroup(line + "\n") == [Membership(hierarchy_id, tuple(controllers), path)]


@given(st.text())
def test_proc_cgroup_rejects_garbage_with_value_error(text):
    try:
        memberships = parse_proc_cgroup(text)
    except ValueError:
        return
    for membership in memberships:
        assert membership.path.startswith("/")


def test_proc_cgroup_examples():
    text = "12:cpu,cpuacct:/system.slice/a:b.service\n1:name=systemd:/\n0::/user.slice\n"
    assert parse_proc_cgroup(text) == [
        Membership(12, ("cpu", "cpuacct"), "/system.slice/a:b.service"),
        Membership(1, ("name=systemd",), "/"),
        Membership(0, (), "/user.slice"),
    ]
    for bad in ("x:cpu:/", "1:cpu", "1:cpu:relative", "1:cpu,,memory:/"):
        with pytest.raises(ValueError):
            parse_proc_cgroup(bad)


_mount_paths = st.text(st.characters(blacklist_characters="\x00"), min_size=1, max_size=20).map(
    lambda t: "/" + t
)
_options = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz=_", min_size=1, max_size=8), min_size=1, max_size=4
)


@given(
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    _mount_paths,
    _mount_paths,
    _options,
    st.lists(st.sampled_from(["shared:1", "master:7", "propagate_from:2", "unbindable"]), max_size=3),
    st.sampled_from(["cgroup", "cgroup2", "ext4", "tmpfs"]),
    _options,
)
def test_mountinfo_round_trip(mount_id, parent_id, root, mount_point, options, tags, fs_type, super_options):
    line = " ".join(
        [
            str(mount_id),
            str(parent_id),
            "0:42",
            escape_mount_field(root),
            escape_mount_field(mount_point),
            ",".join(options),
        ]
        + tags
        + ["-", fs_type, "none", ",".join(super_options)]
    )
    assert parse_mountinfo(line + "\n") == [
        Mount(
            mount_id,
            parent_id,
            "0:42",
            root,
            mount_point,
            tuple(options),
            fs_type,
            "none",
            tuple(super_options),
        )
    ]


@given(st.text())
def test_mountinfo_rejects_garbage_with_value_error(text):
    try:
        parse_mountinfo(text)
    except ValueError:
        pass


def test_this_hosts_files_parse():
    # The real kernel's spelling, whatever this machine mounts.
    memberships = parse_proc_cgroup(read("/proc/self/cgroup"))
    mounts = parse_mountinfo(read("/proc/self/mountinfo"))
    assert memberships and mounts
    assert any(m.mount_point == "/" for m in mounts)


def test_cgroup_directory():
    def mount(root):
        return Mount(
            1, 0, "0:1", root, "/sys/fs/cgroup/memory", ("rw",), "cgroup", "cgroup", ("rw", "memory")
        )

    assert cgroup_directory(mount("/"), "/") == "/sys/fs/cgroup/memory"
    assert cgroup_directory(mount("/"), "/a/b") == "/sys/fs/cgroup/memory/a/b"
    # A container's view: the mount shows /docker/abc and below.
    assert cgroup_directory(mount("/docker/abc"), "/docker/abc") == "/sys/fs/cgroup/memory"
    assert cgroup_directory(mount("/docker/abc"), "/docker/abc/x") == "/sys/fs/cgroup/memory/x"
    assert cgroup_directory(mount("/docker/abc"), "/docker/abcd") is None
    assert cgroup_directory(mount("/docker/abc"), "/other") is None
    assert cgroup_directory(mount("/"), "/a/../b") is None


# -- detection -----------------------------------------------------------


def test_detect_pure_v2(tmp_path):
    driver = FakeCgroupHost.pure_v2(tmp_path).detect()
    assert isinstance(driver, CgroupV2Driver)
    assert driver.name == "v2"
    assert driver.controllers == {"cpu", "memory", "io", "pids", "freezer"}
    assert driver.own == str(tmp_path / "sys/fs/cgroup/system.slice/jobworker.service")


def test_detect_hybrid_takes_v1(tmp_path):
    # The unified mount exists but has no controller: v1 limits, v2 cannot.
    driver = FakeCgroupHost.hybrid(tmp_path).detect()
    assert isinstance(driver, CgroupV1Driver)
    assert driver.name == "v1"
    assert driver.controllers == {"cpu", "memory", "io", "pids", "freezer"}


def test_detect_hybrid_v2_on_request(tmp_path):
    driver = FakeCgroupHost.hybrid(tmp_path).detect(version="v2")
    assert isinstance(driver, CgroupV2Driver)
    assert driver.own == str(tmp_path / "sys/fs/cgroup/unified")
    assert not driver.controllers & {"cpu", "memory", "io", "pids"}


def test_detect_nothing_mounted(tmp_path):
    host = FakeCgroupHost(tmp_path)
    assert host.detect() is None
    assert detect(proc_self_cgroup=str(tmp_path / "missing"), mounts=host.mountinfo) is None


def test_detect_ignores_read_only_and_foreign_mounts(tmp_path):
    host = FakeCgroupHost.pure_v2(tmp_path)
    lines = read(host.mountinfo).replace(" rw,nosuid", " ro,nosuid")
    write(host.mountinfo, lines)
    assert host.detect() is None
    # Mounted, writable, but not below the root we were told to use.
    write(host.mountinfo, lines.replace(" ro,nosuid", " rw,nosuid"))
    assert (
        detect(
            proc_self_cgroup=host.proc_self_cgroup, mounts=host.mountinfo, root=str(tmp_path / "elsewhere")
        )
        is None
    )


def test_detect_malformed_files(tmp_path):
    host = FakeCgroupHost.pure_v2(tmp_path)
    write(host.proc_self_cgroup, "garbage\n")
    with pytest.raises(CgroupError):
        host.detect()


def test_detect_bad_prefix(tmp_path):
    host = FakeCgroupHost.pure_v2(tmp_path)
    for prefix in ("", "..", "a/b", "-x"):
        with pytest.raises(ValueError):
            host.detect(prefix=prefix)


# -- v2 --------------------------------------------------------------------


def test_v2_prepare_moves_service_into_leaf_then_enables(tmp_path):
    host = FakeCgroupHost.pure_v2(tmp_path)
    driver = host.detect()
    driver.prepare()
    own = driver.own
    assert host.members(own) == []
    assert host.members(os.path.join(own, "jobworker", "service")) == [host.service_pid]
    # The move came before any controller was enabled in <own>: the kernel
    # refuses the other order.
    moved = host.writes.index(
        (os.path.join(own, "jobworker", "service", "cgroup.procs"), str(host.service_pid))
    )
    enabling = [i for i, (path, _) in enumerate(host.writes) if path.endswith("cgroup.subtree_control")]
    assert enabling and moved < min(enabling)
    for directory in (own, driver.base):
        assert sorted(read(os.path.join(directory, "cgroup.subtree_control")).split()) == [
            "cpu",
            "io",
            "memory",
            "pids",
        ]
    assert driver.controllers == {"cpu", "memory", "io", "pids", "freezer"}


def test_v2_prepare_enables_only_what_is_offered(tmp_path):
    host = FakeCgroupHost.pure_v2(tmp_path, controllers=("cpu", "memory"))
    driver = host.detect()
    driver.prepare()
    assert read(os.path.join(driver.base, "cgroup.subtree_control")).split() == ["cpu", "memory"]
    assert driver.controllers == {"cpu", "memory", "freezer"}
    assert driver.usage_supported() == {"cpu_usec", "memory_peak_bytes", "oom_killed"}


def test_v2_prepare_refuses_to_share_its_cgroup(tmp_path):
    host = FakeCgroupHost.pure_v2(tmp_path)
    driver = host.detect()
    stranger = host.spawn([os.path.join(driver.own, "cgroup.procs")])
    with pytest.raises(CgroupError) as caught:
        driver.prepare()
    assert str(stranger) in caught.value.message
    assert "Delegate=yes" in caught.value.message


def test_v2_prepare_again_from_the_leaf(tmp_path):
    host = FakeCgroupHost.pure_v2(tmp_path)
    first = host.detect()
    first.prepare()
    # A restarted service already sits in the leaf.
    write(host.proc_self_cgroup, "0::/system.slice/jobworker.service/jobworker/service\n")
    second = host.detect()
    assert second.own == first.own
    second.prepare()
    assert not os.path.exists(os.path.join(second.base, "jobworker"))
    assert host.members(second.service_leaf) == [host.service_pid]


def test_v2_release_restores(tmp_path):
    host, driver = v2_host(tmp_path)
    driver.release()
    assert host.members(driver.own) == [host.service_pid]
    assert not os.path.exists(driver.base)
    assert read(os.path.join(driver.own, "cgroup.subtree_control")) == ""


def test_v2_limits(tmp_path):
    host, driver = v2_host(tmp_path, devices=[("vda", 254, 0), ("nvme0n1", 259, 0), ("loop0", 7, 0)])
    job = driver.create("42", ALL_LIMITS)
    path = os.path.join(driver.base, "job-42")
    assert job.procs_files == (os.path.join(path, "cgroup.procs"),)
    assert read(os.path.join(path, "cpu.max")) == "20000 100000\n"
    assert read(os.path.join(path, "memory.max")) == f"{64 << 20}\n"
    assert read(os.path.join(path, "memory.swap.max")) == "0\n"
    assert read(os.path.join(path, "pids.max")) == "20\n"
    assert sorted(read(os.path.join(path, "io.max")).splitlines()) == [
        f"254:0 rbps={1 << 20} wbps={5 << 20}",
        f"259:0 rbps={1 << 20} wbps={5 << 20}",
    ]


def test_v2_one_io_direction(tmp_path):
    host, driver = v2_host(tmp_path)
    driver.create("1", Limits(io_write_bps=5 << 20))
    assert read(os.path.join(driver.base, "job-1", "io.max")) == f"254:0 wbps={5 << 20}\n"


def test_v2_tiny_cpu_limit(tmp_path):
    host, driver = v2_host(tmp_path)
    driver.create("1", Limits(cpu_millicores=5))
    assert read(os.path.join(driver.base, "job-1", "cpu.max")) == "5000 1000000\n"


@given(st.integers(1, 1024 * 1000))
def test_cpu_bandwidth(millicores):
    quota, period = cpu_bandwidth(millicores)
    assert quota * 1000 == millicores * period
    assert quota >= 1000 and 1000 <= period <= 1_000_000
    if millicores >= 10:
        assert period == 100_000


def test_v2_unset_limits_write_nothing(tmp_path):
    host, driver = v2_host(tmp_path)
    driver.create("1", Limits(timeout_ms=5000))
    assert host.writes == []
    path = os.path.join(driver.base, "job-1")
    assert read(os.path.join(path, "memory.max")) == "max\n"
    assert read(os.path.join(path, "cpu.max")) == "max 100000\n"


def test_v2_unsupported_controller(tmp_path):
    host, driver = v2_host(tmp_path, controllers=("cpu", "memory", "pids"))
    with pytest.raises(RequestError) as caught:
        driver.create("1", Limits(memory_bytes=1 << 20, io_write_bps=1 << 20))
    assert caught.value.code == ErrorCode.UNSUPPORTED_LIMIT
    assert "io_write_bps" in caught.value.message
    assert "memory" not in caught.value.message.split("(")[0]
    assert not os.path.exists(os.path.join(driver.base, "job-1"))


@pytest.mark.parametrize("code", [errno.ENOENT, errno.ENODEV], ids=["ENOENT", "ENODEV"])
def test_v2_missing_control_file_is_unsupported(tmp_path, code):
    host, driver = v2_host(tmp_path)
    host.failures["memory.max"] = code
    with pytest.raises(RequestError) as caught:
        driver.create("1", Limits(pids=5, memory_bytes=1 << 20))
    assert caught.value.code == ErrorCode.UNSUPPORTED_LIMIT
    assert "memory_bytes" in caught.value.message
    assert not os.path.exists(os.path.join(driver.base, "job-1"))


def test_v2_no_swap_accounting_is_fine(tmp_path):
    host, driver = v2_host(tmp_path)
    host.failures["memory.swap.max"] = errno.ENOENT
    driver.create("1", Limits(memory_bytes=1 << 20))
    assert read(os.path.join(driver.base, "job-1", "memory.max")) == f"{1 << 20}\n"


def test_v2_refused_value_removes_the_job(tmp_path):
    host, driver = v2_host(tmp_path)
    host.failures["cpu.max"] = errno.EINVAL
    with pytest.raises(CgroupError):
        driver.create("1", ALL_LIMITS)
    assert not os.path.exists(os.path.join(driver.base, "job-1"))


def test_v2_io_limit_without_disks(tmp_path):
    host, driver = v2_host(tmp_path, devices=())
    with pytest.raises(RequestError) as caught:
        driver.create("1", Limits(io_read_bps=1 << 20))
    assert caught.value.code == ErrorCode.UNSUPPORTED_LIMIT


def test_job_ids_stay_in_their_directory(tmp_path):
    host, driver = v2_host(tmp_path)
    for job_id in ("../x", "a/b", ".", "..", "", "-x", "x" * 129):
        with pytest.raises(ValueError):
            driver.create(job_id, Limits())
    assert subdirectories(driver.base) == ["service"]


def test_v2_pids_are_recursive(tmp_path):
    host, driver = v2_host(tmp_path)
    job = driver.create("1", Limits())
    nested = os.path.join(driver.base, "job-1", "inner")
    host.mkdir(nested)
    a = host.spawn(job.procs_files)
    b = host.spawn([os.path.join(nested, "cgroup.procs")])
    assert job.pids() == sorted([a, b])


def test_v2_kill_writes_cgroup_kill(tmp_path):
    host, driver = v2_host(tmp_path)
    job = driver.create("1", Limits())
    nested = os.path.join(driver.base, "job-1", "inner")
    host.mkdir(nested)
    pids = [host.spawn(job.procs_files), host.spawn([os.path.join(nested, "cgroup.procs")])]
    job.kill()
    assert (os.path.join(driver.base, "job-1", "cgroup.kill"), "1") in host.writes
    assert sorted(host.signals) == [(pid, signal.SIGKILL) for pid in sorted(pids)]
    assert job.pids() == []


def test_v2_kill_freezes_without_cgroup_kill(tmp_path):
    host, driver = v2_host(tmp_path, cgroup_kill=False)
    job = driver.create("1", Limits())
    pid = host.spawn(job.procs_files)
    job.kill()
    freeze = os.path.join(driver.base, "job-1", "cgroup.freeze")
    assert [w for w in host.writes if w[0] == freeze] == [(freeze, "1"), (freeze, "0")]
    assert host.signals == [(pid, signal.SIGKILL)]


def test_v2_remove(tmp_path):
    host, driver = v2_host(tmp_path)
    job = driver.create("1", Limits())
    host.mkdir(os.path.join(driver.base, "job-1", "inner"))
    pid = host.spawn(job.procs_files)
    job.remove()
    assert pid not in host.alive
    assert not os.path.exists(os.path.join(driver.base, "job-1"))
    job.remove()
    assert job.pids() == []


def test_remove_gives_up_in_bounded_time(tmp_path):
    host, driver = v2_host(tmp_path)
    job = driver.create("1", Limits())
    stuck = host.spawn(job.procs_files)
    host.unkillable.add(stuck)
    with pytest.raises(CgroupError) as caught:
        job.remove()
    assert str(stuck) in caught.value.message
    assert REMOVE_TIMEOUT <= host.now <= REMOVE_TIMEOUT + 5
    assert os.path.isdir(os.path.join(driver.base, "job-1"))


def test_v2_cleanup_stale(tmp_path):
    host, crashed = v2_host(tmp_path)
    pids = [host.spawn(crashed.create(job_id, Limits()).procs_files) for job_id in ("a", "b")]
    host.mkdir(os.path.join(crashed.base, "not-a-job"))
    restarted = host.detect()
    restarted.prepare()
    assert restarted.cleanup_stale() == ["job-a", "job-b"]
    assert not any(pid in host.alive for pid in pids)
    assert subdirectories(restarted.base) == ["not-a-job", "service"]
    assert restarted.cleanup_stale() == []


def test_v2_usage(tmp_path):
    host, driver = v2_host(tmp_path)
    job = driver.create("1", Limits())
    path = os.path.join(driver.base, "job-1")
    write(os.path.join(path, "cpu.stat"), "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n")
    write(os.path.join(path, "memory.peak"), "5000000\n")
    write(
        os.path.join(path, "io.stat"),
        "254:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n259:0 rbytes=1 wbytes=2\n",
    )
    write(os.path.join(path, "pids.peak"), "7\n")
    write(os.path.join(path, "memory.events"), "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    expected = Usage(
        cpu_usec=1234,
        memory_peak_bytes=5000000,
        io_read_bytes=11,
        io_write_bytes=22,
        pids_peak=7,
        oom_killed=True,
    )
    assert job.usage() == expected
    shutil.rmtree(path)
    assert job.usage() == expected


def test_v2_usage_samples_without_peak_files(tmp_path):
    host, driver = v2_host(tmp_path)
    job = driver.create("1", Limits())
    path = os.path.join(driver.base, "job-1")
    os.unlink(os.path.join(path, "memory.peak"))
    os.unlink(os.path.join(path, "pids.peak"))
    write(os.path.join(path, "memory.current"), "100\n")
    write(os.path.join(path, "pids.current"), "4\n")
    job.usage()
    write(os.path.join(path, "memory.current"), "50\n")
    write(os.path.join(path, "pids.current"), "1\n")
    assert (job.usage().memory_peak_bytes, job.usage().pids_peak) == (100, 4)


# -- v1 --------------------------------------------------------------------


def test_v1_paths_follow_proc_and_mountinfo(tmp_path):
    host, driver = v1_host(tmp_path)
    root = str(tmp_path / "sys/fs/cgroup")
    job = driver.create("7", Limits())
    # One directory per hierarchy, cpu and cpuacct sharing theirs; memory
    # below the service's own, non-root, memory cgroup.
    assert sorted(job.procs_files) == sorted(
        [
            f"{root}/cpu,cpuacct/jobworker/job-7/cgroup.procs",
            f"{root}/memory/process_api/4d86/jobworker/job-7/cgroup.procs",
            f"{root}/blkio/jobworker/job-7/cgroup.procs",
            f"{root}/pids/jobworker/job-7/cgroup.procs",
            f"{root}/freezer/jobworker/job-7/cgroup.procs",
        ]
    )
    assert job.directories["cpu"] == job.directories["cpuacct"]
    assert not os.path.exists(f"{root}/systemd/jobworker")


def test_v1_mount_root_inside_a_container(tmp_path):
    host = FakeCgroupHost(tmp_path)
    host.mount_v1("memory", ("memory",), own="/docker/abc/svc", mount_root="/docker/abc")
    driver = host.detect()
    assert driver.bases == {str(tmp_path / "sys/fs/cgroup/memory/svc/jobworker"): frozenset({"memory"})}


def test_v1_limits(tmp_path):
    host, driver = v1_host(tmp_path, devices=[("vda", 254, 0), ("sda", 8, 0)])
    job = driver.create("1", ALL_LIMITS)
    cpu = job.directories["cpu"]
    assert read(os.path.join(cpu, "cpu.cfs_period_us")) == "100000\n"
    assert read(os.path.join(cpu, "cpu.cfs_quota_us")) == "20000\n"
    memory = job.directories["memory"]
    assert read(os.path.join(memory, "memory.limit_in_bytes")) == f"{64 << 20}\n"
    assert read(os.path.join(memory, "memory.memsw.limit_in_bytes")) == f"{64 << 20}\n"
    blkio = job.directories["blkio"]
    assert sorted(read(os.path.join(blkio, "blkio.throttle.read_bps_device")).splitlines()) == [
        f"254:0 {1 << 20}",
        f"8:0 {1 << 20}",
    ]
    assert sorted(read(os.path.join(blkio, "blkio.throttle.write_bps_device")).splitlines()) == [
        f"254:0 {5 << 20}",
        f"8:0 {5 << 20}",
    ]
    assert read(os.path.join(job.directories["pids"], "pids.max")) == "20\n"
    # memsw may never be below the memory limit: memory first.
    order = [os.path.basename(path) for path, _ in host.writes]
    assert order.index("memory.limit_in_bytes") < order.index("memory.memsw.limit_in_bytes")


def test_v1_without_swap_accounting(tmp_path):
    host, driver = v1_host(tmp_path)
    host.failures["memory.memsw.limit_in_bytes"] = errno.ENOENT
    job = driver.create("1", Limits(memory_bytes=1 << 20))
    assert read(os.path.join(job.directories["memory"], "memory.limit_in_bytes")) == f"{1 << 20}\n"


def test_v1_unsupported_controller(tmp_path):
    host, driver = v1_host(tmp_path, v1={"cpu,cpuacct": "/", "memory": "/"})
    assert driver.controllers == {"cpu", "memory"}
    with pytest.raises(RequestError) as caught:
        driver.create("1", Limits(pids=10))
    assert caught.value.code == ErrorCode.UNSUPPORTED_LIMIT
    assert "pids" in caught.value.message


def test_v1_failure_removes_every_hierarchy(tmp_path):
    host, driver = v1_host(tmp_path)
    host.failures["pids.max"] = errno.EINVAL
    with pytest.raises(CgroupError):
        driver.create("1", ALL_LIMITS)
    for base in driver.bases:
        assert subdirectories(base) == []


def test_v1_kill_freezes_then_thaws(tmp_path):
    host, driver = v1_host(tmp_path)
    job = driver.create("1", Limits())
    pid = host.spawn(job.procs_files)
    job.kill()
    state = os.path.join(job.directories["freezer"], "freezer.state")
    assert [text for path, text in host.writes if path == state] == ["FROZEN", "THAWED"]
    assert host.signals == [(pid, signal.SIGKILL)]
    assert job.pids() == []


def test_v1_kill_without_freezer(tmp_path):
    host, driver = v1_host(tmp_path, v1={"cpu,cpuacct": "/", "pids": "/"})
    job = driver.create("1", Limits())
    pid = host.spawn(job.procs_files)
    job.kill()
    assert host.signals == [(pid, signal.SIGKILL)]


def test_v1_remove_and_cleanup_stale(tmp_path):
    host, crashed = v1_host(tmp_path)
    job = crashed.create("a", Limits())
    pid = host.spawn(job.procs_files)
    crashed.create("b", Limits()).remove()
    restarted = host.detect()
    restarted.prepare()
    assert restarted.cleanup_stale() == ["job-a"]
    assert pid not in host.alive
    for base in restarted.bases:
        assert subdirectories(base) == []


def test_v1_usage(tmp_path):
    host, driver = v1_host(tmp_path)
    job = driver.create("1", Limits())
    write(os.path.join(job.directories["cpuacct"], "cpuacct.usage"), "1500000\n")
    write(os.path.join(job.directories["memory"], "memory.max_usage_in_bytes"), "4096\n")
    write(
        os.path.join(job.directories["memory"], "memory.oom_control"),
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    )
    write(
        os.path.join(job.directories["blkio"], "blkio.throttle.io_service_bytes_recursive"),
        "254:0 Read 10\n254:0 Write 20\n254:0 Sync 30\n254:0 Async 0\n254:0 Total 30\n8:0 Read 1\n8:0 Write 2\nTotal 33\n",
    )
    os.unlink(os.path.join(job.directories["pids"], "pids.peak"))
    write(os.path.join(job.directories["pids"], "pids.current"), "3\n")
    assert job.usage() == Usage(
        cpu_usec=1500,
        memory_peak_bytes=4096,
        io_read_bytes=11,
        io_write_bytes=22,
        pids_peak=3,
        oom_killed=True,
    )
    write(os.path.join(job.directories["pids"], "pids.current"), "1\n")
    assert job.usage().pids_peak == 3
    job.remove()
    assert job.usage().cpu_usec == 1500


def test_v1_oom_before_kernel_4_13(tmp_path):
    host, driver = v1_host(tmp_path)
    job = driver.create("1", Limits())
    write(os.path.join(job.directories["memory"], "memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\n")
    assert not job.usage().oom_killed
    write(os.path.join(job.directories["memory"], "memory.failcnt"), "5\n")
    assert job.usage().oom_killed


def test_v1_usage_supported(tmp_path):
    host, driver = v1_host(tmp_path, v1={"cpu": "/", "memory": "/"})
    assert driver.usage_supported() == {"memory_peak_bytes", "oom_killed"}


# -- block devices ---------------------------------------------------------


def test_throttled_block_devices(tmp_path):
    host = FakeCgroupHost(tmp_path)
    for name, major, minor in [
        ("vda", 254, 0),
        ("sda", 8, 0),
        ("nvme0n1", 259, 0),
        ("dm-0", 252, 0),
        ("md0", 9, 0),
    ]:
        host.add_block_device(name, major, minor)
    host.add_block_device("loop0", 7, 0)
    host.add_block_device("ram0", 1, 0)
    host.add_block_device("zram0", 253, 0)
    host.add_block_device("sr0", 11, 0, size=0)
    host.add_block_device("nvme0c0n1", 259, 1, hidden=True)
    names = [device.name for device in throttled_block_devices(host.sys_block)]
    assert names == ["dm-0", "md0", "nvme0n1", "sda", "vda"]
    assert throttled_block_devices(str(tmp_path / "missing")) == ()


def test_a_poll_sees_a_quick_death_within_milliseconds_not_a_whole_interval() -> None:
    # A SIGKILLed job is gone within a millisecond, but each poll slept
    # 20 ms first: a forced stop of hundreds of jobs held a pool thread for
    # ~40 ms each (issue 17 item 4).  Polling backs off from 1 ms instead.
    from jobworker.host.cgroups._host import POLL_INTERVAL, HostCalls, poll

    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    calls = HostCalls(sleep=sleep, monotonic=lambda: now[0])
    assert poll(calls, lambda: now[0] >= 0.003, 1.0)
    assert sum(slept) < 0.01
    slept.clear()
    assert not poll(calls, lambda: False, 0.5)  # a long wait still ends at its timeout...
    assert max(slept) == POLL_INTERVAL and len(slept) < 0.5 / POLL_INTERVAL + 8  # ...without spinning


@pytest.mark.parametrize("make", [v1_host, v2_host], ids=["v1", "v2"])
def test_prime_moves_moves_the_service_where_it_is(tmp_path, make):
    """
    prime_moves is a move of the service into the cgroup it is in: one
    cgroup.procs write of its pid, and every membership as it was.
    """
    host, driver = make(tmp_path)
    job = driver.create("1", Limits())
    worker = host.spawn(job.procs_files)
    own = list(driver.own) if isinstance(driver, CgroupV1Driver) else [driver.service_leaf]
    before = {directory: host.members(directory) for directory in own}
    assert all(host.service_pid in members for members in before.values())
    host.writes.clear()
    driver.prime_moves()
    assert [(os.path.basename(path), text) for path, text in host.writes] == [("cgroup.procs", str(host.service_pid))]
    assert {directory: host.members(directory) for directory in own} == before
    assert job.pids() == [worker]
