"""cgroup v1 driver, for hybrid hosts whose resource controllers are still on v1.

Theory of operation. Every v1 controller is its own hierarchy (some may be co-mounted, e.g.
``cpu,cpuacct``), each with its own directory tree. A job gets a directory named after its
id under the jobs' parent in each hierarchy we use: cpu (quota), cpuacct (CPU time), memory
(limit, peak, OOM), blkio (throttling, IO bytes), pids (fork limit) and freezer (atomic
kill). ``add_process`` writes the pid into ``cgroup.procs`` of every one of them while the
job's wrapper is still blocked before exec (see base.py), so everything the job runs is
covered from its first instruction.

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

    def __init__(self, *, job_id: str, dirs: Mapping[str, Path], freezer_cgroup: str) -> None:
        self.job_id = job_id
        self._dirs = dict(dirs)  # controller -> directory
        self._distinct = sorted(set(self._dirs.values()))
        self._freezer = self._dirs["freezer"]
        self._is_member = _cgfs.make_membership_check("freezer", freezer_cgroup)

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
        if not self._exists():
            return True
        if _cgfs.read_pids(self._freezer / "cgroup.procs"):
            return False
        removed = True
        for d in self._distinct:  # every one, also after a busy one
            removed = _cgfs.try_rmdir(d) and removed
        return removed

    async def remove(self) -> None:
        if not self._exists():
            return
        if _cgfs.read_pids(self._freezer / "cgroup.procs"):
            await self.kill_all()
            with trio.move_on_after(REMOVE_WAIT_SECONDS):
                await self.wait_empty()
        for d in self._distinct:
            await _cgfs.rmdir_retry(d)


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value <= 0):
        raise CgroupError(f"limit {name} must be a positive integer, not {value!r}")


def check_limits(limits: Limits) -> None:
    for field in fields(limits):
        _check_positive(field.name, getattr(limits, field.name))


def cfs_quota_us(cpu_millis: int, period_us: int = CFS_PERIOD_US) -> int:
    """CPU quota per period for ``cpu_millis`` (1000 = one CPU), at least the kernel minimum."""
    return max(CFS_MIN_QUOTA_US, cpu_millis * period_us // 1000)


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

    def describe(self) -> str:
        dirs = sorted({str(d) for d, _ in self._parents.values()})
        why = f" ({self._reason})" if self._reason else ""
        return f"cgroup v1 driver: job cgroups under {', '.join(dirs)}{why}"

    def parent_dir(self, controller: str) -> Path:
        return self._parents[controller][0]

    def _job(self, job_id: str) -> V1JobCgroup:
        dirs = {c: d / job_id for c, (d, _) in self._parents.items()}
        freezer_cg = self._parents["freezer"][1].rstrip("/") + "/" + job_id
        return V1JobCgroup(job_id=job_id, dirs=dirs, freezer_cgroup=freezer_cg)

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
        leftovers = sorted({e.name for d, _ in self._parents.values() for e in _cgfs.child_dirs(d)})
        for job_id in leftovers:
            log.warning("removing leftover job cgroup %s of an earlier run", job_id)
            await self._job(job_id).remove()

    def create_blocking(self, job_id: str, limits: Limits) -> V1JobCgroup:
        check_job_id(job_id)
        check_limits(limits)
        job = self._job(job_id)
        made: list[Path] = []
        try:
            for d in sorted({job.dir(c) for c in V1_CONTROLLERS}):
                _cgfs.make_dir(d, exist_ok=False)
                made.append(d)
            self._configure(job, limits)
        except BaseException:
            _cgfs.remove_new_dirs(made)  # only ours: never an existing cgroup of that name
            raise
        return job

    async def create(self, job_id: str, limits: Limits) -> V1JobCgroup:
        await trio.lowlevel.checkpoint()
        return self.create_blocking(job_id, limits)

    def _configure(self, job: V1JobCgroup, limits: Limits) -> None:
        cpu = job.dir("cpu")
        if limits.cpu_millis is not None:
            _cgfs.write_text(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            _cgfs.write_text(cpu / "cpu.cfs_quota_us", str(cfs_quota_us(limits.cpu_millis)))
        mem = job.dir("memory")
        if limits.memory_bytes is not None:
            _cgfs.write_text(mem / "memory.limit_in_bytes", str(limits.memory_bytes))
            memsw = mem / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                # memsw must be >= the memory limit: written after it.
                _cgfs.write_text(memsw, str(limits.memory_bytes))
            else:
                try:
                    _cgfs.write_text(mem / "memory.swappiness", "0")
                except CgroupError as exc:
                    log.warning("cannot disable swap for job %s: %s", job.job_id, exc)
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
        """Remove the parent directories ``prepare`` created (they must be empty of jobs)."""
        for d in reversed(self._created):
            await _cgfs.rmdir_retry(d)
        self._created.clear()
