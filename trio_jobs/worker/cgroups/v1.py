"""cgroup v1 driver, for hybrid hosts whose resource controllers are still on v1.

Theory of operation. Every v1 controller is its own hierarchy (some may be co-mounted, e.g.
``cpu,cpuacct``), each with its own directory tree. A job gets a directory with an opaque
name (see _groups.py) under the jobs' parent, or under its group's directory there, in each
hierarchy we use: cpu (quota), cpuacct (CPU time), memory (limit, peak, OOM), blkio
(throttling, IO bytes), pids (fork limit) and freezer (atomic kill). ``add_process`` writes
the pid into ``cgroup.procs`` of every one of them while the job's wrapper is still blocked
before exec (see base.py), so everything the job runs is covered from its first instruction.

Kill: freeze the freezer cgroup (no task runs or forks once it reads FROZEN), SIGKILL every
task, thaw; the kills are delivered on thaw. v1 has no notification for the FREEZING ->
FROZEN transition, so we re-read ``freezer.state`` with a short, bounded back-off (it
normally settles within a millisecond; a task in uninterruptible sleep can hold it, and
after the bound we kill anyway and go round again).

End of job: v1 has no ``populated`` event a non-root-of-hierarchy process can use
(``release_agent`` is global and belongs to the host). ``wait_empty`` instead waits on pidfds
of the remaining members (readable when they exit) and re-reads the list: event driven,
no sleeps.

Swap: ``memory.memsw.limit_in_bytes`` (memory + swap) is set to the memory limit, so the
job gets no swap. Without swap accounting (no memsw files), ``memory.swappiness`` is set
to 0 instead (best effort).

Groups: the group level exists in every hierarchy (so the paths line up) and carries the
group's cpu quota, memory limit (+ memsw, no swap) and pids.max. The memory controller
applies a parent's limit to its children only with ``memory.use_hierarchy`` 1; current
kernels always have it (and refuse 0), old ones start a child with its parent's value, so a
new group turns it on (it may, having no children yet) or refuses to exist. The CPU
controller of v1 refuses a child quota above its parent's (EINVAL, unlike v2), so a job's
quota is capped at its group's (that changes nothing: the group's quota binds anyway), and
when the group's quota changes the jobs are re-capped around the write, so every write is
valid when it is made.

IO: blkio throttling on v1 only sees writes when they are submitted to the device. Buffered
writes are submitted later by the kernel's writeback threads and are charged to the root
cgroup, so a v1 write limit effectively constrains O_DIRECT (and synchronous) writes only;
reads are throttled normally. See docs/cgroups.md.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

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
from .devices import BlockDevice, whole_disks

if TYPE_CHECKING:
    from collections.abc import Mapping

log = logging.getLogger(__name__)

#: The v1 controllers the driver needs, each mounted (possibly co-mounted with others).
V1_CONTROLLERS: Final = ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer")
CFS_PERIOD_US: Final = 100_000
CFS_MIN_QUOTA_US: Final = 1_000  # the kernel's minimum
FREEZE_WAIT_SECONDS: Final = 1.0
KILL_ROUNDS: Final = 5
REMOVE_WAIT_SECONDS: Final = 10.0


@final
class V1JobCgroup(_cgfs.UsageFiles):
    """One job's directories in each v1 hierarchy. Methods are safe after the job ended."""

    def __init__(self, *, job_id: str, dirs: Mapping[str, Path], freezer_cgroup: str,
                 membership: Membership | None = None) -> None:
        self.job_id = job_id  # for messages only: the directories do not carry it
        self._dirs = dict(dirs)  # controller -> directory
        self._distinct = sorted(set(self._dirs.values()))
        self._freezer = self._dirs["freezer"]
        self._is_member = _cgfs.make_membership_check("freezer", freezer_cgroup)
        self._membership = membership or Membership()

    @property
    def path(self) -> str:
        return str(self._freezer)

    def dir(self, controller: str) -> Path:
        return self._dirs[controller]

    def _exists(self) -> bool:
        return any(d.exists() for d in self._distinct)

    def add_process_blocking(self, pid: int) -> None:
        for d in self._distinct:
            _cgfs.write_text(d / "cgroup.procs", str(pid))

    async def add_process(self, pid: int) -> None:
        await trio.lowlevel.checkpoint()
        self.add_process_blocking(pid)

    async def signal_all(self, sig: int) -> None:
        _cgfs.signal_members(self._freezer / "cgroup.procs", self._is_member, sig)

    async def kill_all(self) -> None:
        procs = self._freezer / "cgroup.procs"
        state = self._freezer / "freezer.state"
        for _ in range(KILL_ROUNDS):
            if not _cgfs.read_pids(procs):
                return
            _cgfs.write_text(state, "FROZEN")
            try:
                frozen = await self._wait_frozen(state)
                _cgfs.signal_members(procs, self._is_member, signal.SIGKILL)
            finally:
                if self._freezer.exists():
                    _cgfs.write_text(state, "THAWED")
            if frozen:
                return  # frozen tasks cannot fork: every task got the SIGKILL
            # Freezing did not complete in time (a task in uninterruptible sleep), so a task
            # may have forked after the list was read: wait a little, then go round again.
            with trio.move_on_after(FREEZE_WAIT_SECONDS):
                await self.wait_empty()
                return
        log.warning("processes of %s survived %d kill rounds", self._freezer, KILL_ROUNDS)

    async def _wait_frozen(self, state: Path) -> bool:
        delay = 0.0005
        with trio.move_on_after(FREEZE_WAIT_SECONDS):
            while _cgfs.read_text(state).strip() != "FROZEN":
                await trio.sleep(delay)
                delay = min(delay * 2, 0.02)
            return True
        return False

    async def wait_empty(self) -> None:
        await _cgfs.wait_members_exit(self._freezer / "cgroup.procs", self._is_member)

    def _usage_blocking(self) -> Usage:
        if not self._exists():
            return Usage()
        cpu_ns = _cgfs.read_int(self._dirs["cpuacct"] / "cpuacct.usage")
        peak = _cgfs.read_int(self._dirs["memory"] / "memory.max_usage_in_bytes")
        read_b = write_b = 0
        text = _cgfs.read_text(self._dirs["blkio"] / "blkio.throttle.io_service_bytes")
        for line in text.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2].isdigit():
                if parts[1] == "Read":
                    read_b += int(parts[2])
                elif parts[1] == "Write":
                    write_b += int(parts[2])
        return Usage(
            cpu_usec=cpu_ns // 1000,
            memory_peak_bytes=peak,
            io_read_bytes=read_b,
            io_write_bytes=write_b,
        )

    def _oom_killed_blocking(self) -> bool:
        mem = self._dirs["memory"]
        if not mem.exists():
            return False
        counters = _cgfs.parse_flat_keyed(_cgfs.read_text(mem / "memory.oom_control"))
        if "oom_kill" in counters:
            return counters["oom_kill"] > 0
        # Kernels before 4.13 have no oom_kill counter: hitting the limit is the best hint.
        return _cgfs.read_int(mem / "memory.failcnt") > 0

    def try_remove_blocking(self) -> bool:
        if self._exists():
            if _cgfs.read_pids(self._freezer / "cgroup.procs"):
                return False
            removed = True
            for d in self._distinct:  # every one, also after a busy one
                removed = _cgfs.try_rmdir(d) and removed
            if not removed:
                return False
        return self._membership.release_blocking()  # counts the job out of its group

    async def remove(self) -> None:
        if self._exists():
            if _cgfs.read_pids(self._freezer / "cgroup.procs"):
                await self.kill_all()
                with trio.move_on_after(REMOVE_WAIT_SECONDS):
                    await self.wait_empty()
            for d in self._distinct:
                await _cgfs.rmdir_retry(d)
        await self._membership.release()


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value <= 0):
        raise CgroupError(f"limit {name} must be a positive integer, not {value!r}")


