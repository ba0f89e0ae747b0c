"""JobService: the RPC handlers, and the method table that serves them.

Every handler:

1. looks the caller up in the policy by ``ctx.peer_identity`` (unknown -> PERMISSION_DENIED);
2. validates the request (validate.py: INVALID_ARGUMENT with a message saying what to fix);
3. calls the worker, translating its errors at the boundary (``WorkerClosed`` ->
   UNAVAILABLE, ``JobNotFound`` -> NOT_FOUND, ``InvalidJobSpec`` -> INVALID_ARGUMENT, any
   other ``WorkerError`` of a start, e.g. a full disk -> UNAVAILABLE with its message).

Another user's job is reported exactly like a job that does not exist (same code, same
message: refusals.py), so nobody learns which job ids exist. A job id that is not a UUID is
INVALID_ARGUMENT: it can never name a job, and saying so helps the user more.

The program of a StartJob is resolved in the worker's start thread, against the job's fixed
PATH (never the server's and never the ``PATH`` of the request's env), and the *resolved*
file is what the policy checks (``authorize`` below) and what the worker executes, so the
check and the execution cannot disagree.

The work of the two big answers lives beside this module: StreamOutput's sending in
follow.py, ListJobs' pages in paging.py; the caches of ended jobs in caches.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, final

import trio

from ..audit import audited
from ..rpc import Method, Serialized, StatusCode
from ..security.dynamic_users import DynamicUsers
from ..security.errors import PermissionDenied, PolicyError
from ..security.policy import TOTAL_FIELDS, LimitAboveCap, QuotaExceeded
from ..v1 import jobs_pb2 as pb
from ..worker import (
    JOB_PATH,
    InvalidJobSpec,
    JobNotFound,
    JobSpec,
    Limits,
    WorkerClosed,
    WorkerError,
)
from . import validate
from .caches import FinalStatuses, ListParts, final_entry
from .convert import LIMIT_FIELDS, effective_limits, run_as_of, status_to_proto
from .follow import OutputStreams
from .paging import ListPages, page_start
from .refusals import abort, not_found, unavailable
from .tuning import (
    DEFAULT_MAX_STREAMS_PER_IDENTITY,
    LIST_CACHE_BUDGET,
    LIST_CONCURRENCY,
    STATUS_CACHE_BUDGET,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from ..audit import AuditLog
    from ..rpc import ServerContext
    from ..security.policy import IdentityPolicy, Policy
    from ..worker import JobStatus, Worker
    from ..worker.validate import ProgramFile

log = logging.getLogger("trio_jobs.service")


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
        self._pages = ListPages(worker, self._list_parts, concurrency=list_concurrency)
        self._policy = policy
        self._streams = OutputStreams(worker, self._finals, max_per_identity=max_streams_per_identity)
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
            abort(StatusCode.PERMISSION_DENIED, str(exc))

    async def _visible_status(self, who: IdentityPolicy, job_id: str) -> JobStatus:
        try:
            status = await self._worker.status(job_id)
        except JobNotFound:
            not_found(job_id)
        except WorkerClosed:
            unavailable()
        if status.owner != who.name and not who.admin:
            not_found(job_id)
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

    # -- RPCs ------------------------------------------------------------------------------

    async def StartJob(self, request: pb.StartJobRequest, ctx: ServerContext) -> pb.StartJobResponse:
        who = self._caller(ctx)
        working_dir = validate.start_request(request)
        try:
            limits = effective_limits(request.limits, who.max_limits)
        except ValueError as exc:
            abort(StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            self._policy.check_limits(who, {name: getattr(limits, name) for name in LIMIT_FIELDS})
        except LimitAboveCap as exc:
            abort(StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            self._policy.check_env(who, request.env.keys())
        except PermissionDenied as exc:
            abort(StatusCode.PERMISSION_DENIED, str(exc))
        quota: QuotaExceeded | None = None

        def build() -> JobSpec:
            """In the worker's start thread, before anything is created: the user lookup."""
            try:
                run_as = run_as_of(self._policy.resolve_run_as(who, dynamic=self._dynamic_users))
            except PolicyError as exc:
                abort(StatusCode.FAILED_PRECONDITION, f"{exc}; ask the server's operator to fix the policy")
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
                abort(StatusCode.PERMISSION_DENIED, str(exc))
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
                abort(StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except InvalidJobSpec as exc:
                abort(StatusCode.INVALID_ARGUMENT, str(exc))
            except WorkerClosed:
                unavailable()
            except WorkerError as exc:  # the host refused (disk full, cgroup error, ...): retryable
                log.warning("StartJob for %s failed: %s", who.name, exc)
                abort(StatusCode.UNAVAILABLE, f"the server could not start the job: {exc}; retry later or ask its operator")
        return pb.StartJobResponse(job_id=status.job_id, status=status_to_proto(status))

    async def StopJob(self, request: pb.StopJobRequest, ctx: ServerContext) -> pb.StopJobResponse:
        who = self._caller(ctx)
        job_id = validate.job_id(request.job_id)
        grace = validate.grace_period(request)
        await self._visible_status(who, job_id)
        try:
            result = await self._worker.stop(job_id, grace=grace)
        except JobNotFound:
            not_found(job_id)
        except WorkerClosed:
            unavailable()
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
                not_found(request.job_id)
            return Serialized(data)
        answer = await self._final_or_status(who, validate.job_id(request.job_id))
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
        job_id = validate.job_id(request.job_id)
        if request.offset < 0:
            abort(StatusCode.INVALID_ARGUMENT, f"offset {request.offset} is negative; use 0 for the start")
        with self._streams.hold(who.name):
            await self._visible_status(who, job_id)
            await self._streams.send_output(job_id, request, ctx, send)

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
        return self._streams.open(identity)

    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        """Use ``policy`` from the next call on (SIGHUP: trio_jobs/reload.py). Every call
        looks its caller up afresh, so an identity the new policy drops is refused on its
        next call, on connections opened before too; its running jobs are not touched."""
        self._policy = policy

    async def ListJobs(self, request: pb.ListJobsRequest, ctx: ServerContext) -> Serialized:
        who = self._caller(ctx)
        if request.all_users and not who.admin:
            abort(StatusCode.PERMISSION_DENIED, "only admins may list every user's jobs; drop --all to list yours")
        if request.page_size < 0:
            abort(StatusCode.INVALID_ARGUMENT, f"page_size must be >= 0 (0: as many as fit), not {request.page_size}")
        position = page_start(request.page_token) if request.page_token else 0
        owner = None if request.all_users else who.name
        wanted = request.page_size or None  # None: as many as fit in LIST_PAGE_BYTES
        try:
            return await self._pages.page(who.name, owner, position, wanted)
        except WorkerClosed:
            unavailable()


def job_service_methods(service: JobService, *, audit: AuditLog | None = None) -> list[Method]:
    """The ``trio_jobs.v1.JobService`` methods of ``service`` for an rpc ``Server``, each
    call logged to ``audit`` when there is one (trio_jobs/audit.py).

    Spelled out, not bound by name from the descriptor (``rpc.service_from_descriptor``),
    so that the type checker holds each handler to its request and response messages;
    tests/test_typing.py checks the table against the descriptor."""
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
