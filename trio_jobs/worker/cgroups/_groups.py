"""Opaque cgroup names, and the per-group cgroups that the v1 and v2 drivers share.

Names. ``/proc/<pid>/cgroup`` of every process is world-readable, so a cgroup's name is
public the moment a job process sits in it. A job cgroup is therefore not named by its job
id, nor a group cgroup by its group (an identity), but ``j<32 hex>`` / ``g<32 hex>``: an
HMAC-SHA256 of the id under a random key that exists only in the driver instance's memory.
Without the key a name says nothing about the id, and a restarted server cannot map old
names back either; nothing needs to: ``prepare()`` removes every cgroup it finds under the
parent whatever its name, and a running job's ``JobCgroup`` holds its own paths. (What a
name still shows: processes whose paths share a group name belong to the same, unnamed,
identity.)

Groups. A job of group ``G`` lives in ``<parent>/<name of G>/<name of job>``. The group cgroup
is created by the first job of the group and carries the group's aggregate limits, which the
kernel enforces on all its jobs together (a fork loop split over two jobs stops at the
group's ``pids.max``). It stays when its last job is gone, until ``remove_parent()`` (the
server stops) or ``prepare()`` (the next start): groups are identities of the policy, so
they are few, and creating and removing six directories around every job of a user who runs
one job at a time cost ~0.5 ms per start (measured on v1, 2 CPUs: 1.04 ms to create a job
cgroup in a new group vs 0.70 ms in an existing one, and 0.31 vs 0.18 ms to remove it).

Concurrency. Job cgroups are created in the start's worker thread (``create_blocking``) and
removed on the event loop or in the end-of-job thread, so the table of live groups is
guarded by a ``threading.Lock`` held only around dictionary updates and a new group's mkdirs
(well under a millisecond: the event loop, which only counts a job out, may take it). A
group's limits are written under the group's own ``update_lock``, which only starts of jobs
of that group take: a limit write that has to wait for the kernel (lowering a memory limit
under usage reclaims memory) never holds up the event loop. :meth:`GroupTable.remove_idle`
removes only groups that hold no job, so a group's directories exist for as long as anyone
writes into them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, final

import trio

from ..limits import Limits
from . import _cgfs
from .base import CgroupError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

log = logging.getLogger(__name__)

NAME_HEX_DIGITS: Final = 32  # 128 bits of the HMAC: no two ids of one driver collide


@final
class OpaqueNames:
    """Directory names for jobs and groups that reveal nothing without this object's key."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def _mac(self, kind: bytes, value: str) -> str:
        msg = kind + b"\0" + value.encode("utf-8", "surrogatepass")
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:NAME_HEX_DIGITS]

    def job(self, job_id: str) -> str:
        return "j" + self._mac(b"job", job_id)

    def group(self, group: str) -> str:
        return "g" + self._mac(b"group", group)


def check_group(group: str) -> None:
    if not isinstance(group, str) or not group:
        raise CgroupError(f"group {group!r} must be a non-empty string (an identity)")


def group_limits_of(limits: Limits | None) -> Limits:
    """The limits a group cgroup carries: CPU, memory and pids (IO is per job only, see
    docs/cgroups.md). ``None`` means no group limits at all."""
    if limits is None:
        return Limits()
    return Limits(cpu_millis=limits.cpu_millis, memory_bytes=limits.memory_bytes,
                  pids_max=limits.pids_max)


@dataclass(eq=False, kw_only=True)
class Group:
    """One live group cgroup (in every hierarchy the driver uses)."""

    name: str
    dirs: dict[str, Path]  # hierarchy key ("" on v2, the controller on v1) -> directory
    jobs: int = 0  # job cgroups counted in and not yet removed (guarded by the table lock)
    applied: Limits | None = None  # the group limits last written; None: write them
    update_lock: threading.Lock = field(default_factory=threading.Lock)
    # v1 only: each job's cpu directory -> the job's own cpu_millis, to re-cap the jobs'
    # quotas when the group's changes (v1 refuses a child quota above its parent's).
    # Added under update_lock; a job's entry goes with its cgroup (Membership.release), so
    # the dict holds only the group's live jobs although the group outlives them.
    cpu_members: dict[Path, int | None] = field(default_factory=dict)

    @property
    def distinct(self) -> list[Path]:
        return sorted(set(self.dirs.values()))


@final
class GroupTable:
    """The live groups of one driver, with how many job cgroups each holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: dict[str, Group] = {}

    def acquire(self, name: str, make: Callable[[], Group], setup: Callable[[Group], None]
                ) -> Group:
        """Count one more job into group ``name``, creating its directories the first time
        (``setup`` then prepares them, e.g. enables controllers). Blocking, brief. A group in
        the table has its directories: only :meth:`remove_idle` and ``forget_all`` (after
        ``prepare()`` removed everything) take them away, and they take the group out too."""
        with self._lock:
            group = self._groups.get(name)
            if group is not None:
                group.jobs += 1
                return group
            group = make()  # a new group: no limits written yet (applied is None)
            made: list[Path] = []
            try:
                for d in group.distinct:
                    if _cgfs.make_dir(d, exist_ok=True):
                        made.append(d)
                setup(group)
            except BaseException:
                _cgfs.remove_new_dirs(made)  # not in the table yet: nothing else to undo
                raise
            self._groups[name] = group
            group.jobs += 1
            return group

    def release(self, group: Group) -> bool:
        """One job of ``group`` is gone. The group stays (see the module doc) until
        :meth:`remove_idle`. Always True: nothing is left to do."""
        with self._lock:
            group.jobs -= 1
        return True

    def forget_all(self) -> None:
        """After ``prepare()`` removed every cgroup under the parent."""
        with self._lock:
            self._groups.clear()

    async def remove_idle(self) -> None:
        """Remove every group that holds no job (for ``remove_parent``)."""
        with self._lock:
            idle = [g for g in self._groups.values() if g.jobs == 0]
        for group in idle:
            for d in reversed(group.distinct):
                await _cgfs.rmdir_retry(d)
            with self._lock:
                if self._groups.get(group.name) is group and group.jobs == 0:
                    del self._groups[group.name]


@final
class Membership:
    """A job cgroup's link to its group: counts the job out exactly once, after the job's
    own directories are gone. ``group=None`` (an ungrouped job, a leftover) does nothing."""

    def __init__(self, table: GroupTable | None = None, group: Group | None = None) -> None:
        self._table = table
        self._group = group
        self._released = False
        self.cpu_member: Path | None = None  # v1: the job's key in the group's cpu_members

    def release_blocking(self) -> bool:
        """True when the group needs nothing more (see :meth:`GroupTable.release`)."""
        if self._table is None or self._group is None:
            return True
        if not self._released:
            self._released = True
            if self.cpu_member is not None:
                self._group.cpu_members.pop(self.cpu_member, None)  # atomic: no lock needed
            return self._table.release(self._group)
        return True

    def abandon_blocking(self) -> None:
        """:meth:`release_blocking` after a failed start: logs (never raises) what it cannot
        remove, so the start's own error is what the caller sees."""
        try:
            self.release_blocking()
        except CgroupError as exc:
            log.warning("cannot remove a group cgroup after a failed start: %s", exc)

    async def release(self) -> None:
        await trio.lowlevel.checkpoint()
        self.release_blocking()
