"""JobsClient: a typed async client of ``trio_jobs.v1.JobService`` for trio programs.

    async with JobsClient.connect("localhost:4567", cert=..., key=..., ca=...) as jobs:
        job = await jobs.start("echo", ["hello"])
        final = await jobs.tail(job.job_id, sink)      # sink: async (bytes) -> None
        print(final.exit_status)

Results are small frozen dataclasses of this module (:class:`JobInfo`, :class:`JobLimits`,
...), not the worker's classes: a client must not need the server's code. Each carries the
proto message it came from in ``.proto`` for callers who want the wire form (e.g. JSON).
Errors are :class:`JobsError` with the gRPC status ``code`` and the server's message.

Reconnection: :meth:`JobsClient.tail` survives a dropped connection -- it reconnects with
backoff and resumes at the offset after the last byte it delivered, so the sink sees every
byte exactly once. Other calls are single requests and report a dropped connection as
``JobsError(UNAVAILABLE)``; retrying a StartJob blindly could start a job twice.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, TypeVar, final

import trio
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message

from .rpc import RpcError, StatusCode, connect
from .v1 import jobs_pb2 as pb

if TYPE_CHECKING:
    import ssl
    from pathlib import Path

    from .rpc import Channel

_SERVICE: Final = "/trio_jobs.v1.JobService/"
# Trailing metadata of a followed StreamOutput (see trio_jobs.service).
FINAL_STATUS_KEY: Final = "trio-jobs-final-status-bin"
_R = TypeVar("_R", bound=Message)
DEFAULT_SERVER: Final = "localhost:4567"

# Transport failures that make a tail reconnect (anything else is the server's answer).
_RETRY_CODES: Final = frozenset({StatusCode.UNAVAILABLE, StatusCode.INTERNAL, StatusCode.UNKNOWN})
_STATE_NAMES: Final = {
    pb.JOB_STATE_UNSPECIFIED: "unknown",
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_EXITED: "exited",
    pb.JOB_STATE_KILLED: "killed",
    pb.JOB_STATE_LOST: "lost",
}


class JobsError(Exception):
    """A call failed: ``code`` is the gRPC status, ``message`` says what to do."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


def _usable(channel: Channel) -> bool:
    """Whether a new call may start on ``channel``: not lost, no GOAWAY received."""
    return channel.lost is None and not channel.proto.closed and channel.proto.goaway_received is None


def _single_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


def _translate(exc: RpcError) -> JobsError:
    return JobsError(exc.code, exc.message or exc.code.name)


Sink = Callable[[bytes], Awaitable[None]]


