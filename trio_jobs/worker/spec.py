"""Value types of the worker API: what a job is asked to be, and what it is."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from .limits import DEFAULT_LIMITS, Limits, Usage

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime


@dataclass(frozen=True, kw_only=True)
class RunAs:
    """The Unix user a job runs as (``JobSpec.run_as=None`` means the server's own user)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    name: str = ""  # for messages and the job's USER/LOGNAME
    home: str = "/"  # the job's HOME


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What to run. ``limits`` is already merged with defaults and policy caps by the caller."""

    command: str  # a name looked up in the job's PATH, or a path (relative = to working_dir)
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)  # added to the clean environment
    working_dir: str = "/"
    limits: Limits = DEFAULT_LIMITS
    owner: str
    run_as: RunAs | None = None
    # The job's cgroup goes under this group's cgroup (the service passes the owner's
    # identity), whose aggregate limits (cpu_millis, memory_bytes, pids_max of
    # ``group_limits``; None = none) the kernel enforces on all the group's jobs together.
    group: str | None = None
    group_limits: Limits | None = None


class JobState(enum.Enum):
    RUNNING = "RUNNING"
    EXITED = "EXITED"  # the main process exited with exit_code
    KILLED = "KILLED"  # the main process died of ``signal`` (reason flags say why, if known)
    LOST = "LOST"  # found RUNNING in the store at open: the previous server died with it


# The job state machine. A record only ever moves along these edges; anything else is a bug
# in the worker and raises (it is never silently "fixed").
TRANSITIONS: Final[Mapping[JobState, frozenset[JobState]]] = {
    JobState.RUNNING: frozenset({JobState.EXITED, JobState.KILLED, JobState.LOST}),
    JobState.EXITED: frozenset(),
    JobState.KILLED: frozenset(),
    JobState.LOST: frozenset(),
}


def check_transition(old: JobState, new: JobState) -> None:
    if new not in TRANSITIONS[old]:
        raise AssertionError(f"illegal job state transition {old.name} -> {new.name}")


@dataclass(frozen=True, kw_only=True)
class JobStatus:
    job_id: str  # uuid4 string
    owner: str
    command: str
    args: tuple[str, ...]
    state: JobState
    exit_code: int | None  # set when EXITED
    signal: int | None  # set when KILLED
    stopped_by_user: bool  # KILLED by a signal that Worker.stop sent
    oom_killed: bool  # the kernel OOM-killed a process of the job (cgroup drivers only)
    stopped_by_shutdown: bool  # KILLED by a signal the worker sent while shutting down
    created_at: datetime  # aware, UTC
    ended_at: datetime | None
    limits: Limits
    usage: Usage
    output_bytes: int
    output_truncated: bool

    @property
    def ended(self) -> bool:
        return self.state is not JobState.RUNNING


@dataclass(frozen=True, kw_only=True)
class StopResult:
    status: JobStatus
    force_ended: bool  # True only when the stop's signal is what ended the job


@dataclass(frozen=True, kw_only=True)
class OutputChunk:
    offset: int  # offset of data[0] in the job's output
    data: bytes
