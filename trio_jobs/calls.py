"""The JobService calls without I/O: what each sends, what its answer means, and the results.

Shared by the two clients -- :class:`trio_jobs.client.JobsClient` (trio, for programs and
``tail``) and :class:`trio_jobs.blocking.BlockingJobsClient` (one blocking socket, for the
CLI's one-shot commands and scripts) -- so each call is written once. A call is a *plan*: a
generator that yields the unary requests it needs (:class:`Call`) and is sent each
response; its return value is the result. ``ListJobs`` is the plan with several requests
(one per page). A client only moves requests and responses (:func:`drive` shows the loop).

Results are small frozen dataclasses (:class:`JobInfo`, :class:`JobLimits`, ...), not the
worker's classes: a client must not need the server's code. Each carries the proto
message it came from in ``.proto`` for callers who want the wire form (e.g. JSON). Errors
are :class:`JobsError` with the gRPC status ``code`` and the server's message.

Imports protobuf and the rpc status codes only (no trio, no h2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Final, Generic, TypeVar, final

from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from .rpc._status import RpcError, StatusCode
from .v1 import jobs_pb2 as pb

__all__ = [
    "DEFAULT_SERVER",
    "FINAL_STATUS_KEY",
    "SERVICE",
    "Call",
    "JobInfo",
    "JobLimits",
    "JobUsage",
    "JobsError",
    "Plan",
    "StopOutcome",
    "drive",
    "list_plan",
    "parse_server",
    "start_plan",
    "status_plan",
    "stop_plan",
    "translate",
]

DEFAULT_SERVER: Final = "localhost:4567"
SERVICE: Final = "/trio_jobs.v1.JobService/"
# Trailing metadata of a followed StreamOutput (see trio_jobs.service).
FINAL_STATUS_KEY: Final = "trio-jobs-final-status-bin"

_STATE_NAMES: Final = {
    pb.JOB_STATE_UNSPECIFIED: "unknown",
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_EXITED: "exited",
    pb.JOB_STATE_KILLED: "killed",
    pb.JOB_STATE_LOST: "lost",
}

_M = TypeVar("_M", bound=Message)
_T = TypeVar("_T")


class JobsError(Exception):
    """A call failed: ``code`` is the gRPC status, ``message`` says what to do."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def translate(exc: RpcError) -> JobsError:
    """The rpc layer's error as the clients report it."""
    return JobsError(exc.code, exc.message or exc.code.name)


@dataclass(frozen=True, kw_only=True)
class JobLimits:
    """Resource limits; ``None`` = the server's default (in requests) or unlimited (in results)."""

    cpu_millis: int | None = None
    memory_bytes: int | None = None
    io_read_bps: int | None = None
    io_write_bps: int | None = None
    io_read_iops: int | None = None
    io_write_iops: int | None = None
    pids_max: int | None = None

    def to_proto(self) -> pb.ResourceLimits:
        msg = pb.ResourceLimits()
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                setattr(msg, f.name, value)
        return msg

    @classmethod
    def from_proto(cls, msg: pb.ResourceLimits) -> JobLimits:
        present = {field.name: value for field, value in msg.ListFields()}
        return cls(**{f.name: present.get(f.name) for f in fields(cls)})


@dataclass(frozen=True, kw_only=True)
class JobUsage:
    cpu_usec: int
    memory_peak_bytes: int
    io_read_bytes: int
    io_write_bytes: int


@dataclass(frozen=True, kw_only=True)
class JobInfo:
    """A job's status. ``state`` is "running", "exited", "killed" or "lost"."""

    job_id: str
    owner: str
    command: str
    args: tuple[str, ...]
    state: str
    exit_code: int | None
    signal: int | None
    stopped_by_user: bool
    oom_killed: bool
    stopped_by_shutdown: bool
    created_at: datetime
    ended_at: datetime | None
    limits: JobLimits
    usage: JobUsage
    output_bytes: int
    output_truncated: bool
    proto: pb.JobStatus

    @property
    def exit_status(self) -> int | None:
        """A shell-style status: the exit code, or 128 + signal; None while running or lost."""
        if self.exit_code is not None:
            return self.exit_code
        if self.signal is not None:
            return 128 + self.signal
        return None

    @classmethod
    def from_proto(cls, msg: pb.JobStatus) -> JobInfo:
        u = msg.usage
        return cls(
            job_id=msg.job_id,
            owner=msg.owner,
            command=msg.command,
            args=tuple(msg.args),
            state=_STATE_NAMES.get(msg.state, "unknown"),
            exit_code=msg.exit_code if msg.HasField("exit_code") else None,
            signal=msg.signal if msg.HasField("signal") else None,
            stopped_by_user=msg.stopped_by_user,
            oom_killed=msg.oom_killed,
            stopped_by_shutdown=msg.stopped_by_shutdown,
            created_at=msg.created_at.ToDatetime(tzinfo=UTC),
            ended_at=msg.ended_at.ToDatetime(tzinfo=UTC) if msg.HasField("ended_at") else None,
            limits=JobLimits.from_proto(msg.limits),
            usage=JobUsage(
                cpu_usec=u.cpu_usec,
                memory_peak_bytes=u.memory_peak_bytes,
                io_read_bytes=u.io_read_bytes,
                io_write_bytes=u.io_write_bytes,
            ),
            output_bytes=msg.output_bytes,
            output_truncated=msg.output_truncated,
            proto=msg,
        )


