"""The seam between the job logic and cgroup drivers.

A driver owns a parent cgroup (a delegated subtree) and creates one child cgroup per job,
directly under the parent or under the job's group cgroup (see ``_groups``).
The job logic only talks to these protocols, so v2, v1 and "none" plug in without it
changing.

Placement before exec (DESIGN §2): the spawn path starts the job as a tiny ``/bin/sh``
wrapper that blocks reading a pipe *before* it executes the user's program. While it is
blocked, the worker calls :meth:`JobCgroup.add_process` with its pid; only then is the pipe
released and the wrapper ``exec``s the program. So the program, and anything it forks, never
runs outside the cgroup. This keeps spawning on CPython's vfork/posix_spawn path (no
``preexec_fn``, which is unsafe with the threads trio uses for ``to_thread``), works the same
on v1 and v2, and lets the (root) server place a process that already runs as the job's Unix
user.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..limits import Limits, Usage


class CgroupError(Exception):
    """A cgroup operation failed (the message says which file and why)."""


class JobCgroup(Protocol):
    """One job's cgroup. Every method is safe to call after the job ended."""

    @property
    def path(self) -> str:
        """A human-readable location (a directory, or "" when there is none)."""
        ...

    def add_process_blocking(self, pid: int) -> None:
        """Move ``pid`` (blocked before exec) into this cgroup. Raises CgroupError.

        Blocking, for the job start's worker thread (see ``worker/launch.py``): it only
        writes this cgroup's own files, so it is safe next to the event loop's calls.
        """
        ...

    async def add_process(self, pid: int) -> None:
        """:meth:`add_process_blocking` on the event loop (cgroupfs writes never wait for a
        disk, see ``_cgfs``)."""
        ...

    async def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every process of the job (e.g. SIGTERM for a graceful stop)."""
        ...

    async def kill_all(self) -> None:
        """SIGKILL every process of the job, atomically with respect to forks."""
        ...

    async def wait_empty(self) -> None:
        """Return once no process is left in the cgroup (event driven where possible)."""
        ...

    async def usage(self) -> Usage:
        """Current usage (CPU time, peak memory, IO bytes)."""
        ...

    async def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a process of this job."""
        ...

    async def remove(self) -> None:
        """Remove the cgroup (killing what is left first); its group's cgroup stays until
        the driver's ``remove_parent``. Idempotent."""
        ...

    def final_usage_blocking(self) -> tuple[Usage, bool]:
        """:meth:`usage` and :meth:`oom_killed` at once, blocking: for the worker thread that
        ends a job (a handful of cgroupfs reads, kept off the event loop)."""
        ...

    def try_remove_blocking(self) -> bool:
        """Remove the cgroup if it holds no process; True once it is gone. Never waits:
        False when it is populated or still busy (then :meth:`remove` finishes the job).
        Blocking (an rmdir per hierarchy, ~0.1 ms each on v1), for a worker thread."""
        ...


class CgroupDriver(Protocol):
    """Creates job cgroups. ``name`` is "v2", "v1" or "none"."""

    @property
    def name(self) -> str: ...

    def describe(self) -> str:
        """One line for the server's start banner, e.g. "cgroup v1 under /sys/fs/cgroup/*/x"."""
        ...

    async def prepare(self) -> None:
        """Set up the parent cgroup; kill and remove job cgroups left by an earlier run."""
        ...

    def create_blocking(self, job_id: str, limits: Limits, *, group: str | None = None,
                        group_limits: Limits | None = None) -> JobCgroup:
        """Create (and configure) the cgroup of a new job. Raises CgroupError, after removing
        what it created (a new cgroup holds no process yet, so that is an rmdir).

        ``group`` (e.g. the owner's identity) puts the job under that group's cgroup,
        created on first use, whose ``group_limits`` (cpu_millis, memory_bytes, pids_max;
        ``None`` fields and ``group_limits=None`` mean no group limit) the kernel enforces on
        all the group's jobs together; a later job that brings other group limits updates
        them. The group cgroup outlives its jobs (``remove_parent`` removes it). Cgroup names
        reveal neither the job id nor the group.

        Blocking, for the job start's worker thread (see ``worker/launch.py``): it creates
        and writes the new job's own directories, and its group's (under locks the event
        loop holds only to count a job out of its group), so it is safe next to the event loop's calls
        on other jobs.
        """
        ...

    async def create(self, job_id: str, limits: Limits, *, group: str | None = None,
                     group_limits: Limits | None = None) -> JobCgroup:
        """:meth:`create_blocking` on the event loop."""
        ...
