"""ListJobs pages: which jobs one answer holds, its page token, and how many are built at once.

A page is read a slice of ids at a time (``LIST_SLICE``) from the store's start-order index
and cut where it would pass ``LIST_PAGE_BYTES``; the parts of ended jobs come from
:class:`~trio_jobs.service.caches.ListParts`, the others are read and converted
``LIST_CONVERT_BATCH`` at a time (in a thread when there are many). So neither the time of
a call nor the memory it holds meanwhile grows with the history. The page token is opaque
to clients: base64 of ``PAGE_TOKEN_VERSION`` and the store position of the page's last job
(positions only grow, so jobs started between pages come later).

The handler (handlers.py) checks the request and the caller; this module owns the pages
and the bound on building them (``LIST_CONCURRENCY`` at once, one per identity).
"""

from __future__ import annotations

import base64
import bisect
import itertools
from typing import TYPE_CHECKING, Final, cast, final

import trio

from ..rpc import RpcError, StatusCode
from .encoding import list_part, list_response
from .tuning import LIST_CONVERT_BATCH, LIST_CONVERT_IN_THREAD, LIST_PAGE_BYTES, LIST_SLICE

if TYPE_CHECKING:
    from ..rpc import Serialized
    from ..worker import JobStatus, Worker
    from .caches import ListParts

PAGE_TOKEN_VERSION: Final = "p2"
"""The first field of a page token: a token of another format is refused, not misread."""


def page_token(position: int) -> str:
    return base64.urlsafe_b64encode(f"{PAGE_TOKEN_VERSION}:{position}".encode()).decode()


def page_start(token: str) -> int:
    """The position after which the page starts; INVALID_ARGUMENT for a bad token."""
    try:
        version, position = base64.urlsafe_b64decode(token.encode("ascii")).decode().split(":")
        if version != PAGE_TOKEN_VERSION or int(position) < 0:
            raise ValueError(version)
        return int(position)
    except (ValueError, UnicodeError) as exc:
        raise RpcError(StatusCode.INVALID_ARGUMENT, "page_token is not one this server gave out; "
                       "pass the next_page_token of the previous page, or none for the first page") from exc


def _list_parts(statuses: dict[str, JobStatus]) -> dict[str, bytes]:
    return {job_id: list_part(status) for job_id, status in statuses.items()}


def _response(parts: list[bytes], next_position: int) -> Serialized:
    return list_response(parts, page_token(next_position) if next_position else "")


@final
class ListPages:
    """Builds the ListJobs answers of one service from the worker and the parts cache.

    At most ``concurrency`` pages are built at once, and one at a time per caller; further
    calls wait their turn (FIFO) -- see ``LIST_CONCURRENCY`` for why.
    """

    def __init__(self, worker: Worker, parts: ListParts, *, concurrency: int) -> None:
        self._worker = worker
        self._parts = parts
        self._slots = trio.Semaphore(concurrency)
        self._locks: dict[str, trio.Lock] = {}  # one per identity of the policy: bounded

    async def page(self, caller: str, owner: str | None, position: int, wanted: int | None) -> Serialized:
        """The page of ``owner``'s jobs (None: everyone's) after ``position``: ``wanted``
        jobs at most (None: as many as fit in ``LIST_PAGE_BYTES``), built in ``caller``'s
        turn. Raises ``WorkerClosed``."""
        async with self._locks.setdefault(caller, trio.Lock()), self._slots:
            return await self._build(owner, position, wanted)

    async def _build(self, owner: str | None, position: int, wanted: int | None) -> Serialized:
        parts: list[bytes] = []
        size = 0
        # Only the page is read and converted, a slice of ids at a time: the cost of a
        # call (time, and the memory it takes meanwhile) does not grow with the history.
        while True:
            limit = LIST_SLICE if wanted is None else min(LIST_SLICE, wanted - len(parts))
            rows = await self._worker.job_page(owner=owner, after=position, limit=limit + 1)
            more = len(rows) > limit
            rows = rows[:limit]
            last = rows[-1][0] if rows else position
            found = await self._parts_of([job_id for _, job_id in rows])
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
                return _response(parts, rows[fit - 1][0] if fit else position)
            parts += page
            size = ends[-1] if ends else size
            position = last
            if not more:
                return _response(parts, 0)
            if wanted is not None and len(parts) >= wanted:
                return _response(parts, position)

    async def _parts_of(self, job_ids: list[str]) -> list[bytes | None]:
        """The serialized ListJobs part of each job, in order (None: no such record):
        cached for ended jobs, else converted ``LIST_CONVERT_BATCH`` at a time (in a
        thread when there are many) and cached if the job has ended."""
        cache = self._parts
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
