"""Processes of jobs whose server died, on hosts without cgroups.

With a cgroup driver, ``prepare()`` kills every job cgroup an earlier run left. Without
cgroups a job is its process group (``NoCgroupDriver``), and a server killed with SIGKILL
leaves that group running. So the worker records each job's main pid -- which is also its
process-group id -- with the process's start time (``/proc/PID/stat`` field 22, clock ticks
since boot), and at start kills the groups of jobs that were still RUNNING.

Why this never hits a stranger: a pid number is not handed out again while any process still
uses it as a pid or process-group id. If a process with the recorded pid exists and has the
recorded start time, it is the job's main process (or its zombie), so the group is the job's.
If no process has that pid, the number can only still be in use as our group's id (members
of the job are left), or not at all (``killpg`` fails with ESRCH). If a process with that pid
exists with another start time, the number was reused: the old group is entirely gone and we
leave it alone. What remains is a race of microseconds (the last member dies and the number
is reused as a new group between the check and ``killpg``), and a reboot that repeats the
same pid with the same start time; both are far less likely than a leftover job.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Final

import trio

_TICK_NS: Final = 10**9 // os.sysconf("SC_CLK_TCK")


def boot_ticks() -> int:
    """Now, in the clock of ``/proc/PID/stat``'s start time: clock ticks since boot
    (the kernel's ``start_boottime``, CLOCK_BOOTTIME, truncated to USER_HZ)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // _TICK_NS


class StartClock:
    """The start time of a process we fork, known without reading its ``/proc/PID/stat``.

    Reading a child's stat right after its exec waits for the exec to finish: ~0.7-0.9 ms
    here, half of a whole job start. But the child's start time is the tick its fork
    happened in, and the fork happened between two readings of :func:`boot_ticks` around
    it: when both fall in one tick (at 100 ticks/s and a ~0.2 ms spawn, ~98% of starts),
    that tick is the start time, exactly. Otherwise, and until the first such start was
    checked against ``/proc`` (a kernel whose start times use another clock fails the
    check and is always read), it is read from ``/proc``. Thread-safe.
    """

    def __init__(self) -> None:
        self.verified: bool | None = None  # None: not checked yet; False: always read /proc

    def of(self, pid: int, before: int, after: int) -> int | None:
        """The start time of ``pid``, forked between ticks ``before`` and ``after``."""
        if before != after or not self.verified:
            read = start_time(pid)
            if before == after and self.verified is None and read is not None:
                self.verified = read == before
            return read
        return before


START_CLOCK: Final = StartClock()


def start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (also a zombie), or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")"
    fields = stat[stat.rindex(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 overall: starttime
    except (IndexError, ValueError):
        return None


def group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:  # state, ..., pgrp
            members.append(int(entry.name))
    return members


async def wait_gone(pids: list[int]) -> None:
    """Return once every process in ``pids`` has exited (pidfds: event driven, any parent)."""
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)


def kill_leftover_group(pgid: int, started: int) -> bool:
    """SIGKILL the process group of a job of an earlier run (see the module doc).

    True if a signal was sent; False if the group is gone or its number was reused.
    """
    if pgid <= 1:
        return False
    now = start_time(pgid)
    if now is not None and now != started:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
        return True
    return False
