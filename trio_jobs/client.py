"""JobsClient: a typed async client of ``trio_jobs.v1.JobService`` for trio programs.

    async with JobsClient.connect("localhost:4567", cert=..., key=..., ca=...) as jobs:
        job = await jobs.start("echo", ["hello"])
        async with jobs.follow(job.job_id) as output:  # JobOutput
            async for data in output:                  # bytes, from offset 0
                ...
        print(output.final.exit_status)

Results are small frozen dataclasses of this module (:class:`JobInfo`, :class:`JobLimits`,
...), not the worker's classes: a client must not need the server's code. Each carries the
proto message it came from in ``.proto`` for callers who want the wire form (e.g. JSON).
Errors are :class:`JobsError` with the gRPC status ``code`` and the server's message.

Reconnection: :meth:`JobsClient.follow` (and :meth:`~JobsClient.tail`, its callback form)
survives a dropped connection -- it reconnects as its :class:`Reconnect` policy says and
resumes at the offset after the last byte it delivered, so the caller sees every byte
exactly once; when the policy gives up, the error names the last failure. Closing the
client ends its follows. Other calls are single requests and report a dropped connection
as ``JobsError(UNAVAILABLE)``; retrying a StartJob blindly could start a job twice.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Final, TypeVar, final

import trio
from google.protobuf.message import Message

from ._follow import FollowScopes, JobOutput, Reconnect, open_output
from .calls import (
    DEFAULT_SERVER,
    FINAL_STATUS_KEY,
    SERVICE,
    JobInfo,
    JobLimits,
    JobsError,
    JobUsage,
    Plan,
    StopOutcome,
    list_plan,
    parse_server,
    start_plan,
    status_plan,
    stop_plan,
    translate,
)
from .rpc import RpcError, StatusCode, connect
from .v1 import jobs_pb2 as pb

if TYPE_CHECKING:
    import ssl
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from .rpc import Channel

__all__ = [
    "DEFAULT_SERVER",
    "FINAL_STATUS_KEY",
    "JobInfo",
    "JobLimits",
    "JobOutput",
    "JobUsage",
    "JobsClient",
    "JobsError",
    "Reconnect",
    "Sink",
    "StopOutcome",
    "parse_server",
]

_SERVICE: Final = SERVICE
_R = TypeVar("_R", bound=Message)
_T = TypeVar("_T")

# Transport failures that make a follow reconnect (anything else is the server's answer).
_RETRY_CODES: Final = frozenset({StatusCode.UNAVAILABLE, StatusCode.INTERNAL, StatusCode.UNKNOWN})


def _usable(channel: Channel) -> bool:
    """Whether a new call may start on ``channel``: not lost, no GOAWAY received."""
    return channel.lost is None and not channel.protocol.closed and channel.protocol.goaway_received is None


def _single_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


_translate = translate


def _connect_failures(exc: BaseException) -> str:
    """Why connecting failed, from the attempts' errors that ``trio.open_tcp_stream``
    chains under its "all attempts to connect to HOST:PORT failed" ("Connection refused");
    "" when there are none."""
    cause = exc.__cause__
    while cause is not None and not isinstance(cause, BaseExceptionGroup):
        cause = cause.__cause__
    if cause is None:
        return ""
    reasons: dict[str, None] = {}  # in order, once each
    pending: list[BaseException] = [cause]
    while pending:
        failure = pending.pop()
        if isinstance(failure, BaseExceptionGroup):
            pending.extend(reversed(failure.exceptions))
        elif isinstance(failure, OSError):
            # trio's strerror repeats the address: the errno's own text is the reason
            reasons[os.strerror(failure.errno) if failure.errno else str(failure)] = None
    return ", ".join(reasons)


Sink = Callable[[bytes], Awaitable[None]]


@final
class JobsClient:
    """One connection to a trio-jobs server. Make it with :meth:`connect`."""

    def __init__(self, *, server: str, ssl_context: ssl.SSLContext, reconnect: Reconnect | None = None) -> None:
        """Not connected yet: use :meth:`connect`."""
        parse_server(server)
        self._channel: Channel | None = None
        self._server = server
        self._ssl_context = ssl_context
        #: how :meth:`follow` and :meth:`tail` reconnect after a failure, unless told otherwise
        self.reconnect = reconnect or Reconnect()
        self._follows = FollowScopes()

    @property
    def reconnect_timeout(self) -> float:
        """``reconnect.window``: seconds a follow keeps reconnecting without progress."""
        return self.reconnect.window

    @reconnect_timeout.setter
    def reconnect_timeout(self, seconds: float) -> None:
        self.reconnect = replace(self.reconnect, window=seconds)

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
        reconnect: Reconnect | None = None,
    ) -> AsyncIterator[JobsClient]:
        """Connect with mutual TLS: pass ``cert``/``key``/``ca`` paths or an ``ssl_context``.

        ``reconnect``: the client's :attr:`reconnect` policy (default ``Reconnect()``: retry
        for up to 60 s without progress). Leaving the block closes the connection and ends
        the client's follows, in whatever task they run.
        """
        if ssl_context is None:
            if cert is None or key is None or ca is None:
                raise ValueError("JobsClient.connect needs cert, key and ca (or an ssl_context)")
            from .security.tls import client_ssl_context

            ssl_context = client_ssl_context(cert=cert, key=key, ca=ca)
        client = cls(server=server, ssl_context=ssl_context, reconnect=reconnect)
        async with client._open() as channel:
            client._channel = channel
            try:
                yield client
            finally:
                client._channel = None
                client._follows.close()  # no follow reconnects behind the caller's back

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
            reasons = _connect_failures(exc)  # trio says "all attempts ... failed"; the why
            if not reasons:
                raise _translate(exc) from exc
            raise JobsError(exc.code, f"{exc.message} ({reasons})") from exc
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

    async def _run(self, plan: Plan[_T]) -> _T:
        """Run a call plan of :mod:`trio_jobs.calls` (the loop of :func:`calls.drive`)."""
        call = next(plan)
        while True:
            response = await self._unary(call.method, call.request, call.response_type)
            try:
                call = plan.send(response)
            except StopIteration as done:
                result: _T = done.value
                return result

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
        return await self._run(start_plan(command, args, env=env, working_dir=working_dir, limits=limits))

    async def stop(self, job_id: str, *, grace: float | None = None) -> StopOutcome:
        """Stop a job (SIGTERM, ``grace`` seconds, SIGKILL); None = the server's default."""
        return await self._run(stop_plan(job_id, grace=grace))

    async def status(self, job_id: str) -> JobInfo:
        return await self._run(status_plan(job_id))

    async def list_proto(self, *, all_users: bool = False, page_size: int = 0) -> pb.ListJobsResponse:
        """Every job (see :meth:`list`) in one ``ListJobsResponse``, however many pages the
        server answers in (``page_size``: jobs per call, 0 lets the server choose)."""
        return await self._run(list_plan(all_users=all_users, page_size=page_size))

    async def list(self, *, all_users: bool = False) -> list[JobInfo]:
        """Your jobs, oldest first; ``all_users`` (admins only) for everybody's."""
        return [JobInfo.from_proto(j) for j in (await self.list_proto(all_users=all_users)).jobs]

    def follow(
        self, job_id: str, offset: int = 0, *, wait: bool = True, reconnect: Reconnect | None = None
    ) -> AbstractAsyncContextManager[JobOutput]:
        """The job's output from ``offset``, in chunks of bytes::

            async with jobs.follow(job_id) as output:
                async for data in output:
                    ...
            print(output.final.exit_status)

        With ``wait`` (``tail -f``) the iteration ends once the job has ended and every byte
        was delivered; without, at the end of the output there is now. ``output.final`` is
        then the job's status. A dropped connection is retried as ``reconnect`` (default:
        :attr:`reconnect`) says, resuming at the next byte: bytes are never repeated or
        skipped. Leaving the block ends the call; so does leaving the client's ``async
        with``, and the iteration then raises ``JobsError(CANCELLED)``.

        An async context manager, not a bare async iterator: the call runs in a task that
        the block owns (trio_jobs/_follow.py), so it ends when the block does however the
        block is left, and nothing yields from inside a nursery (PEP 789).
        """
        self._connected()  # not connected (any more): say so now, not at the first chunk
        output = JobOutput(job_id, offset)
        return open_output(output, partial(self._pump, output, wait, reconnect or self.reconnect))

    async def tail(
        self, job_id: str, sink: Sink, *, offset: int = 0, follow: bool = True, reconnect: Reconnect | None = None
    ) -> JobInfo:
        """Deliver the job's output from ``offset`` to ``sink``, then return its status.

        :meth:`follow` with a callback (``follow`` is its ``wait``): with ``follow`` this
        returns once the job has ended and every byte was delivered; a dropped connection is
        retried and resumes at the next byte. Errors of ``sink`` propagate unchanged.
        """
        async with self.follow(job_id, offset, wait=follow, reconnect=reconnect) as output:
            async for data in output:
                await sink(data)
        return output.final

    async def _pump(
        self, output: JobOutput, wait: bool, policy: Reconnect, send: trio.MemorySendChannel[bytes]
    ) -> JobInfo:
        """Send ``output``'s bytes to ``send`` across reconnects; the job's final status.
        Runs in the follow's own task (trio_jobs/_follow.py); :meth:`connect` ending
        cancels it."""
        with self._follows.track():
            return await self._follow_calls(output, wait, policy, send)
        # only the client's close() cancels that scope
        raise JobsError(
            StatusCode.CANCELLED,
            f"the client was closed (its 'async with JobsClient.connect(...)' ended) while following job {output.job_id}",
        )

    async def _follow_calls(
        self, output: JobOutput, wait: bool, policy: Reconnect, send: trio.MemorySendChannel[bytes]
    ) -> JobInfo:
        progress = _Progress(offset=output.offset)
        connected = self._connected()
        # A connection the server closed (idle timeout): a new one at once, no backoff.
        channel: Channel | None = connected if _usable(connected) else None
        delay = policy.first_delay
        since = trio.current_time()  # the last progress: a byte delivered, a call accepted
        failures = 0  # since then
        # Retries until ``policy.window`` after the last progress -- the last one at the
        # window's end, its wait cut short -- then gives up with the last failure.
        while True:
            before = progress.offset
            try:
                if channel is not None:
                    return await self._stream_on(channel, output.job_id, wait, progress, send)
                async with self._open() as fresh:
                    return await self._stream_on(fresh, output.job_id, wait, progress, send)
            except JobsError as exc:
                if exc.code not in _RETRY_CODES:
                    raise
                output.last_error = exc
                now = trio.current_time()
                if progress.offset != before or progress.answered:
                    since, delay, failures = now, policy.first_delay, 0
                    progress.answered = False
                failures += 1
                if now >= since + policy.window:
                    raise JobsError(
                        exc.code,
                        f"gave up following job {output.job_id} at offset {progress.offset}: {failures} failed "
                        f"attempt(s) in {now - since:.1f}s without progress (reconnect window {policy.window:g}s); "
                        f"the last error: {exc.message}",
                    ) from exc
            channel = None
            await trio.sleep(max(0.0, min(delay, since + policy.window - trio.current_time())))
            delay = policy.next_delay(delay)
            output.reconnects += 1

    async def _stream_on(
        self, channel: Channel, job_id: str, wait: bool, progress: _Progress, send: trio.MemorySendChannel[bytes]
    ) -> JobInfo:
        """One StreamOutput call from ``progress.offset``; the job's status at its end."""
        request = pb.StreamOutputRequest(job_id=job_id, offset=progress.offset, follow=wait)
        try:
            async with channel.server_stream(_SERVICE + "StreamOutput", request, pb.OutputChunk) as stream:
                progress.answered = True
                async for chunk in stream:
                    if chunk.offset > progress.offset:
                        raise JobsError(
                            StatusCode.DATA_LOSS, f"output jumped from offset {progress.offset} to {chunk.offset}; try again"
                        )
                    data = chunk.data[progress.offset - chunk.offset :]  # resumed mid-chunk: drop what we have
                    if data:
                        # Returns once the caller took it (or raises Cancelled: the
                        # receiving end outlives this task, so nothing else to translate).
                        await send.send(data)
                        progress.offset += len(data)
                for key, value in stream.trailing_metadata:
                    if key == FINAL_STATUS_KEY and isinstance(value, bytes):
                        # the server sent the ended job's status with the trailers
                        return JobInfo.from_proto(pb.JobStatus.FromString(value))
            # No final status with the trailers (not waiting; an older server): ask.
            status = await channel.unary(_SERVICE + "GetJobStatus", pb.GetJobStatusRequest(job_id=job_id), pb.JobStatus)
        except RpcError as exc:
            raise _translate(exc) from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise JobsError(StatusCode.UNAVAILABLE, f"connection to {self._server} lost: {exc}") from exc
        return JobInfo.from_proto(status)


@dataclass(kw_only=True)
class _Progress:
    """Where a follow is, across its calls."""

    offset: int  # after the last byte the caller took
    answered: bool = False  # a call was accepted on a connection since the last failure