@final
class JobsClient:
    """One connection to a trio-jobs server. Make it with :meth:`connect`."""

    def __init__(self, *, server: str, ssl_context: ssl.SSLContext) -> None:
        """Not connected yet: use :meth:`connect`."""
        parse_server(server)
        self._channel: Channel | None = None
        self._server = server
        self._ssl_context = ssl_context
        #: how long tail keeps trying to reconnect without getting a byte or an answer
        self.reconnect_timeout = 60.0

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        server: str = DEFAULT_SERVER,
        *,
        cert: Path | None = None,
        key: Path | None = None,
        ca: Path | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> AsyncIterator[JobsClient]:
        """Connect with mutual TLS: pass ``cert``/``key``/``ca`` paths or an ``ssl_context``."""
        if ssl_context is None:
            if cert is None or key is None or ca is None:
                raise ValueError("JobsClient.connect needs cert, key and ca (or an ssl_context)")
            from .security.tls import client_ssl_context

            ssl_context = client_ssl_context(cert=cert, key=key, ca=ca)
        client = cls(server=server, ssl_context=ssl_context)
        async with client._open() as channel:
            client._channel = channel
            try:
                yield client
            finally:
                client._channel = None

    @asynccontextmanager
    async def _open(self) -> AsyncIterator[Channel]:
        """A channel to the server. Connection failures are JobsError(UNAVAILABLE).

        The rpc layer runs the connection's reader in a nursery, so whatever the body raises
        comes out wrapped in an exception group; that nursery is an implementation detail,
        so a group holding a single exception is unwrapped here.
        """
        host, port = parse_server(self._server)
        try:
            async with connect(host, port, ssl_context=self._ssl_context) as channel:
                yield channel
        except BaseExceptionGroup as group:
            leaf = _single_leaf(group)
            if leaf is None:
                raise
            if isinstance(leaf, RpcError):
                raise _translate(leaf) from leaf
            raise leaf from None
        except RpcError as exc:
            raise _translate(exc) from exc
        except OSError as exc:
            raise JobsError(StatusCode.UNAVAILABLE, f"cannot connect to {self._server}: {exc.strerror or exc}") from exc

    def _connected(self) -> Channel:
        if self._channel is None:
            raise JobsError(StatusCode.UNAVAILABLE, "the client is not connected; use 'async with JobsClient.connect(...)'")
        return self._channel

    async def _unary(self, method: str, request: Message, response_type: type[_R], channel: Channel | None = None) -> _R:
        channel = channel or self._connected()
        if not _usable(channel):
            # The server ended this connection before the call was sent: it closes idle
            # connections (GOAWAY after its idle timeout) and connections of a server that
            # restarts. Nothing was sent, so any call may go on a new connection; one is
            # opened for this call (a client idle that long makes few calls).
            async with self._open() as fresh:
                return await self._unary(method, request, response_type, fresh)
        try:
            return await channel.unary(_SERVICE + method, request, response_type)
        except RpcError as exc:
            raise _translate(exc) from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise JobsError(StatusCode.UNAVAILABLE, f"connection to {self._server} lost: {exc}") from exc

    async def start(
        self,
        command: str,
        args: Sequence[str] = (),
        *,
        env: Mapping[str, str] | None = None,
        working_dir: str = "",
        limits: JobLimits | None = None,
    ) -> JobInfo:
        """Start ``command args...`` (no shell). Returns the new job's status."""
        request = pb.StartJobRequest(
            command=command,
            args=list(args),
            env=dict(env or {}),
            working_dir=working_dir,
            limits=(limits or JobLimits()).to_proto(),
        )
        response = await self._unary("StartJob", request, pb.StartJobResponse)
        return JobInfo.from_proto(response.status)

    async def stop(self, job_id: str, *, grace: float | None = None) -> StopOutcome:
        """Stop a job (SIGTERM, ``grace`` seconds, SIGKILL); None = the server's default."""
        request = pb.StopJobRequest(job_id=job_id)
        if grace is not None:
            if not math.isfinite(grace) or grace < 0:
                raise ValueError("grace must be a finite number of seconds >= 0")
            request.grace_period.CopyFrom(Duration(seconds=int(grace), nanos=round((grace % 1) * 1e9) % 1_000_000_000))
        response = await self._unary("StopJob", request, pb.StopJobResponse)
        return StopOutcome(job=JobInfo.from_proto(response.status), force_ended=response.force_ended)

    async def status(self, job_id: str) -> JobInfo:
        return JobInfo.from_proto(await self._unary("GetJobStatus", pb.GetJobStatusRequest(job_id=job_id), pb.JobStatus))

    async def list_proto(self, *, all_users: bool = False, page_size: int = 0) -> pb.ListJobsResponse:
        """Every job (see :meth:`list`) in one ``ListJobsResponse``, however many pages the
        server answers in (``page_size``: jobs per call, 0 lets the server choose)."""
        whole: pb.ListJobsResponse | None = None
        token = ""
        while True:
            request = pb.ListJobsRequest(all_users=all_users, page_size=page_size, page_token=token)
            page = await self._unary("ListJobs", request, pb.ListJobsResponse)
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

    async def list(self, *, all_users: bool = False) -> list[JobInfo]:
        """Your jobs, oldest first; ``all_users`` (admins only) for everybody's."""
        return [JobInfo.from_proto(j) for j in (await self.list_proto(all_users=all_users)).jobs]

    async def tail(self, job_id: str, sink: Sink, *, offset: int = 0, follow: bool = True) -> JobInfo:
        """Deliver the job's output from ``offset`` to ``sink``, then return its status.

        With ``follow`` this returns once the job has ended and every byte was delivered.
        A dropped connection is retried (backoff up to 2 s, giving up after
        ``reconnect_timeout`` seconds without progress) and resumes at the next byte; bytes
        are never repeated or skipped. Errors of ``sink`` propagate unchanged.
        """
        state = _TailState(offset=offset)
        connected = self._connected()
        # A connection the server closed (idle timeout): a new one at once, no backoff.
        channel: Channel | None = connected if _usable(connected) else None
        delay = 0.05
        give_up = trio.current_time() + self.reconnect_timeout
        while True:
            progress_before = state.offset
            try:
                if channel is not None:
                    return await self._tail_on(channel, job_id, sink, state, follow)
                async with self._open() as fresh:
                    return await self._tail_on(fresh, job_id, sink, state, follow)
            except JobsError as exc:
                if state.sink_failed or exc.code not in _RETRY_CODES:
                    raise
                if state.offset != progress_before or state.answered:
                    give_up = trio.current_time() + self.reconnect_timeout
                    delay = 0.05
                    state.answered = False
                if trio.current_time() + delay > give_up:
                    raise JobsError(exc.code, f"{exc.message} (gave up reconnecting after {self.reconnect_timeout:g}s)") from exc
            channel = None
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _tail_on(self, channel: Channel, job_id: str, sink: Sink, state: _TailState, follow: bool) -> JobInfo:
        request = pb.StreamOutputRequest(job_id=job_id, offset=state.offset, follow=follow)
        try:
            async with channel.server_stream(_SERVICE + "StreamOutput", request, pb.OutputChunk) as stream:
                state.answered = True
                async for chunk in stream:
                    data = chunk.data
                    if chunk.offset > state.offset:
                        raise JobsError(
                            StatusCode.DATA_LOSS, f"output jumped from offset {state.offset} to {chunk.offset}; try again"
                        )
                    data = data[state.offset - chunk.offset :]  # resumed mid-chunk: drop what we have
                    if data:
                        try:
                            await sink(data)
                        except BaseException:
                            state.sink_failed = True
                            raise
                        state.offset += len(data)
                for key, value in stream.trailing_metadata:
                    if key == FINAL_STATUS_KEY and isinstance(value, bytes):
                        # the server sent the ended job's status with the trailers
                        return JobInfo.from_proto(pb.JobStatus.FromString(value))
        except RpcError as exc:
            raise _translate(exc) from exc
        except (OSError, trio.BrokenResourceError) as exc:
            if state.sink_failed:
                raise
            raise JobsError(StatusCode.UNAVAILABLE, f"connection to {self._server} lost: {exc}") from exc
        return JobInfo.from_proto(await self._unary("GetJobStatus", pb.GetJobStatusRequest(job_id=job_id), pb.JobStatus, channel))


@dataclass(kw_only=True)
class _TailState:
    offset: int
    answered: bool = False
    sink_failed: bool = False

