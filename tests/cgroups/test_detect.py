"""Detection on fake /proc and /sys trees (no cgroups needed), and block-device resolution."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from trio_jobs.worker.cgroups._layout import (
    Mount,
    parse_mountinfo,
    parse_proc_cgroup,
    resolve_parent,
)
from trio_jobs.worker.cgroups.base import CgroupError
from trio_jobs.worker.cgroups.detect import _detect
from trio_jobs.worker.cgroups.devices import BlockDevice, disk_of, whole_disks
from trio_jobs.worker.cgroups.v1 import V1Driver, cfs_quota_us
from trio_jobs.worker.cgroups.v2 import V2Driver

PID = 4242
V1_NAMES = ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids")


def _mountinfo_v1(ro: str = "rw", skip: tuple[str, ...] = ()) -> str:
    lines = ["31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755"]
    for i, name in enumerate(V1_NAMES):
        if name in skip:
            continue
        lines.append(
            f"{32 + i} 31 0:{29 + i} / /sys/fs/cgroup/{name} {ro},relatime - cgroup cgroup {ro},{name}"
        )
    lines.append("41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw")
    return "\n".join(lines) + "\n"


def _tree(root: Path, mountinfo: str, proc_cgroup: str) -> Path:
    (root / "proc" / "self").mkdir(parents=True)
    (root / "proc" / "self" / "mountinfo").write_text(mountinfo)
    (root / "proc" / "self" / "cgroup").write_text(proc_cgroup)
    return root


def _hybrid(tmp_path: Path, **kw: object) -> Path:
    cg = "\n".join(
        f"{i}:{n}:{'/process_api/abc' if n == 'memory' else '/'}" for i, n in enumerate(V1_NAMES)
    )
    root = _tree(tmp_path, _mountinfo_v1(**kw), cg + "\n0::/\n")  # type: ignore[arg-type]
    for n in V1_NAMES:
        (root / "sys/fs/cgroup" / n).mkdir(parents=True)
    (root / "sys/fs/cgroup/memory/process_api/abc").mkdir(parents=True)
    (root / "sys/fs/cgroup/unified").mkdir()
    (root / "sys/fs/cgroup/unified/cgroup.controllers").write_text("hugetlb\n")
    return root


def _pure_v2(
    tmp_path: Path, own: str = "/", controllers: str = "cpuset cpu io memory pids", procs: str = ""
) -> Path:
    mi = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
    root = _tree(tmp_path, mi, f"0::{own}\n")
    own_dir = root / "sys/fs/cgroup" / own.lstrip("/")
    own_dir.mkdir(parents=True)
    (own_dir / "cgroup.controllers").write_text(controllers + "\n")
    (own_dir / "cgroup.subtree_control").write_text("")
    (own_dir / "cgroup.procs").write_text(procs)
    return root


def test_hybrid_host_gets_the_v1_driver_with_per_hierarchy_paths(tmp_path: Path) -> None:
    root = _hybrid(tmp_path)
    d = _detect(parent=None, require=True, root=root, pid=PID)
    assert isinstance(d, V1Driver)
    assert d.name == "v1"
    assert d.parent_dir("memory") == root / "sys/fs/cgroup/memory/process_api/abc/trio-jobs"
    assert d.parent_dir("cpu") == root / "sys/fs/cgroup/cpu/trio-jobs"
    assert "v1" in d.describe()
    assert "hybrid" in d.describe()


def test_absolute_and_relative_cgroup_parent(tmp_path: Path) -> None:
    root = _hybrid(tmp_path)
    d = _detect(parent="/ci/jobs", require=True, root=root, pid=PID)
    assert isinstance(d, V1Driver)
    assert d.parent_dir("memory") == root / "sys/fs/cgroup/memory/ci/jobs"
    d = _detect(parent="x/y", require=True, root=root, pid=PID)
    assert isinstance(d, V1Driver)
    assert d.parent_dir("memory") == root / "sys/fs/cgroup/memory/process_api/abc/x/y"
    for bad in ["../escape", "a/../../b", "", "."]:
        with pytest.raises(CgroupError, match="invalid cgroup parent"):
            _detect(parent=bad, require=True, root=root, pid=PID)


def test_read_only_v1_mounts_are_refused_with_the_reason(tmp_path: Path) -> None:
    root = _hybrid(tmp_path, ro="ro")
    with pytest.raises(CgroupError, match=r"read-only.*refusing to run jobs without"):
        _detect(parent=None, require=True, root=root, pid=PID)


def test_missing_v1_controller_is_refused(tmp_path: Path) -> None:
    root = _hybrid(tmp_path, skip=("freezer",))
    with pytest.raises(CgroupError, match="v1 controller freezer is not mounted"):
        _detect(parent=None, require=True, root=root, pid=PID)


def test_controllerless_cgroup2_is_not_used(tmp_path: Path) -> None:
    root = _hybrid(tmp_path, skip=("pids",))
    with pytest.raises(
        CgroupError,
        match=r"v2: cgroup2 at /sys/fs/cgroup/unified lacks controllers cpu io memory pids",
    ):
        _detect(parent=None, require=True, root=root, pid=PID)


def test_pure_v2_at_the_root(tmp_path: Path) -> None:
    root = _pure_v2(tmp_path)
    d = _detect(parent=None, require=True, root=root, pid=PID)
    assert isinstance(d, V2Driver)
    assert d.name == "v2"
    assert d.parent_dir == root / "sys/fs/cgroup/trio-jobs"
    assert "cpu io memory pids" in d.describe()


def test_pure_v2_delegated_subtree(tmp_path: Path) -> None:
    own = "/user.slice/user-1000.slice/app.scope"
    root = _pure_v2(tmp_path, own=own, procs=f"{PID}\n")
    d = _detect(parent=None, require=True, root=root, pid=PID)
    assert isinstance(d, V2Driver)
    assert d.parent_dir == root / "sys/fs/cgroup" / own.lstrip("/") / "trio-jobs"


def test_pure_v2_after_moving_into_the_supervisor_leaf(tmp_path: Path) -> None:
    own = "/app.scope"
    root = _pure_v2(tmp_path, own=own)
    (root / "sys/fs/cgroup/app.scope/supervisor").mkdir()
    (root / "proc/self/cgroup").write_text("0::/app.scope/supervisor\n")
    d = _detect(parent=None, require=True, root=root, pid=PID)
    assert isinstance(d, V2Driver)
    assert d.parent_dir == root / "sys/fs/cgroup/app.scope/trio-jobs"


def test_pure_v2_shared_cgroup_violates_the_no_internal_process_rule(tmp_path: Path) -> None:
    root = _pure_v2(tmp_path, own="/session.scope", procs=f"1\n{PID}\n77\n")
    with pytest.raises(CgroupError, match=r"holds other processes \(1 77\)"):
        _detect(parent=None, require=True, root=root, pid=PID)


def test_pure_v2_missing_controllers(tmp_path: Path) -> None:
    root = _pure_v2(tmp_path, controllers="cpu memory pids")
    with pytest.raises(CgroupError, match="lacks controllers io"):
        _detect(parent=None, require=True, root=root, pid=PID)


def test_no_proc_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match="cannot read /proc/self/mountinfo"):
        _detect(parent=None, require=True, root=tmp_path, pid=PID)


def test_without_cgroups_the_none_driver_is_used_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _hybrid(tmp_path, ro="ro")
    with caplog.at_level(logging.WARNING):
        d = _detect(parent=None, require=False, root=root, pid=PID)
    assert d.name == "none"
    assert "read-only" in d.describe()
    assert "WITHOUT" in caplog.text


def test_parsers() -> None:
    mounts = parse_mountinfo(
        "41 31 0:38 /docker/abc /sys/fs/cgroup/my\\040dir ro,relatime - cgroup cgroup rw,cpu,cpuacct\n"
        "42 31 0:39 / /x rw - ext4 /dev/vda rw\n"
    )
    assert mounts == [
        Mount(
            mount_point=Path("/sys/fs/cgroup/my dir"),
            root="/docker/abc",
            fstype="cgroup",
            controllers=frozenset({"cpu", "cpuacct"}),
            read_only=True,
        )
    ]
    m = mounts[0]
    assert m.dir_of("/docker/abc") == Path("/sys/fs/cgroup/my dir")
    assert m.dir_of("/docker/abc/jobs") == Path("/sys/fs/cgroup/my dir/jobs")
    assert m.dir_of("/docker/abcdef") is None
    assert m.dir_of("/other") is None
    assert parse_proc_cgroup("2:cpu,cpuacct:/a\n9:name=systemd:/s\n0::/u\n") == {
        "cpu": "/a",
        "cpuacct": "/a",
        "": "/u",
    }
    assert resolve_parent("/own", "jobs") == "/own/jobs"
    assert resolve_parent("/", "jobs") == "/jobs"
    assert resolve_parent("/own", "/abs//x/") == "/abs/x"
    assert cfs_quota_us(500) == 50_000
    assert cfs_quota_us(1) == 1_000  # the kernel's minimum


def _block(sys_root: Path, name: str, dev: str, parent: str | None = None) -> Path:
    base = sys_root / "devices/virtual/block"
    entry = base / parent / name if parent else base / name
    entry.mkdir(parents=True)
    (entry / "dev").write_text(dev + "\n")
    if parent:
        (entry / "partition").write_text("1\n")
    (sys_root / "class/block").mkdir(parents=True, exist_ok=True)
    (sys_root / "class/block" / name).symlink_to(entry)
    (sys_root / "dev/block").mkdir(parents=True, exist_ok=True)
    (sys_root / "dev/block" / dev).symlink_to(entry)
    return entry


def test_whole_disks_skip_partitions_loop_ram_zram(tmp_path: Path) -> None:
    _block(tmp_path, "sda", "8:0")
    _block(tmp_path, "sda1", "8:1", parent="sda")
    _block(tmp_path, "nvme0n1", "259:0")
    _block(tmp_path, "loop0", "7:0")
    _block(tmp_path, "zram0", "253:0")
    _block(tmp_path, "ram0", "1:0")
    _block(tmp_path, "dm-0", "252:0")
    assert [d.name for d in whole_disks(tmp_path)] == ["sda", "dm-0", "nvme0n1"]
    assert disk_of(os.makedev(8, 1), tmp_path) == BlockDevice(major=8, minor=0, name="sda")
    assert disk_of(os.makedev(8, 0), tmp_path) == BlockDevice(major=8, minor=0, name="sda")
    assert disk_of(os.makedev(0, 42), tmp_path) is None  # tmpfs and friends
    assert whole_disks(tmp_path / "nothing") == []
