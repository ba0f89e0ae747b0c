"""BlockingJobsClient: the JobService calls over one blocking TLS connection, without trio.

    with BlockingJobsClient.connect("localhost:4567", cert=..., key=..., ca=...) as jobs:
        job = jobs.start("echo", ["hello"])
        print(jobs.status(job.job_id).state)

For programs that make a few calls and exit -- the CLI's ``start``, ``stop``, ``status`` and
``list`` use it -- and for scripts that do not run trio: it skips the event loop (importing
trio takes longer than a whole call to a local server). The calls themselves are those of
:mod:`trio_jobs.calls`, the same as :class:`trio_jobs.client.JobsClient`'s; following output
(``tail``) needs the trio client.

Every failure is a :class:`~trio_jobs.calls.JobsError` with the gRPC status code. A call
on a connection the server has since closed (it closes idle connections) is made on a new
one: nothing of it was sent, so even a StartJob cannot run twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, TypeVar, final

from .calls import (
    DEFAULT_SERVER,
    JobInfo,
    JobLimits,
    JobsError,
    StopOutcome,
    drive,
    list_plan,
    parse_server,
    start_plan,
    status_plan,
    stop_plan,
    translate,
)
from .rpc._blocking import BlockingChannel
from .rpc._status import RpcError, StatusCode

if TYPE_CHECKING:
    import ssl
    from collections.abc import Mapping, Sequence
    from pathlib import Path
    from types import TracebackType

    from google.protobuf.message import Message

    from .calls import Call, Plan
    from .v1 import jobs_pb2 as pb

__all__ = ["BlockingJobsClient"]

_T = TypeVar("_T")

DEFAULT_TIMEOUT: Final = 60.0


@final
class BlockingJobsClient:
    """One connection to a trio-jobs server. Make it with :meth:`connect`; close it."""

    def __init__(self, *, server: str, ssl_context: ssl.SSLContext, timeout: float | None) -> None:
        self._host, self._port = parse_server(server)
        self._server = server
        self._ssl_context = ssl_context
        #: seconds each call may take (sent as grpc-timeout too); None = no limit
        self.timeout = timeout
        self._channel: BlockingChannel | None = None

    @classmethod
    def connect(
        cls,
        server: str = DEFAULT_SERVER,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        ca: Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> BlockingJobsClient:
        """Connect with mutual TLS: pass ``cert``/``key``/``ca`` paths or an ``ssl_context``."""
        if ssl_context is None:
            if cert is None or key is None or ca is None:
                raise ValueError("BlockingJobsClient.connect needs cert, key and ca (or an ssl_context)")
            from .security.tls import client_ssl_context

            ssl_context = client_ssl_context(cert=cert, key=key, ca=ca)
        client = cls(server=server, ssl_context=ssl_context, timeout=timeout)
        client._channel = client._open()
        return client

    def _open(self) -> BlockingChannel:
        try:
            return BlockingChannel.connect(self._host, self._port, ssl_context=self._ssl_context)
        except RpcError as exc:
            raise translate(exc) from exc

    def __enter__(self) -> BlockingJobsClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _unary(self, call: Call[Any]) -> Message:
        if self._channel is None:
            raise JobsError(StatusCode.UNAVAILABLE, "the client is closed")
        if not self._channel.usable:
            # The server ended this connection before the call was sent (idle timeout,
            # restart): nothing was sent, so any call may go on a new connection.
            self._channel.close()
            self._channel = self._open()
        try:
            response: Message = self._channel.unary(
                call.path, call.request, call.response_type, timeout=self.timeout
            )
        except RpcError as exc:
            raise translate(exc) from exc
        return response

    def _run(self, plan: Plan[_T]) -> _T:
        return drive(plan, self._unary)

    def start(
        self,
        command: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        working_dir: str = "",
        limits: JobLimits | None = None,
    ) -> JobInfo:
        """Start ``command args...`` (no shell). Returns the new job's status."""
        return self._run(start_plan(command, args, env=env, working_dir=working_dir, limits=limits))

    def stop(self, job_id: str, *, grace: float | None = None) -> StopOutcome:
        """Stop a job (SIGTERM, ``grace`` seconds, SIGKILL); None = the server's default."""
        return self._run(stop_plan(job_id, grace=grace))

    def status(self, job_id: str) -> JobInfo:
        return self._run(status_plan(job_id))

    def list_proto(self, *, all_users: bool = False, page_size: int = 0) -> pb.ListJobsResponse:
        """Every job in one ``ListJobsResponse``, however many pages the server answers in."""
        return self._run(list_plan(all_users=all_users, page_size=page_size))

    def list(self, *, all_users: bool = False) -> list[JobInfo]:
        """Your jobs, oldest first; ``all_users`` (admins only) for everybody's."""
        return [JobInfo.from_proto(j) for j in self.list_proto(all_users=all_users).jobs]
