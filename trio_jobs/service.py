"""JobService: the proto API (``trio_jobs.v1``) mapped onto the worker and the policy.

This module is the only bridge between :mod:`trio_jobs.worker` (jobs, no protobuf) and
:mod:`trio_jobs.rpc` (gRPC, no jobs). Every handler:

1. looks the caller up in the policy by ``ctx.peer_identity`` (unknown -> PERMISSION_DENIED);
2. validates the request (-> INVALID_ARGUMENT with a message saying what to fix);
3. calls the worker, translating its errors at the boundary (``WorkerClosed`` ->
   UNAVAILABLE, ``JobNotFound`` -> NOT_FOUND, ``InvalidJobSpec`` -> INVALID_ARGUMENT, any
   other ``WorkerError`` of a start, e.g. a full disk -> UNAVAILABLE with its message).

Another user's job is reported exactly like a job that does not exist (same code, same
message), so nobody learns which job ids exist. A job id that is not a UUID is
INVALID_ARGUMENT: it can never name a job, and saying so helps the user more.

The program of a StartJob is resolved here, against the job's fixed PATH (never the server's
and never the ``PATH`` of the request's env), and the *resolved* absolute path is what the
policy checks and what the worker executes, so the check and the execution cannot disagree.
"""

from __future__ import annotations

import base64
import bisect
import collections
import contextlib
import itertools
import logging
import os
import sys
import uuid
from dataclasses import fields
from typing import TYPE_CHECKING, Final, NoReturn, cast, final

import trio
from google.protobuf.timestamp_pb2 import Timestamp

