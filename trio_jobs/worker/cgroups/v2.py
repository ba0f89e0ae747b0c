"""cgroup v2 driver (the unified hierarchy).

Theory of operation. Job cgroups live in a delegated subtree: by default
``<own>/trio-jobs/<job>`` where ``<own>`` is this process's cgroup, or under the
``--cgroup-parent``; a job of a group is in ``<parent>/<group>/<job>``. Both names are
opaque (see _groups.py) and every directory we create is 0700. A cgroup may only enable
controllers for its children while it has no processes of its own (the no-internal-process
rule; the root is exempt), so when the parent
is under ``<own>`` the server first moves itself into the leaf ``<own>/supervisor`` and then
enables ``+cpu +memory +io +pids`` in ``<own>/cgroup.subtree_control`` and in every
directory it creates down to the parent. Controllers above a cgroup we did not create must
already be enabled by whoever owns it (systemd ``Delegate=yes``, a container runtime).

Limits: ``cpu.max``, ``memory.max`` + ``memory.swap.max 0``, ``io.max`` on every whole block
device (see devices.py; a device that rejects it is logged), ``pids.max``. Kill:
``cgroup.kill`` (5.14+), else freeze with ``cgroup.freeze``, SIGKILL each member, thaw. End of
job: ``cgroup.events`` ``populated 0``, waited on with inotify (the kernel signals a modify
event on every change of that file). Usage: ``cpu.stat`` usage_usec, ``memory.peak`` (5.19+;
older kernels get the highest ``memory.current`` seen by our own samples), ``io.stat``
rbytes/wbytes. OOM: ``memory.events`` ``oom_kill`` > 0 (it counts kills, there can be many).

Groups: a group cgroup holds only job cgroups, never a process (the no-internal-process
rule), so the controllers are enabled in its ``cgroup.subtree_control`` when it is created,
and it carries the group's ``cpu.max``, ``memory.max`` (+ ``memory.swap.max 0``) and
``pids.max``, which the kernel applies to all its jobs together.

A driver can be built with fewer controllers than the four (e.g. on a hybrid host's
controller-less cgroup2 mount): it then refuses limits it cannot apply, with a clear error,
but placement, kill, the end-of-job event and removal work the same.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Final, final

import trio

from ..limits import Limits, Usage
from . import _cgfs
from ._groups import (
    Group,
    GroupTable,
    Membership,
    OpaqueNames,
    check_group,
    group_limits_of,
)
from ._layout import check_job_id
from .base import CgroupError
from .devices import whole_disks
from .v1 import CFS_PERIOD_US, REMOVE_WAIT_SECONDS, cfs_quota_us, check_limits

log = logging.getLogger(__name__)

V2_CONTROLLERS: Final = frozenset({"cpu", "memory", "io", "pids"})
SUPERVISOR_LEAF: Final = "supervisor"
FREEZE_WAIT_SECONDS: Final = 1.0


@final
class V2JobCgroup(_cgfs.UsageFiles):
    """One job's cgroup2 directory. Methods are safe after the job ended."""

    def __init__(self, *, job_id: str, directory: Path, cgroup_path: str,
                 membership: Membership | None = None) -> None:
        self.job_id = job_id  # for messages only: the directory does not carry it
        self._dir = directory
        self._is_member = _cgfs.make_membership_check("", cgroup_path)
        self._peak_sample = 0
        self._membership = membership or Membership()

    @property
    def path(self) -> str:
        return str(self._dir)

    def add_process_blocking(self, pid: int) -> None:
        _cgfs.write_text(self._dir / "cgroup.procs", str(pid))

    async def add_process(self, pid: int) -> None:
        await trio.lowlevel.checkpoint()
        self.add_process_blocking(pid)

    async def signal_all(self, sig: int) -> None:
        _cgfs.signal_members(self._dir / "cgroup.procs", self._is_member, sig)

    def _events(self, name: str) -> dict[str, int]:
        return _cgfs.parse_flat_keyed(_cgfs.read_text(self._dir / name))

    async def kill_all(self) -> None:
        if not self._dir.exists():
            return
        kill_file = self._dir / "cgroup.kill"
        if kill_file.exists():
            _cgfs.write_text(kill_file, "1")
            return
        # Kernels before 5.14: freeze (no task runs or forks once "frozen 1"), kill, thaw.
        freeze = self._dir / "cgroup.freeze"
        _cgfs.write_text(freeze, "1")
        try:
            with trio.move_on_after(FREEZE_WAIT_SECONDS):
                await self._wait_event("cgroup.events", "frozen", 1)
            _cgfs.signal_members(self._dir / "cgroup.procs", self._is_member, signal.SIGKILL)
        finally:
            if self._dir.exists():
                _cgfs.write_text(freeze, "0")

    async def _wait_event(self, name: str, key: str, value: int) -> None:
        """Wait until ``key`` in the events file ``name`` reads ``value`` (or it is gone)."""
        try:
            watch = _cgfs.Inotify(self._dir / name)
        except FileNotFoundError:
            return
        try:
            while True:
                try:
                    current = self._events(name).get(key)
                except CgroupError:
                    if not self._dir.exists():
                        return
                    raise
                if current == value:
                    return
                await watch.wait()
        finally:
            watch.close()

    async def wait_empty(self) -> None:
        await self._wait_event("cgroup.events", "populated", 0)

    def _usage_blocking(self) -> Usage:
        if not self._dir.exists():
            return Usage()
        cpu = self._events("cpu.stat").get("usage_usec", 0)
        peak = 0
        peak_file = self._dir / "memory.peak"
        current_file = self._dir / "memory.current"
        if peak_file.exists():
            peak = _cgfs.read_int(peak_file)
        elif current_file.exists():
            self._peak_sample = max(self._peak_sample, _cgfs.read_int(current_file))
            peak = self._peak_sample
        read_b = write_b = 0
        io_stat = self._dir / "io.stat"
        if io_stat.exists():
            for line in _cgfs.read_text(io_stat).splitlines():
                for field in line.split()[1:]:
                    key, _, val = field.partition("=")
                    if key == "rbytes" and val.isdigit():
                        read_b += int(val)
                    elif key == "wbytes" and val.isdigit():
                        write_b += int(val)
        return Usage(
            cpu_usec=cpu, memory_peak_bytes=peak, io_read_bytes=read_b, io_write_bytes=write_b
        )

    def _oom_killed_blocking(self) -> bool:
        events = self._dir / "memory.events"
        if not events.exists():
            return False
        return self._events("memory.events").get("oom_kill", 0) > 0

    def try_remove_blocking(self) -> bool:
        if self._dir.exists():
            if self._events("cgroup.events").get("populated", 0):
                return False
            if not _cgfs.try_rmdir(self._dir):
                return False
        return self._membership.release_blocking()  # counts the job out of its group

    async def remove(self) -> None:
        if self._dir.exists():
            if self._events("cgroup.events").get("populated", 0):
                await self.kill_all()
                with trio.move_on_after(REMOVE_WAIT_SECONDS):
                    await self.wait_empty()
            await _cgfs.rmdir_retry(self._dir)
        await self._membership.release()


