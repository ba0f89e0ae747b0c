"""StreamOutput: a job's output sent as it is written, its final status in the trailers.

Who owns what: the handler (handlers.py) has checked the caller and that the job is
theirs; :meth:`OutputStreams.send_output` opens the worker's reader, owns it until the
call ends (closed on every exit) and sends each chunk as it comes; nothing is buffered
here. :meth:`OutputStreams.hold` bounds the calls one identity has open at once
(``DEFAULT_MAX_STREAMS_PER_IDENTITY`` in tuning.py says why).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Final, final

from ..audit import stream_opened
from ..rpc import StatusCode
from ..worker import InvalidArgument, JobNotFound, WorkerClosed
from .caches import final_entry
from .encoding import output_chunk
from .refusals import abort, not_found, unavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from ..rpc import Serialized, ServerContext
    from ..v1 import jobs_pb2 as pb
    from ..worker import Worker
    from .caches import FinalStatuses

FINAL_STATUS_KEY: Final = "trio-jobs-final-status-bin"
"""Trailing metadata of a followed StreamOutput: the ended job's serialized JobStatus."""


@final
class OutputStreams:
    """The StreamOutput calls of one service: how many each identity has open, and the
    sending of one."""

    def __init__(self, worker: Worker, finals: FinalStatuses, *, max_per_identity: int) -> None:
        self._worker = worker
        self._finals = finals
        self._max = max_per_identity
        # identity -> StreamOutput calls it has open now (entries removed at zero, so the
        # dict holds only identities with a stream open: bounded by the policy's identities)
        self._open: dict[str, int] = {}

    def open(self, identity: str) -> int:
        """StreamOutput calls ``identity`` has open now."""
        return self._open.get(identity, 0)

    @contextlib.contextmanager
    def hold(self, identity: str) -> Iterator[None]:
        """One more call of ``identity`` for the block; RESOURCE_EXHAUSTED beyond the cap."""
        open_now = self._open.get(identity, 0)
        if open_now >= self._max:
            abort(
                StatusCode.RESOURCE_EXHAUSTED,
                f"{identity} already has {open_now} output streams open, the most allowed at once; "
                "end some 'trio-jobs tail' commands and retry",
            )
        self._open[identity] = open_now + 1
        try:
            yield
        finally:
            left = self._open[identity] - 1
            if left:
                self._open[identity] = left
            else:
                del self._open[identity]

    async def send_output(
        self,
        job_id: str,
        request: pb.StreamOutputRequest,
        ctx: ServerContext,
        send: Callable[[pb.OutputChunk | Serialized], Awaitable[None]],
    ) -> None:
        """Send the output of ``job_id`` (the caller's: checked) from ``request.offset``; if
        ``request.follow``, until the job has ended, then its final status as trailers."""
        try:
            reader = self._worker.follow(job_id, request.offset, wait=request.follow)
        except InvalidArgument as exc:
            abort(StatusCode.INVALID_ARGUMENT, str(exc))
        except JobNotFound:
            not_found(job_id)
        except WorkerClosed:
            unavailable()
        stream_opened()  # the audit log's "StreamOutput opened" (trio_jobs/audit.py)
        try:
            # The reader keeps only an offset; `send` waits for the client's flow-control
            # window, so a slow follower holds back only itself.
            async for chunk in reader:
                await send(output_chunk(chunk.data, chunk.offset))
        except JobNotFound:  # retention deleted the job before the reader needed its file
            not_found(job_id)
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