def check_limits(limits: Limits) -> None:
    for field in fields(limits):
        _check_positive(field.name, getattr(limits, field.name))


def cfs_quota_us(cpu_millis: int, period_us: int = CFS_PERIOD_US) -> int:
    """CPU quota per period for ``cpu_millis`` (1000 = one CPU), at least the kernel minimum."""
    return max(CFS_MIN_QUOTA_US, cpu_millis * period_us // 1000)


_UNLIMITED: Final = -1  # cpu.cfs_quota_us and the memory limits' "no limit"


def _quota(cpu_millis: int | None) -> int:
    return _UNLIMITED if cpu_millis is None else cfs_quota_us(cpu_millis)


def _capped(quota: int, cap: int) -> int:
    """A child's quota under a parent quota ``cap``: v1 refuses a child quota above its
    parent's, while an unlimited child (-1) is always accepted."""
    if quota == _UNLIMITED or cap == _UNLIMITED:
        return quota
    return min(quota, cap)


def _write_memory(mem: Path, limit: int | None, who: str) -> None:
    """Set (or, with None, lift) a memory limit and the same memory+swap limit (no swap).

    memsw must stay >= the memory limit at every moment, so when the limit goes up memsw is
    written first, and when it goes down the memory limit is. Lowering a limit under the
    current usage makes the kernel reclaim first; EBUSY if it cannot (a CgroupError).
    """
    value = _UNLIMITED if limit is None else limit
    limit_file = mem / "memory.limit_in_bytes"
    memsw = mem / "memory.memsw.limit_in_bytes"
    if not memsw.exists():
        _cgfs.write_text(limit_file, str(value))
        if limit is not None:
            try:
                _cgfs.write_text(mem / "memory.swappiness", "0")
            except CgroupError as exc:
                log.warning("cannot disable swap for %s: %s", who, exc)
        return
    rising = limit is None or limit > _cgfs.read_int(limit_file)
    for f in (memsw, limit_file) if rising else (limit_file, memsw):
        _cgfs.write_text(f, str(value))


@final
class V1Driver:
    """Job cgroups in the v1 hierarchies, under one parent per hierarchy."""

    name: Final = "v1"

    def __init__(
        self,
        *,
        parents: Mapping[str, tuple[Path, str]],
        reason: str = "",
        sys_root: Path = Path("/sys"),
    ) -> None:
        """``parents`` maps each of V1_CONTROLLERS to (parent directory, its cgroup path)."""
        missing = [c for c in V1_CONTROLLERS if c not in parents]
        if missing:
            raise CgroupError(f"cgroup v1 driver needs controllers {', '.join(missing)}")
        self._parents = {c: parents[c] for c in V1_CONTROLLERS}
        self._reason = reason
        self._sys_root = sys_root
        self._created: list[Path] = []
        self._names = OpaqueNames()
        self._groups = GroupTable()

    def describe(self) -> str:
        dirs = sorted({str(d) for d, _ in self._parents.values()})
        why = f" ({self._reason})" if self._reason else ""
        return f"cgroup v1 driver: job cgroups under {', '.join(dirs)}{why}"

    def parent_dir(self, controller: str) -> Path:
        return self._parents[controller][0]

    def _dirs_at(self, rel: tuple[str, ...]) -> dict[str, Path]:
        return {c: d.joinpath(*rel) for c, (d, _) in self._parents.items()}

    def _job_at(self, rel: tuple[str, ...], job_id: str = "",
                membership: Membership | None = None) -> V1JobCgroup:
        """The job cgroup at ``rel`` (names below the parent) in every hierarchy."""
        freezer_cg = "/".join([self._parents["freezer"][1].rstrip("/"), *rel])
        return V1JobCgroup(job_id=job_id, dirs=self._dirs_at(rel), freezer_cgroup=freezer_cg,
                           membership=membership)

    async def prepare(self) -> None:
        for d in sorted({d for d, _ in self._parents.values()}):
            missing: list[Path] = []
            p = d
            while not p.exists():
                missing.append(p)
                p = p.parent
            for m in reversed(missing):
                if _cgfs.make_dir(m, exist_ok=True):
                    self._created.append(m)
            _cgfs.make_private(d)  # also a parent an older version left 0755
        await self._remove_tree(())
        self._groups.forget_all()

    async def _remove_tree(self, rel: tuple[str, ...]) -> None:
        """Kill and remove every cgroup below ``rel``, deepest first, whatever the names
        (job cgroups, group cgroups with their jobs, the flat layout of older versions)."""
        bases = sorted({d.joinpath(*rel) for d, _ in self._parents.values()})
        for name in sorted({e.name for b in bases for e in _cgfs.child_dirs(b)}):
            await self._remove_tree((*rel, name))
        if rel:
            log.warning("removing leftover cgroup %s of an earlier run", "/".join(rel))
            await self._job_at(rel).remove()

    def create_blocking(self, job_id: str, limits: Limits, *, group: str | None = None,
                        group_limits: Limits | None = None) -> V1JobCgroup:
        check_job_id(job_id)
        check_limits(limits)
        name = self._names.job(job_id)
        if group is None:
            return self._create_job((name,), job_id, limits, None, Membership())
        check_group(group)
        wanted = group_limits_of(group_limits)
        check_limits(wanted)
        gname = self._names.group(group)
        g = self._groups.acquire(
            gname, lambda: Group(name=gname, dirs=self._dirs_at((gname,))), self._setup_group
        )
        membership = Membership(self._groups, g)
        try:
            with g.update_lock:
                self._apply_group_limits(g, wanted)
                return self._create_job((gname, name), job_id, limits, g, membership)
        except BaseException:
            membership.abandon_blocking()  # no process was placed: counts the job out
            raise

    async def create(self, job_id: str, limits: Limits, *, group: str | None = None,
                     group_limits: Limits | None = None) -> V1JobCgroup:
        await trio.lowlevel.checkpoint()
        return self.create_blocking(job_id, limits, group=group, group_limits=group_limits)

    def _create_job(self, rel: tuple[str, ...], job_id: str, limits: Limits, group: Group | None,
                    membership: Membership) -> V1JobCgroup:
        job = self._job_at(rel, job_id, membership)
        made: list[Path] = []
        cpu_cap = _UNLIMITED
        if group is not None and group.applied is not None:
            cpu_cap = _quota(group.applied.cpu_millis)
        try:
            for d in sorted({job.dir(c) for c in V1_CONTROLLERS}):
                _cgfs.make_dir(d, exist_ok=False)
                made.append(d)
            self._configure(job, limits, cpu_cap)
        except BaseException:
            _cgfs.remove_new_dirs(made)  # only ours: never an existing cgroup of that name
            raise
        if group is not None:
            group.cpu_members[job.dir("cpu")] = limits.cpu_millis
            membership.cpu_member = job.dir("cpu")  # removed from it with the job's cgroup
        return job

    def _setup_group(self, group: Group) -> None:
        """A new group directory: make sure the memory limit will bind its jobs."""
        hierarchy = group.dirs["memory"] / "memory.use_hierarchy"
        if hierarchy.exists() and _cgfs.read_text(hierarchy).strip() == "0":
            try:
                _cgfs.write_text(hierarchy, "1")
            except CgroupError as exc:
                raise CgroupError(
                    f"{hierarchy} is 0 and cannot be set to 1, so a group memory limit would "
                    f"not bind the group's jobs: {exc}"
                ) from exc

    def _apply_group_limits(self, group: Group, wanted: Limits) -> None:
        """Write the group's limits when they differ from what it has. Under update_lock."""
        if group.applied == wanted:
            return
        pids = "max" if wanted.pids_max is None else str(wanted.pids_max)
        _cgfs.write_text(group.dirs["pids"] / "pids.max", pids)
        _write_memory(group.dirs["memory"], wanted.memory_bytes, f"group {group.name}")
        self._set_group_quota(group, _quota(wanted.cpu_millis))
        group.applied = wanted

    def _set_group_quota(self, group: Group, new: int) -> None:
        """Change a group's CPU quota with its jobs' quotas capped around the write: first
        under the lower of the old and new quota, then under the new one."""
        cpu = group.dirs["cpu"]
        old = _cgfs.read_int(cpu / "cpu.cfs_quota_us")
        both = [q for q in (old, new) if q != _UNLIMITED]
        self._cap_members(group, min(both) if both else _UNLIMITED)
        if new != _UNLIMITED:
            _cgfs.write_text(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
        _cgfs.write_text(cpu / "cpu.cfs_quota_us", str(new))
        self._cap_members(group, new)

    def _cap_members(self, group: Group, cap: int) -> None:
        for d, own in list(group.cpu_members.items()):
            try:
                _cgfs.write_text(d / "cpu.cfs_quota_us", str(_capped(_quota(own), cap)))
            except CgroupError:
                if d.exists():
                    raise
                group.cpu_members.pop(d, None)  # that job has just ended

    def _configure(self, job: V1JobCgroup, limits: Limits, cpu_cap: int = _UNLIMITED) -> None:
        cpu = job.dir("cpu")
        if limits.cpu_millis is not None:
            _cgfs.write_text(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            quota = _capped(cfs_quota_us(limits.cpu_millis), cpu_cap)
            _cgfs.write_text(cpu / "cpu.cfs_quota_us", str(quota))
        if limits.memory_bytes is not None:
            _write_memory(job.dir("memory"), limits.memory_bytes, f"job {job.job_id}")
        if limits.pids_max is not None:
            _cgfs.write_text(job.dir("pids") / "pids.max", str(limits.pids_max))
        self._configure_blkio(job, limits)

    def _configure_blkio(self, job: V1JobCgroup, limits: Limits) -> None:
        files = {
            "blkio.throttle.read_bps_device": limits.io_read_bps,
            "blkio.throttle.write_bps_device": limits.io_write_bps,
            "blkio.throttle.read_iops_device": limits.io_read_iops,
            "blkio.throttle.write_iops_device": limits.io_write_iops,
        }
        if all(v is None for v in files.values()):
            return
        devices: list[BlockDevice] = whole_disks(self._sys_root)
        blkio = job.dir("blkio")
        for dev in devices:
            for fname, value in files.items():
                if value is None:
                    continue
                try:
                    _cgfs.write_text(blkio / fname, f"{dev.dev} {value}")
                except CgroupError as exc:
                    log.warning("device %s (%s) rejects %s: %s", dev.name, dev.dev, fname, exc)

    async def remove_parent(self) -> None:
        """Remove idle group cgroups and the parent directories ``prepare`` created (they
        must be empty of jobs)."""
        await self._groups.remove_idle()
        for d in reversed(self._created):
            await _cgfs.rmdir_retry(d)
        self._created.clear()
