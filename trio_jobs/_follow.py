"""Following a job's output: :class:`JobOutput`, the :class:`Reconnect` policy, and the
task that hands the output to the caller.

Theory of operation. ``JobsClient.follow`` is an async context manager, not an async
generator: reading a stream holds a connection, whose reader task lives in a nursery, and
an async generator must not yield inside a nursery (PEP 789). On entry it starts one
*pump* task in a nursery of its own. The pump makes the StreamOutput calls -- on the
client's connection, then on fresh ones after a failure (trio_jobs/client.py) -- and
hands each chunk to the caller through an unbuffered memory channel. The hand-off is the
delivery: ``send`` returns once the caller's ``receive`` has taken the chunk, so the
offset the pump resumes at after a dropped connection is the one after the last byte the
caller took, and the caller sees every byte exactly once.

Backpressure: the pump holds at most one chunk (64 KiB from our server) while the caller
is busy; HTTP/2 flow control holds the server back beyond that.

Who owns what: the pump belongs to the ``async with`` block and ends with it at the
latest (leaving the block early cancels it). A fresh connection belongs to the pump. The
client holds the pump's cancel scope in its :class:`FollowScopes`, so closing the client
ends the pump (no reconnecting behind the caller's back) without waiting for it. The
pump's errors are raised where the caller iterates, not from the nursery.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, final

import trio

from .rpc._nursery import background_nursery

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
    from typing import TypeAlias

    from .client import JobInfo, JobsError

    #: Makes the StreamOutput calls and sends each chunk; returns the job's final status.
    Pump: TypeAlias = Callable[[trio.MemorySendChannel[bytes]], Awaitable[JobInfo]]

__all__ = ["FollowScopes", "JobOutput", "Reconnect", "open_output"]


@final
@dataclass(frozen=True, kw_only=True)
class Reconnect:
    """When a follow (and ``tail``) reconnects after its connection failed.

    Only a transport failure is retried (UNAVAILABLE, INTERNAL, UNKNOWN), never the
    server's answer (NOT_FOUND, PERMISSION_DENIED...). The first retry waits
    ``first_delay`` seconds, each next one ``factor`` times longer, up to ``max_delay``.
    The follow gives up once ``window`` seconds have passed without progress -- no byte
    delivered and no call accepted on a connection -- with a ``JobsError`` whose message
    (and ``__cause__``) is the last failure. ``window=0`` never reconnects;
    ``window=math.inf`` never gives up.
    """

    window: float = 60.0
    first_delay: float = 0.05
    max_delay: float = 2.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if math.isnan(self.window) or self.window < 0:
            raise ValueError(f"Reconnect.window must be >= 0 seconds (math.inf: forever), not {self.window}")
        if not (math.isfinite(self.first_delay) and self.first_delay > 0):
            raise ValueError(f"Reconnect.first_delay must be a finite number of seconds > 0, not {self.first_delay}")
        if not (math.isfinite(self.max_delay) and self.max_delay >= self.first_delay):
            raise ValueError(f"Reconnect.max_delay must be finite and >= first_delay, not {self.max_delay}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"Reconnect.factor must be a finite number >= 1, not {self.factor}")

    def next_delay(self, delay: float) -> float:
        """The wait after one of ``delay`` seconds."""
        return min(delay * self.factor, self.max_delay)


@final
class FollowScopes:
    """The cancel scopes of one client's running follows: closing the client ends them."""

    def __init__(self) -> None:
        self._scopes: set[trio.CancelScope] = set()
        self.closed = False

    @contextmanager
    def track(self) -> Iterator[trio.CancelScope]:
        """A scope that :meth:`close` cancels (at once, if it already ran)."""
        with trio.CancelScope() as scope:
            if self.closed:
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield scope
            finally:
                self._scopes.discard(scope)

    def close(self) -> None:
        """Cancel every follow's scope, now and from now on. Does not wait; idempotent."""
        self.closed = True
        for scope in self._scopes:
            scope.cancel()


@final
class JobOutput:
    """A job's output from an offset: an async iterator of ``bytes`` chunks.

    Made by ``JobsClient.follow``; iterate it inside the ``async with`` block, in one task.
    The iteration ends after the last byte -- when following (``wait=True``), once the job
    has ended -- and :attr:`final` is then the job's status. A failure (the server's
    answer, e.g. NOT_FOUND; the reconnect policy giving up; the client being closed) is
    raised by the iteration as a ``JobsError``.
    """

    def __init__(self, job_id: str, offset: int) -> None:
        self.job_id = job_id
        #: the offset after the last byte the iteration returned
        self.offset = offset
        #: connections opened after a failure
        self.reconnects = 0
        #: the last failure that was retried (None: none so far), to show why it waits
        self.last_error: JobsError | None = None
        self._final: JobInfo | None = None
        self._error: Exception | None = None
        self._receive: trio.MemoryReceiveChannel[bytes] | None = None

    @property
    def final(self) -> JobInfo:
        """The job's status at the end of its output; known once the iteration has ended
        without an error (RuntimeError before). Without ``wait`` the job may still run."""
        if self._final is None:
            raise RuntimeError(f"the output of job {self.job_id} has not ended yet (or ended with an error)")
        return self._final

    def __aiter__(self) -> JobOutput:
        return self

    async def __anext__(self) -> bytes:
        if self._receive is None:
            raise RuntimeError("iterate a JobOutput inside its 'async with client.follow(...)' block")
        try:
            data = await self._receive.receive()
        except trio.EndOfChannel:
            pass  # raised below, outside this handler: not "during handling of EndOfChannel"
        else:
            self.offset += len(data)
            return data
        if self._error is not None:
            raise self._error
        raise StopAsyncIteration

    async def _run(self, pump: Pump, send: trio.MemorySendChannel[bytes]) -> None:
        with send:  # closing it ends the caller's iteration, after the last chunk
            try:
                self._final = await pump(send)
            except Exception as exc:  # raised by the caller's iteration instead
                self._error = exc


@asynccontextmanager
async def open_output(output: JobOutput, pump: Pump) -> AsyncIterator[JobOutput]:
    """Run ``pump`` for ``output`` while the caller's block runs (see the module head)."""
    # Unbuffered: a chunk counts as delivered only once the caller took it.
    send, receive = trio.open_memory_channel[bytes](0)
    output._receive = receive
    # What the body raises reaches the caller as it is (``except JobsError``, a sink's
    # BrokenPipeError, plain Cancelled), not wrapped in an exception group.
    try:
        async with background_nursery() as nursery:
            nursery.start_soon(output._run, pump, send)
            yield output
    finally:
        receive.close()
