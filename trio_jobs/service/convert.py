"""Conversions between the worker's values and the proto messages, and the limits merge.

The worker knows no protobuf and the proto knows no worker: this module maps one onto the
other (a job's status, limits and usage to their messages; a request's limits, with the
defaults and the caller's caps, to the worker's :class:`~trio_jobs.worker.Limits`).
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Final

from google.protobuf.timestamp_pb2 import Timestamp

from ..v1 import jobs_pb2 as pb
from ..worker import DEFAULT_LIMITS, JobState, Limits, RunAs, Usage

if TYPE_CHECKING:
    from collections.abc import Mapping
    from datetime import datetime

    from ..security.policy import UnixUser
    from ..worker import JobStatus

_STATES: Final = {
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.EXITED: pb.JOB_STATE_EXITED,
    JobState.KILLED: pb.JOB_STATE_KILLED,
    JobState.LOST: pb.JOB_STATE_LOST,
}

LIMIT_FIELDS: Final = tuple(f.name for f in fields(Limits))
"""The limit names, in ``Limits``' order: the service's one name for them. security/ keeps
its own copy (``security.policy.LIMIT_FIELDS``: it may not import the worker);
tests/service/test_shared_names.py holds the two equal."""


def _timestamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def limits_to_proto(limits: Limits) -> pb.ResourceLimits:
    """Unset (unlimited) fields stay unset in the proto."""
    msg = pb.ResourceLimits()
    for name in LIMIT_FIELDS:
        value = getattr(limits, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def usage_to_proto(usage: Usage) -> pb.ResourceUsage:
    return pb.ResourceUsage(
        cpu_usec=usage.cpu_usec,
        memory_peak_bytes=usage.memory_peak_bytes,
        io_read_bytes=usage.io_read_bytes,
        io_write_bytes=usage.io_write_bytes,
    )


def status_to_proto(status: JobStatus) -> pb.JobStatus:
    msg = pb.JobStatus(
        job_id=status.job_id,
        owner=status.owner,
        command=status.command,
        args=list(status.args),
        state=_STATES[status.state],
        stopped_by_user=status.stopped_by_user,
        oom_killed=status.oom_killed,
        stopped_by_shutdown=status.stopped_by_shutdown,
        created_at=_timestamp(status.created_at),
        limits=limits_to_proto(status.limits),
        usage=usage_to_proto(status.usage),
        output_bytes=status.output_bytes,
        output_truncated=status.output_truncated,
    )
    if status.exit_code is not None:
        msg.exit_code = status.exit_code
    if status.signal is not None:
        msg.signal = status.signal
    if status.ended_at is not None:
        msg.ended_at.CopyFrom(_timestamp(status.ended_at))
    return msg


def effective_limits(requested: pb.ResourceLimits, caps: Mapping[str, int]) -> Limits:
    """The request's limits with the defaults filled in, checked against the caller's caps.

    A default above the cap is lowered to the cap (the user asked for nothing); a requested
    value above it is left for ``Policy.check_limits`` to refuse (the user asked for it).
    Raises ValueError (non-positive value) with the message for the user.
    """
    values: dict[str, int | None] = {}
    present = {field.name: int(value) for field, value in requested.ListFields()}
    for name in LIMIT_FIELDS:
        cap = caps.get(name)
        default: int | None = getattr(DEFAULT_LIMITS, name)
        if name in present:
            value = present[name]
            if value <= 0:
                raise ValueError(f"limit {name} must be greater than zero (got {value}); leave it unset for the default")
            values[name] = value
        elif default is None:
            values[name] = cap
        else:
            values[name] = default if cap is None else min(default, cap)
    return Limits(**values)


def run_as_of(user: UnixUser | None) -> RunAs | None:
    if user is None:
        return None
    return RunAs(uid=user.uid, gid=user.gid, groups=user.groups, name=user.name, home=user.home)