from .audit import audited, stream_opened
from .rpc import Method, RpcError, Serialized, StatusCode
from .security.dynamic_users import DynamicUsers
from .security.errors import PermissionDenied, PolicyError
from .security.policy import TOTAL_FIELDS, LimitAboveCap, QuotaExceeded
from .v1 import jobs_pb2 as pb
from .worker import (
    DEFAULT_LIMITS,
    JOB_PATH,
    InvalidArgument,
    InvalidJobSpec,
    JobNotFound,
    JobSpec,
    JobState,
    Limits,
    RunAs,
    Usage,
    WorkerClosed,
    WorkerError,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping
    from datetime import datetime

    from .audit import AuditLog
    from .rpc import ServerContext
    from .security.policy import IdentityPolicy, Policy, UnixUser
    from .worker import JobStatus, Worker
    from .worker.validate import ProgramFile

__all__ = [
    "DEFAULT_MAX_STREAMS_PER_IDENTITY",
    "FINAL_STATUS_KEY",
    "MAX_ARGS_BYTES",
    "MAX_GRACE_SECONDS",
    "JobService",
    "effective_limits",
    "job_service_methods",
    "limits_to_proto",
    "output_chunk",
    "status_to_proto",
    "usage_to_proto",
]

log = logging.getLogger(__name__)

MAX_GRACE_SECONDS: Final = 3600.0
"""An upper bound on StopJob's grace period, so one request cannot pin a job for years."""

MAX_ARGS_BYTES: Final = 1 << 20
"""argv + env of one job, in bytes (the kernel's own limit is a few MiB; keep well under)."""

DEFAULT_MAX_STREAMS_PER_IDENTITY: Final = 64
"""Concurrent StreamOutput calls one identity may hold open. Each costs a handler task and a
reader (a few KiB, no output buffered), but nothing else bounds them across connections: the
rpc layer caps streams per *connection* (100) and connections per *server* (1000), so one
certificate could otherwise hold 100,000 followers."""

_STATES: Final = {
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.EXITED: pb.JOB_STATE_EXITED,
    JobState.KILLED: pb.JOB_STATE_KILLED,
    JobState.LOST: pb.JOB_STATE_LOST,
}

LIMIT_FIELDS: Final = tuple(f.name for f in fields(Limits))

FINAL_STATUS_KEY: Final = "trio-jobs-final-status-bin"
"""Trailing metadata of a followed StreamOutput: the ended job's serialized JobStatus."""

LIST_CACHE_BUDGET: Final = 8 << 20
"""Bytes the ListJobs cache of ended jobs may use (see :class:`ListParts`): about 22,000
ended jobs like ``/bin/true`` (a 131-byte part + the overhead below = ~380 bytes each)."""
LIST_CACHE_ENTRY_OVERHEAD: Final = 160
"""What one cache entry costs besides its serialized part, in bytes, as counted against the
budget: the job id string (85), the bytes object's header (33) and the dict slot (~21-42
with its growth), measured with sys.getsizeof and tracemalloc on CPython 3.11."""
LIST_CACHE_MAX_PART: Final = 16 << 10
"""A bigger part (a job with very long arguments) is never cached: it would crowd out ~50
ordinary ones, and converting it again costs little next to sending it."""
LIST_CONVERT_IN_THREAD: Final = 64
"""More cache misses than this (e.g. the first list after a restart) are converted in a
worker thread, so a cold list of a long history does not hold up every other call."""
STATUS_CACHE_BUDGET: Final = 4 << 20
"""Bytes the GetJobStatus cache of ended jobs may use (see :class:`FinalStatuses`): about
11,000 ended jobs like ``/bin/true`` (a 123-byte status + the overhead below)."""
STATUS_CACHE_ENTRY_OVERHEAD: Final = 240
"""What one entry of that cache costs besides its serialized status, in bytes: the job id
string (85), the bytes object's header (33), the (owner, status) tuple (56; the owner string
is interned, one per identity) and the ordered dict's slot and link (~70), measured with
tracemalloc on CPython 3.11 (~240 per entry over 20,000 entries)."""
LIST_PAGE_BYTES: Final = (4 << 20) - (64 << 10)
"""The most bytes of jobs in one ListJobs answer: under the 4 MiB message limit that gRPC
clients apply by default (ours and grpcio's), so no client ever gets RESOURCE_EXHAUSTED."""

LIST_CONCURRENCY: Final = 4
"""ListJobs pages built at once, server-wide, and one at a time per identity; further calls
wait their turn (FIFO). A page is CPU work on the one event loop, so running more at once
makes none of them faster; it only multiplies the memory they hold meanwhile (up to a page
of parts and a batch of conversions each). Unbounded, 200 soak clients listing ~2,000 jobs
each kept a dozen pages in flight, and every new peak of small objects left the server's
heap larger for good (pymalloc frees an arena only when all its objects are gone). Per
identity, so that one user's burst of lists holds at most one of the slots. Sending a
finished page is outside the bound."""

PAGE_TOKEN_VERSION: Final = "p2"
LIST_SLICE: Final = 16384
"""Job ids read (and parts looked up) at a time while filling a page: more than a full page
holds (~11,000 jobs), so an unpaged list of a long history is one store query."""
LIST_CONVERT_BATCH: Final = 512
"""Jobs whose part is not cached are read and converted this many at a time. A status is
~2 KB of Python objects while it is converted: a list of 16,384 misses (a history beyond
the cache's budget) made the server's heap peak ~30 MB higher per call. This bounds one
call; ``LIST_CONCURRENCY`` bounds how many run at once."""



# -- conversions -------------------------------------------------------------------------


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


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def output_chunk(data: bytes, offset: int) -> Serialized:
    """``pb.OutputChunk(data=data, offset=offset)`` serialized by hand: the same bytes as
    its ``SerializeToString()`` (field 1, then field 2, proto3 defaults left out), without
    first copying ``data`` (64 KiB a chunk) into a message object. ``offset`` >= 0."""
    head = b"\x0a" + _varint(len(data)) if data else b""
    tail = b"\x10" + _varint(offset) if offset else b""
    return Serialized(b"".join((head, data, tail)))


def _list_parts(statuses: dict[str, JobStatus]) -> dict[str, bytes]:
    return {job_id: list_part(status) for job_id, status in statuses.items()}


def list_part(status: JobStatus) -> bytes:
    """``status`` as a serialized one-job ``ListJobsResponse`` (the ``jobs`` field's tag,
    length and the JobStatus: concatenated parts parse as one ListJobsResponse)."""
    return pb.ListJobsResponse(jobs=[status_to_proto(status)]).SerializeToString()


@final
class ListParts:
    """The serialized ``ListJobs`` parts of ended jobs, which never change again.

    A list of 10,000 jobs used to read and parse 10,000 records and convert each to a proto
    on every call (~0.4-1.5 s here); with this, a call reads only the ids (one column) and
    the statuses of the jobs it has no part for, and joins bytes. Only ended statuses are
    added: a running job is always read live.

    Bounded: at most ``budget`` bytes, counting each entry as its part plus
    ``LIST_CACHE_ENTRY_OVERHEAD``. A full cache takes no new entries and evicts none: a list
    reads every job of its caller, so under a scan of more jobs than fit, keeping the cached
    set stable costs (history - capacity) conversions a call, while any eviction order
    (LRU, FIFO) would evict each entry before its next use and miss every time.
    """

    def __init__(self, budget: int = LIST_CACHE_BUDGET) -> None:
        self._parts: dict[str, bytes] = {}
        self._budget = budget
        self._used = 0

    def __len__(self) -> int:
        return len(self._parts)

    @property
    def used(self) -> int:
        """Bytes counted against the budget."""
        return self._used

    def get(self, job_id: str) -> bytes | None:
        return self._parts.get(job_id)

    def lookup(self, job_ids: list[str]) -> list[bytes | None]:
        """The part of each of ``job_ids`` (None if not cached), in their order."""
        return list(map(self._parts.get, job_ids))

    def add(self, job_id: str, part: bytes) -> None:
        """Keep an *ended* job's part, if it fits."""
        cost = len(part) + LIST_CACHE_ENTRY_OVERHEAD
        if job_id in self._parts or len(part) > LIST_CACHE_MAX_PART or self._used + cost > self._budget:
            return
        self._parts[job_id] = part
        self._used += cost

    def discard(self, job_ids: Iterable[str]) -> None:
        """Forget these jobs (retention deleted them), freeing their share of the budget."""
        for job_id in job_ids:
            part = self._parts.pop(job_id, None)
            if part is not None:
                self._used -= len(part) + LIST_CACHE_ENTRY_OVERHEAD


def final_entry(status: JobStatus) -> tuple[str, bytes]:
    """(owner, serialized JobStatus) of an ended job: what :class:`FinalStatuses` keeps."""
    return sys.intern(status.owner), status_to_proto(status).SerializeToString()


@final
class FinalStatuses:
    """The serialized ``JobStatus`` of ended jobs, with their owners, for GetJobStatus.

    Polling the status of recent jobs is the most common call a script makes. An ended job's
    status never changes again, so it is answered from here: no thread hop into the store,
    no conversion -- the bytes go out as they are (``Serialized``), at the cost of the health
    check. Filled when a job of this run ends (``Worker.add_end_listener``) and when a
    GetJobStatus reads an ended job from the store (the first after a restart); a running
    job is never kept (its usage is read live).

    Bounded: at most ``budget`` bytes, counting each entry as its status plus
    ``STATUS_CACHE_ENTRY_OVERHEAD``; a status bigger than ``LIST_CACHE_MAX_PART`` (very long
    arguments) is never kept. Least recently used first out, unlike :class:`ListParts`:
    status calls come back to a few jobs again and again rather than scan every job in
    turn. An evicted job is read from the store again.

    Retention deletes jobs (``Worker.add_deletion_listener`` -> :meth:`discard`), and a
    deleted job must answer NOT_FOUND, never from here. A reader that took a status from
    the store and then waited could otherwise keep a job deleted meanwhile: it notes
    :attr:`deletions` before it reads and passes it to :meth:`add`, which keeps nothing if
    any deletion happened since.
    """

    def __init__(self, budget: int = STATUS_CACHE_BUDGET) -> None:
        self._entries: collections.OrderedDict[str, tuple[str, bytes]] = collections.OrderedDict()
        self._budget = budget
        self._used = 0
        self.deletions = 0  # calls of discard() so far

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    @property
    def used(self) -> int:
        """Bytes counted against the budget."""
        return self._used

    def get(self, job_id: str) -> tuple[str, bytes] | None:
        """(owner, serialized status) of an ended job, if kept (it becomes the most recent)."""
        entry = self._entries.get(job_id)
        if entry is not None:
            self._entries.move_to_end(job_id)
        return entry

    def add(self, job_id: str, entry: tuple[str, bytes], *, deletions: int | None = None) -> None:
        """Keep an *ended* job's entry (see :func:`final_entry`), evicting the least recently
        used as needed; nothing if ``deletions`` is given and differs from :attr:`deletions`."""
        cost = len(entry[1]) + STATUS_CACHE_ENTRY_OVERHEAD
        if (deletions is not None and deletions != self.deletions) or len(entry[1]) > LIST_CACHE_MAX_PART \
                or cost > self._budget or job_id in self._entries:
            return
        while self._used + cost > self._budget:
            _, (_, old) = self._entries.popitem(last=False)
            self._used -= len(old) + STATUS_CACHE_ENTRY_OVERHEAD
        self._entries[job_id] = entry
        self._used += cost

    def discard(self, job_ids: Iterable[str]) -> None:
        """Forget these jobs (retention deleted them)."""
        self.deletions += 1
        for job_id in job_ids:
            entry = self._entries.pop(job_id, None)
            if entry is not None:
                self._used -= len(entry[1]) + STATUS_CACHE_ENTRY_OVERHEAD


def _page_token(position: int) -> str:
    return base64.urlsafe_b64encode(f"{PAGE_TOKEN_VERSION}:{position}".encode()).decode()


def _page_start(token: str) -> int:
    """The position after which the page starts; INVALID_ARGUMENT for a bad token."""
    try:
        version, position = base64.urlsafe_b64decode(token.encode("ascii")).decode().split(":")
        if version != PAGE_TOKEN_VERSION or int(position) < 0:
            raise ValueError(version)
        return int(position)
    except (ValueError, UnicodeError) as exc:
        raise RpcError(StatusCode.INVALID_ARGUMENT, "page_token is not one this server gave out; "
                       "pass the next_page_token of the previous page, or none for the first page") from exc


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


def _abort(code: StatusCode, message: str) -> NoReturn:
    raise RpcError(code, message)


@final
class JobService:
    """The ``trio_jobs.v1.JobService`` handlers. Serve with
    ``job_service_methods(JobService(...))``.

    The service does not own the worker; whoever opened the worker closes it.
    """

    def __init__(
        self, worker: Worker, policy: Policy, *, max_streams_per_identity: int = DEFAULT_MAX_STREAMS_PER_IDENTITY,
        list_cache_budget: int = LIST_CACHE_BUDGET, list_concurrency: int = LIST_CONCURRENCY,
        dynamic_users: DynamicUsers | None = None, status_cache_budget: int = STATUS_CACHE_BUDGET,
    ) -> None:
        if max_streams_per_identity < 1:
            raise ValueError(f"max_streams_per_identity must be at least 1 (got {max_streams_per_identity})")
        if list_concurrency < 1:
            raise ValueError(f"list_concurrency must be at least 1 (got {list_concurrency})")
        self._worker = worker
        # A root server runs each non-admin identity without run_as as a user of its own;
        # the server keeps them in its state directory, an embedder gets them in memory.
        self._dynamic_users = dynamic_users if dynamic_users is not None else DynamicUsers(None)
        self._list_parts = ListParts(list_cache_budget)
        worker.add_deletion_listener(self._list_parts.discard)  # deleted jobs free their room
        self._finals = FinalStatuses(status_cache_budget)
        worker.add_deletion_listener(self._finals.discard)
        worker.add_end_listener(self._job_ended)
        self._list_slots = trio.Semaphore(list_concurrency)
        self._list_locks: dict[str, trio.Lock] = {}  # one per identity of the policy: bounded
        self._policy = policy
        self._max_streams = max_streams_per_identity
        # identity -> StreamOutput calls it has open now (entries removed at zero, so the
        # dict holds only identities with a stream open: bounded by the policy's identities)
        self._streams: dict[str, int] = {}
        # StartJob checks "fewer than N running" and then starts; two concurrent requests of
        # one user must not both pass the check, so each identity's checks and starts are
        # serialized -- per identity, so that one user's starts never queue behind another's
        # (one lock per identity of the policy: bounded).
        self._start_locks: dict[str, trio.Lock] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _caller(self, ctx: ServerContext) -> IdentityPolicy:
        try:
            return self._policy.lookup(ctx.peer_identity)
        except PermissionDenied as exc:
            # A certificate that names no identity of the policy gets this answer once,
            # then GOAWAY and a close: it must not hold a connection slot (DESIGN §3).
            ctx.close_connection()
            _abort(StatusCode.PERMISSION_DENIED, str(exc))

    @staticmethod
    def _job_id(raw: str) -> str:
        try:
            return str(uuid.UUID(raw))
        except ValueError:
            shown = raw if len(raw) <= 64 else raw[:64] + "..."
            _abort(
                StatusCode.INVALID_ARGUMENT,
                f"job id {shown!r} is not a UUID; use the id that 'trio-jobs start' printed "
                "(see 'trio-jobs list')",
            )

    @staticmethod
    def _not_found(job_id: str) -> NoReturn:
        _abort(StatusCode.NOT_FOUND, f"no job {job_id} of yours; see 'trio-jobs list' for your jobs")

    async def _visible_status(self, who: IdentityPolicy, job_id: str) -> JobStatus:
        try:
            status = await self._worker.status(job_id)
        except JobNotFound:
            self._not_found(job_id)
        except WorkerClosed:
            self._unavailable()
        if status.owner != who.name and not who.admin:
            self._not_found(job_id)
        return status

    def _job_ended(self, status: JobStatus) -> None:
        """A job of this run has ended: its status is the next one scripts poll for."""
        self._finals.add(status.job_id, final_entry(status))

    async def _final_or_status(self, who: IdentityPolicy, job_id: str) -> tuple[str, bytes] | JobStatus:
        """What :meth:`_visible_status` finds; an ended job's as (owner, serialized status),
        kept in :class:`FinalStatuses` for the next call."""
        deletions = self._finals.deletions
        status = await self._visible_status(who, job_id)
        if not status.ended:
            return status
        entry = final_entry(status)
        self._finals.add(job_id, entry, deletions=deletions)
        return entry

    @staticmethod
    def _unavailable() -> NoReturn:
        _abort(StatusCode.UNAVAILABLE, "the server is shutting down; retry once it is back")

    # -- RPCs ------------------------------------------------------------------------------

    async def StartJob(self, request: pb.StartJobRequest, ctx: ServerContext) -> pb.StartJobResponse:
        who = self._caller(ctx)
        if not request.command:
            _abort(StatusCode.INVALID_ARGUMENT, "no command given; pass the program to run, e.g. 'echo'")
        working_dir = request.working_dir or "/"
        if not os.path.isabs(working_dir):
            _abort(StatusCode.INVALID_ARGUMENT, f"working_dir {working_dir!r} must be an absolute path")
        size = len(request.command) + sum(len(a) + 1 for a in request.args)
        size += sum(len(k) + len(v) + 2 for k, v in request.env.items())
        if size > MAX_ARGS_BYTES:
            _abort(StatusCode.INVALID_ARGUMENT, f"command, args and env take {size} bytes, over the limit of {MAX_ARGS_BYTES}")
        for text in (request.command, *request.args, *request.env.keys(), *request.env.values()):
            if "\0" in text:
                _abort(StatusCode.INVALID_ARGUMENT, "command, args and env must not contain NUL characters")
        for key in request.env:
            if not key or "=" in key:
                _abort(StatusCode.INVALID_ARGUMENT, f"environment variable name {key!r} is invalid (empty or contains '=')")
        try:
            limits = effective_limits(request.limits, who.max_limits)
        except ValueError as exc:
            _abort(StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            self._policy.check_limits(who, {name: getattr(limits, name) for name in LIMIT_FIELDS})
        except LimitAboveCap as exc:
            _abort(StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            self._policy.check_env(who, request.env.keys())
        except PermissionDenied as exc:
            _abort(StatusCode.PERMISSION_DENIED, str(exc))
        quota: QuotaExceeded | None = None

        def build() -> JobSpec:
            """In the worker's start thread, before anything is created: the user lookup."""
            try:
                run_as = run_as_of(self._policy.resolve_run_as(who, dynamic=self._dynamic_users))
            except PolicyError as exc:
                _abort(StatusCode.FAILED_PRECONDITION, f"{exc}; ask the server's operator to fix the policy")
            return JobSpec(
                command=request.command,
                args=tuple(request.args),
                env=dict(request.env),
                working_dir=working_dir,
                limits=limits,
                owner=who.name,
                run_as=run_as,
                group=who.name,
                group_limits=Limits(**{name: who.max_total.get(name) for name in TOTAL_FIELDS}),
            )

        def authorize(program: ProgramFile) -> str:
            """In the same thread, once the job's user has opened the program: the policy's
            check of that very file; returns the path to execute."""
            try:
                path = self._policy.check_program(
                    who, program.path, file_id=(program.dev, program.ino), search_path=JOB_PATH)
            except PermissionDenied as exc:
                _abort(StatusCode.PERMISSION_DENIED, str(exc))
            if quota is not None:  # reported after the checks above, as it always was
                raise quota
            return path

        async with self._start_locks.setdefault(who.name, trio.Lock()):
            try:
                self._policy.check_running_jobs(who, self._worker.running_count(owner=who.name))
            except QuotaExceeded as exc:
                quota = exc
            try:
                # One thread call for the checks above and the whole start (worker/launch.py).
                status = await self._worker.start_with(build, authorize)
            except QuotaExceeded as exc:
                _abort(StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except InvalidJobSpec as exc:
                _abort(StatusCode.INVALID_ARGUMENT, str(exc))
            except WorkerClosed:
                self._unavailable()
            except WorkerError as exc:  # the host refused (disk full, cgroup error, ...): retryable
                log.warning("StartJob for %s failed: %s", who.name, exc)
                _abort(StatusCode.UNAVAILABLE, f"the server could not start the job: {exc}; retry later or ask its operator")
        return pb.StartJobResponse(job_id=status.job_id, status=status_to_proto(status))

    async def StopJob(self, request: pb.StopJobRequest, ctx: ServerContext) -> pb.StopJobResponse:
        who = self._caller(ctx)
        job_id = self._job_id(request.job_id)
        grace: float | None = None
        if request.HasField("grace_period"):
            d = request.grace_period
            if d.seconds < 0 or d.nanos < 0:
                _abort(StatusCode.INVALID_ARGUMENT, "grace_period must not be negative; use 0 to kill at once")
            if d.nanos >= 1_000_000_000:
                _abort(StatusCode.INVALID_ARGUMENT, "grace_period.nanos must be below 1e9")
            grace = d.seconds + d.nanos / 1e9
            if grace > MAX_GRACE_SECONDS:
                _abort(StatusCode.INVALID_ARGUMENT, f"grace_period {grace:g}s is too long; use at most {MAX_GRACE_SECONDS:g}s")
        await self._visible_status(who, job_id)
        try:
            result = await self._worker.stop(job_id, grace=grace)
        except JobNotFound:
            self._not_found(job_id)
        except WorkerClosed:
            self._unavailable()
        return pb.StopJobResponse(status=status_to_proto(result.status), force_ended=result.force_ended)

    async def GetJobStatus(self, request: pb.GetJobStatusRequest, ctx: ServerContext) -> pb.JobStatus | Serialized:
        who = self._caller(ctx)
        # An ended job from memory (FinalStatuses): no thread, no conversion, no checkpoint,
        # the cost of the health check. The keys are canonical ids; another spelling of one
        # (upper case, braces) misses here and is canonicalized below.
        found = self._finals.get(request.job_id)
        if found is not None:
            owner, data = found
            if owner != who.name and not who.admin:  # what _visible_status answers
                self._not_found(request.job_id)
            return Serialized(data)
        answer = await self._final_or_status(who, self._job_id(request.job_id))
        if isinstance(answer, tuple):
            return Serialized(answer[1])
        return status_to_proto(answer)  # running: usage read live, never kept

    async def StreamOutput(
        self,
        request: pb.StreamOutputRequest,
        ctx: ServerContext,
        send: Callable[[pb.OutputChunk | Serialized], Awaitable[None]],
    ) -> None:
        who = self._caller(ctx)
        job_id = self._job_id(request.job_id)
        if request.offset < 0:
            _abort(StatusCode.INVALID_ARGUMENT, f"offset {request.offset} is negative; use 0 for the start")
        open_now = self._streams.get(who.name, 0)
        if open_now >= self._max_streams:
            _abort(
                StatusCode.RESOURCE_EXHAUSTED,
                f"{who.name} already has {open_now} output streams open, the most allowed at once; "
                "end some 'trio-jobs tail' commands and retry",
            )
        self._streams[who.name] = open_now + 1
        try:
            await self._stream_output(who, job_id, request, ctx, send)
        finally:
            left = self._streams[who.name] - 1
            if left:
                self._streams[who.name] = left
            else:
                del self._streams[who.name]

    @property
    def list_parts(self) -> ListParts:
        """The ListJobs cache of ended jobs (for tests and monitoring)."""
        return self._list_parts

    @property
    def final_statuses(self) -> FinalStatuses:
        """The GetJobStatus cache of ended jobs (for tests and monitoring)."""
        return self._finals

    def open_streams(self, identity: str) -> int:
        """StreamOutput calls ``identity`` has open now (for tests and monitoring)."""
        return self._streams.get(identity, 0)

    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        """Use ``policy`` from the next call on (SIGHUP: trio_jobs/reload.py). Every call
        looks its caller up afresh, so an identity the new policy drops is refused on its
        next call, on connections opened before too; its running jobs are not touched."""
        self._policy = policy

    async def _stream_output(
        self,
        who: IdentityPolicy,
        job_id: str,
        request: pb.StreamOutputRequest,
        ctx: ServerContext,
        send: Callable[[pb.OutputChunk | Serialized], Awaitable[None]],
    ) -> None:
        await self._visible_status(who, job_id)
        try:
            reader = self._worker.follow(job_id, request.offset, wait=request.follow)
        except InvalidArgument as exc:
            _abort(StatusCode.INVALID_ARGUMENT, str(exc))
        except JobNotFound:
            self._not_found(job_id)
        except WorkerClosed:
            self._unavailable()
        stream_opened()  # the audit log's "StreamOutput opened" (trio_jobs/audit.py)
        try:
            # The reader keeps only an offset; `send` waits for the client's flow-control
            # window, so a slow follower holds back only itself.
            async for chunk in reader:
                await send(output_chunk(chunk.data, chunk.offset))
        except JobNotFound:  # retention deleted the job before the reader needed its file
            self._not_found(job_id)
        finally:
            await reader.aclose()
        if request.follow:
            # The job has ended. Its final status rides in the trailers, so a follower needs
            # no second call -- which a server that is shutting down (GOAWAY) would refuse.
            with contextlib.suppress(JobNotFound, WorkerClosed):
                final = self._finals.get(job_id)  # usually there: the job's end put it there
                if final is None:
                    deletions = self._finals.deletions
                    status = await self._worker.status(job_id)
                    final = final_entry(status)
                    if status.ended:
                        self._finals.add(job_id, final, deletions=deletions)
                ctx.set_trailing_metadata(((FINAL_STATUS_KEY, final[1]),))

    async def ListJobs(self, request: pb.ListJobsRequest, ctx: ServerContext) -> Serialized:
        who = self._caller(ctx)
        if request.all_users and not who.admin:
            _abort(StatusCode.PERMISSION_DENIED, "only admins may list every user's jobs; drop --all to list yours")
        if request.page_size < 0:
            _abort(StatusCode.INVALID_ARGUMENT, f"page_size must be >= 0 (0: as many as fit), not {request.page_size}")
        position = _page_start(request.page_token) if request.page_token else 0
        owner = None if request.all_users else who.name
        wanted = request.page_size or None  # None: as many as fit in LIST_PAGE_BYTES
        async with self._list_locks.setdefault(who.name, trio.Lock()), self._list_slots:
            return await self._list_page(owner, position, wanted)

    async def _list_page(self, owner: str | None, position: int, wanted: int | None) -> Serialized:
        parts: list[bytes] = []
        size = 0
        try:
            # Only the page is read and converted, a slice of ids at a time: the cost of a
            # call (time, and the memory it takes meanwhile) does not grow with the history.
            while True:
                limit = LIST_SLICE if wanted is None else min(LIST_SLICE, wanted - len(parts))
                rows = await self._worker.job_page(owner=owner, after=position, limit=limit + 1)
                more = len(rows) > limit
                rows = rows[:limit]
                last = rows[-1][0] if rows else position
                found = await self._list_parts_of([job_id for _, job_id in rows])
                if None in found:  # a record that retention deleted meanwhile: skip it
                    kept = [i for i, part in enumerate(found) if part is not None]
                    rows, found = [rows[i] for i in kept], [found[i] for i in kept]
                page = cast("list[bytes]", found)
                # The cut, by bisection of the running sizes (no Python step per job): as
                # many as fit in LIST_PAGE_BYTES, and a page holds at least one job.
                ends = list(itertools.accumulate(map(len, page), initial=size))[1:]
                fit = bisect.bisect_right(ends, LIST_PAGE_BYTES)
                if fit == 0 and not parts and page:
                    fit = 1
                if fit < len(page):
                    parts += page[:fit]
                    return self._page(parts, rows[fit - 1][0] if fit else position)
                parts += page
                size = ends[-1] if ends else size
                position = last
                if not more:
                    return self._page(parts, 0)
                if wanted is not None and len(parts) >= wanted:
                    return self._page(parts, position)
        except WorkerClosed:
            self._unavailable()

    @staticmethod
    def _page(parts: list[bytes], next_position: int) -> Serialized:
        """The page as a serialized ListJobsResponse: the parts are its ``jobs`` field
        already (see :func:`list_part`), then ``next_page_token`` (field 2) if any. Sent as
        it is, without parsing it into a message and serializing that again."""
        if next_position:
            token = _page_token(next_position).encode()
            parts.append(b"\x12" + _varint(len(token)) + token)
        return Serialized(b"".join(parts))

    async def _list_parts_of(self, job_ids: list[str]) -> list[bytes | None]:
        """The serialized ListJobs part of each job, in order (None: no such record):
        cached for ended jobs, else converted ``LIST_CONVERT_BATCH`` at a time (in a
        thread when there are many) and cached if the job has ended."""
        cache = self._list_parts
        found = cache.lookup(job_ids)
        if None not in found:
            await trio.lowlevel.checkpoint()
            return found
        misses = [job_id for job_id, part in zip(job_ids, found, strict=True) if part is None]
        fresh: dict[str, bytes] = {}
        for at in range(0, len(misses), LIST_CONVERT_BATCH):
            statuses = await self._worker.statuses(misses[at : at + LIST_CONVERT_BATCH])
            if len(statuses) > LIST_CONVERT_IN_THREAD:
                converted = await trio.to_thread.run_sync(_list_parts, statuses)
            else:
                converted = _list_parts(statuses)
            for job_id, part in converted.items():
                fresh[job_id] = part
                if statuses[job_id].ended:
                    cache.add(job_id, part)
        return [fresh.get(job_id) if part is None else part for job_id, part in zip(job_ids, found, strict=True)]


def job_service_methods(service: JobService, *, audit: AuditLog | None = None) -> list[Method]:
    """The ``trio_jobs.v1.JobService`` methods of ``service`` for an rpc ``Server``, each
    call logged to ``audit`` when there is one (trio_jobs/audit.py).

    Spelled out, not bound by name from the descriptor (``rpc.service_from_descriptor``),
    so that the type checker holds each handler to its request and response messages;
    tests/rpc/test_method_types.py checks the table against the descriptor."""
    path = "/trio_jobs.v1.JobService/"
    methods: list[Method] = [
        Method(path=path + "StartJob", request_type=pb.StartJobRequest, response_type=pb.StartJobResponse,
               handler=service.StartJob),
        Method(path=path + "StopJob", request_type=pb.StopJobRequest, response_type=pb.StopJobResponse,
               handler=service.StopJob),
        Method(path=path + "GetJobStatus", request_type=pb.GetJobStatusRequest, response_type=pb.JobStatus,
               handler=service.GetJobStatus),
        Method(path=path + "StreamOutput", request_type=pb.StreamOutputRequest, response_type=pb.OutputChunk,
               handler=service.StreamOutput, server_streaming=True),
        Method(path=path + "ListJobs", request_type=pb.ListJobsRequest, response_type=pb.ListJobsResponse,
               handler=service.ListJobs),
    ]  # fmt: skip
    return methods if audit is None else audited(methods, audit)