@dataclass(frozen=True, kw_only=True)
class StopOutcome:
    job: JobInfo
    force_ended: bool  # True only when this stop is what ended the job


def parse_server(server: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port). Raises ValueError."""
    host, sep, port_text = server.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"invalid server address {server!r}: use HOST:PORT, e.g. localhost:4567")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


# -- the calls as plans --------------------------------------------------------------------


@final
class Call(Generic[_M]):
    """One unary request of a plan: ``/trio_jobs.v1.JobService/<method>``."""

    __slots__ = ("method", "path", "request", "response_type")

    def __init__(self, method: str, request: Message, response_type: type[_M]) -> None:
        self.method = method
        self.path = SERVICE + method
        self.request = request
        self.response_type = response_type

    def answer(self, response: Message) -> _M:
        """The response the client sent back into the plan, typed."""
        if not isinstance(response, self.response_type):  # a client bug, never the server's
            raise TypeError(f"{self.path} answered with a {type(response).__name__}")
        return response


Plan = Generator["Call[Any]", Message, _T]


def drive(plan: Plan[_T], unary: Callable[[Call[Any]], Message]) -> _T:
    """Run ``plan`` with a blocking ``unary(call) -> response`` (the async client has the
    same loop with an ``await``)."""
    call = next(plan)
    while True:
        try:
            call = plan.send(unary(call))
        except StopIteration as done:
            result: _T = done.value
            return result


def start_plan(
    command: str,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    working_dir: str = "",
    limits: JobLimits | None = None,
) -> Plan[JobInfo]:
    """Start ``command args...`` (no shell): the new job's status."""
    request = pb.StartJobRequest(
        command=command,
        args=list(args),
        env=dict(env or {}),
        working_dir=working_dir,
        limits=(limits or JobLimits()).to_proto(),
    )
    call = Call("StartJob", request, pb.StartJobResponse)
    return JobInfo.from_proto(call.answer((yield call)).status)


def stop_plan(job_id: str, *, grace: float | None = None) -> Plan[StopOutcome]:
    """Stop a job (SIGTERM, ``grace`` seconds, SIGKILL); None = the server's default."""
    request = pb.StopJobRequest(job_id=job_id)
    if grace is not None:
        if not math.isfinite(grace) or grace < 0:
            raise ValueError("grace must be a finite number of seconds >= 0")
        request.grace_period.CopyFrom(
            Duration(seconds=int(grace), nanos=round((grace % 1) * 1e9) % 1_000_000_000)
        )
    call = Call("StopJob", request, pb.StopJobResponse)
    response = call.answer((yield call))
    return StopOutcome(job=JobInfo.from_proto(response.status), force_ended=response.force_ended)


def status_plan(job_id: str) -> Plan[JobInfo]:
    call = Call("GetJobStatus", pb.GetJobStatusRequest(job_id=job_id), pb.JobStatus)
    return JobInfo.from_proto(call.answer((yield call)))


def list_plan(*, all_users: bool = False, page_size: int = 0) -> Plan[pb.ListJobsResponse]:
    """Every job in one ``ListJobsResponse``, however many pages the server answers in
    (``page_size``: jobs per call, 0 lets the server choose)."""
    whole: pb.ListJobsResponse | None = None
    token = ""
    while True:
        request = pb.ListJobsRequest(all_users=all_users, page_size=page_size, page_token=token)
        call = Call("ListJobs", request, pb.ListJobsResponse)
        page = call.answer((yield call))
        if whole is None:
            whole = page  # the only page, mostly: no copy
        else:
            whole.jobs.extend(page.jobs)
        if not page.next_page_token:
            whole.ClearField("next_page_token")
            return whole
        if page.next_page_token == token or not page.jobs:
            raise JobsError(StatusCode.INTERNAL, "the server's ListJobs pages do not advance")
        token = page.next_page_token
