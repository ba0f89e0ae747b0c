"""The driver for hosts where we may not use cgroups: no limits, process-group kill.

Every job is started in its own session and process group (``start_new_session``), whose id
is the main process's pid. Signals go to that group with ``killpg``.

Why ``killpg`` never hits a stranger here: a process-group id is a pid number, and the kernel
does not hand a pid number out again while any process still uses it as a pid, process group
or session id. The worker guarantees that the main process is *not reaped* until after it has
called :meth:`NoJobCgroup.kill_all` (it waits for the exit with a pidfd, leaving a zombie):
until then the zombie holds the number, so the group can only contain the job's processes.
After ``kill_all`` this object is dead and every method is a no-op, so nothing is signalled
once the number may have been recycled.

Limits of this driver (the cgroup drivers do not have them): a descendant that calls
``setsid``/``setpgid`` leaves the group and survives the job; ``wait_empty`` cannot observe
processes that are not our children, so it returns at once (the worker bounds the output
drain instead); there is no usage accounting beyond what the worker gets from ``wait4``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import TYPE_CHECKING, final

import trio

from ..limits import Usage

if TYPE_CHECKING:
    from ..limits import Limits

log = logging.getLogger(__name__)


@final
class NoJobCgroup:
    """A job "cgroup" that is just the job's process group."""

    def __init__(self) -> None:
        self._pgid: int | None = None
        self._dead = False

    @property
    def path(self) -> str:
        return ""

    def add_process_blocking(self, pid: int) -> None:
        # The wrapper is a session leader (start_new_session), so its pgid is its pid.
        self._pgid = pid

    async def add_process(self, pid: int) -> None:
        self.add_process_blocking(pid)
        await trio.lowlevel.checkpoint()

    def _killpg(self, sig: int) -> None:
        if self._pgid is None or self._dead:
            return
        # ESRCH: every member has exited (a zombie leader is no longer a member).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._pgid, sig)

    async def signal_all(self, sig: int) -> None:
        self._killpg(sig)
        await trio.lowlevel.checkpoint()

    async def kill_all(self) -> None:
        self._killpg(signal.SIGKILL)
        self._dead = True
        await trio.lowlevel.checkpoint()

    async def wait_empty(self) -> None:
        await trio.lowlevel.checkpoint()

    async def usage(self) -> Usage:
        await trio.lowlevel.checkpoint()
        return Usage()

    async def oom_killed(self) -> bool:
        await trio.lowlevel.checkpoint()
        return False

    async def remove(self) -> None:
        await self.kill_all()

    def final_usage_blocking(self) -> tuple[Usage, bool]:
        return Usage(), False  # the worker takes the main process's rusage instead

    def try_remove_blocking(self) -> bool:
        self._killpg(signal.SIGKILL)
        self._dead = True
        return True


@final
class NoCgroupDriver:
    """No cgroups: jobs run without resource limits. The server warns loudly when using it."""

    def __init__(self, reason: str = "") -> None:
        self._reason = reason

    @property
    def name(self) -> str:
        return "none"

    def describe(self) -> str:
        why = f" ({self._reason})" if self._reason else ""
        return (f"no cgroups{why}: jobs run WITHOUT resource limits; a job is killed through "
                "its process group, so a process that calls setsid can outlive its job")

    async def prepare(self) -> None:
        await trio.lowlevel.checkpoint()

    def create_blocking(self, job_id: str, limits: Limits, *, group: str | None = None,
                        group_limits: Limits | None = None) -> NoJobCgroup:
        # Neither job nor group limits can be enforced here (describe() says so loudly);
        # the group is accepted so that callers need not know which driver runs.
        return NoJobCgroup()

    async def create(self, job_id: str, limits: Limits, *, group: str | None = None,
                     group_limits: Limits | None = None) -> NoJobCgroup:
        await trio.lowlevel.checkpoint()
        return NoJobCgroup()