@final
class V2Driver:
    """Job cgroups in the unified hierarchy under one parent directory."""

    name: Final = "v2"

    def __init__(
        self,
        *,
        mount_dir: Path,
        own_dir: Path,
        parent_dir: Path,
        parent_cgroup: str,
        controllers: frozenset[str] = V2_CONTROLLERS,
        is_root: bool = False,
        reason: str = "",
        sys_root: Path = Path("/sys"),
    ) -> None:
        """``own_dir`` is this process's cgroup; ``is_root`` when it is the hierarchy root."""
        self._mount = mount_dir
        self._own = own_dir
        self._parent = parent_dir
        self._parent_cg = parent_cgroup
        self._controllers = controllers & V2_CONTROLLERS
        self._is_root = is_root
        self._reason = reason
        self._sys_root = sys_root
        self._created: list[Path] = []
        self._names = OpaqueNames()
        self._groups = GroupTable()

    def describe(self) -> str:
        ctl = " ".join(sorted(self._controllers)) or "no controllers"
        why = f" ({self._reason})" if self._reason else ""
        return f"cgroup v2 driver: job cgroups under {self._parent} [{ctl}]{why}"

    @property
    def parent_dir(self) -> Path:
        return self._parent

    def _enable(self, directory: Path) -> None:
        enabled = set(_cgfs.read_text(directory / "cgroup.subtree_control").split())
        for c in sorted(self._controllers - enabled):
            _cgfs.write_text(directory / "cgroup.subtree_control", f"+{c}")

    def _move_self_to_leaf(self) -> None:
        """Honour the no-internal-process rule: leave ``<own>`` for ``<own>/supervisor``."""
        leaf = self._own / SUPERVISOR_LEAF
        if _cgfs.make_dir(leaf, exist_ok=True):
            log.info("moved the server into %s to delegate controllers", leaf)
        _cgfs.write_text(leaf / "cgroup.procs", str(os.getpid()))
        others = _cgfs.read_pids(self._own / "cgroup.procs")
        if others:
            raise CgroupError(
                f"{self._own} still holds processes {others[:5]} besides this server, so it "
                "cannot enable controllers for job cgroups; run the server in its own cgroup "
                "(e.g. systemd-run --scope -p Delegate=yes) or pass --cgroup-parent"
            )

    async def prepare(self) -> None:
        own_is_ancestor = self._parent.is_relative_to(self._own) and self._parent != self._own
        if own_is_ancestor and self._controllers:
            if not self._is_root:
                self._move_self_to_leaf()
            self._enable(self._own)
        missing: list[Path] = []
        p = self._parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for m in reversed(missing):
            if _cgfs.make_dir(m, exist_ok=True):
                self._created.append(m)
            if m != self._parent:
                self._enable(m)  # intermediate levels pass the controllers down
        available = set(_cgfs.read_text(self._parent / "cgroup.controllers").split())
        lacking = self._controllers - available
        if lacking:
            raise CgroupError(
                f"controllers {' '.join(sorted(lacking))} are not enabled for {self._parent}: "
                f"enable them in {self._parent.parent / 'cgroup.subtree_control'}"
            )
        self._enable(self._parent)
        _cgfs.make_private(self._parent)  # also a parent an older version left 0755
        await self._remove_tree(())
        self._groups.forget_all()

    async def _remove_tree(self, rel: tuple[str, ...]) -> None:
        """Kill and remove every cgroup below ``rel``, deepest first, whatever the names
        (job cgroups, group cgroups with their jobs, the flat layout of older versions)."""
        for child in _cgfs.child_dirs(self._parent.joinpath(*rel)):
            await self._remove_tree((*rel, child.name))
        if rel:
            log.warning("removing leftover cgroup %s of an earlier run", "/".join(rel))
            await self._job_at(rel).remove()

    def _job_at(self, rel: tuple[str, ...], job_id: str = "",
                membership: Membership | None = None) -> V2JobCgroup:
        return V2JobCgroup(
            job_id=job_id,
            directory=self._parent.joinpath(*rel),
            cgroup_path="/".join([self._parent_cg.rstrip("/"), *rel]),
            membership=membership,
        )

    def create_blocking(self, job_id: str, limits: Limits, *, group: str | None = None,
                        group_limits: Limits | None = None) -> V2JobCgroup:
        check_job_id(job_id)
        check_limits(limits)
        self._check_supported(limits)
        name = self._names.job(job_id)
        if group is None:
            return self._create_job((name,), job_id, limits, Membership())
        check_group(group)
        wanted = group_limits_of(group_limits)
        check_limits(wanted)
        self._check_supported(wanted)
        gname = self._names.group(group)
        g = self._groups.acquire(
            gname, lambda: Group(name=gname, dirs={"": self._parent / gname}),
            lambda g: self._enable(g.dirs[""]),  # it will hold only job cgroups
        )
        membership = Membership(self._groups, g)
        try:
            with g.update_lock:
                self._apply_group_limits(g, wanted)
                return self._create_job((gname, name), job_id, limits, membership)
        except BaseException:
            membership.abandon_blocking()  # no process was placed: counts the job out
            raise

    async def create(self, job_id: str, limits: Limits, *, group: str | None = None,
                     group_limits: Limits | None = None) -> V2JobCgroup:
        await trio.lowlevel.checkpoint()
        return self.create_blocking(job_id, limits, group=group, group_limits=group_limits)

    def _create_job(self, rel: tuple[str, ...], job_id: str, limits: Limits,
                    membership: Membership) -> V2JobCgroup:
        job = self._job_at(rel, job_id, membership)
        directory = self._parent.joinpath(*rel)
        _cgfs.make_dir(directory, exist_ok=False)
        try:
            self._configure(directory, limits)
        except BaseException:
            _cgfs.remove_new_dirs([directory])
            raise
        return job

    def _apply_group_limits(self, group: Group, wanted: Limits) -> None:
        """Write the group's limits when they differ from what it has ("max" lifts one).
        Under the group's update_lock; v2 accepts any child limit under any parent's."""
        if group.applied == wanted:
            return
        d = group.dirs[""]
        if "cpu" in self._controllers:
            quota = "max" if wanted.cpu_millis is None else str(cfs_quota_us(wanted.cpu_millis))
            _cgfs.write_text(d / "cpu.max", f"{quota} {CFS_PERIOD_US}")
        if "memory" in self._controllers:
            limit = wanted.memory_bytes
            _cgfs.write_text(d / "memory.max", "max" if limit is None else str(limit))
            swap = d / "memory.swap.max"
            if swap.exists():
                _cgfs.write_text(swap, "max" if limit is None else "0")
        if "pids" in self._controllers:
            pids = wanted.pids_max
            _cgfs.write_text(d / "pids.max", "max" if pids is None else str(pids))
        group.applied = wanted

    def _check_supported(self, limits: Limits) -> None:
        needs = {
            "cpu": limits.cpu_millis is not None,
            "memory": limits.memory_bytes is not None,
            "pids": limits.pids_max is not None,
            "io": any(
                v is not None
                for v in (
                    limits.io_read_bps,
                    limits.io_write_bps,
                    limits.io_read_iops,
                    limits.io_write_iops,
                )
            ),
        }
        absent = sorted(c for c, needed in needs.items() if needed and c not in self._controllers)
        if absent:
            raise CgroupError(
                f"limits on {', '.join(absent)} requested, but controller(s) "
                f"{', '.join(absent)} are not available under {self._parent}"
            )

    def _configure(self, d: Path, limits: Limits) -> None:
        if limits.cpu_millis is not None:
            _cgfs.write_text(d / "cpu.max", f"{cfs_quota_us(limits.cpu_millis)} {CFS_PERIOD_US}")
        if limits.memory_bytes is not None:
            _cgfs.write_text(d / "memory.max", str(limits.memory_bytes))
            swap = d / "memory.swap.max"
            if swap.exists():
                _cgfs.write_text(swap, "0")
        if limits.pids_max is not None:
            _cgfs.write_text(d / "pids.max", str(limits.pids_max))
        io = {
            "rbps": limits.io_read_bps,
            "wbps": limits.io_write_bps,
            "riops": limits.io_read_iops,
            "wiops": limits.io_write_iops,
        }
        settings = " ".join(f"{k}={v}" for k, v in io.items() if v is not None)
        if settings:
            for dev in whole_disks(self._sys_root):
                try:
                    _cgfs.write_text(d / "io.max", f"{dev.dev} {settings}")
                except CgroupError as exc:
                    log.warning("device %s (%s) rejects io.max: %s", dev.name, dev.dev, exc)

    async def remove_parent(self) -> None:
        """Remove idle group cgroups and the parent directories ``prepare`` created (they
        must be empty of jobs)."""
        await self._groups.remove_idle()
        for d in reversed(self._created):
            await _cgfs.rmdir_retry(d)
        self._created.clear()
