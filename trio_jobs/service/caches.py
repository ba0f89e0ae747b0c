"""The service's caches of ended jobs, whose answers never change again.

:class:`ListParts` keeps each ended job's ListJobs part (a full cache keeps what it has: a
list scans every job), :class:`FinalStatuses` each ended job's serialized JobStatus with its
owner for GetJobStatus (least recently used out: status calls come back to a few jobs).
Both are bounded in bytes (``tuning``). The service (handlers.py) owns them: the worker's
deletion listener empties both of what retention deletes; ListJobs' reads fill ListParts
(paging.py), a job's end (the worker's end listener) and status reads fill FinalStatuses.
"""

from __future__ import annotations

import collections
import sys
from typing import TYPE_CHECKING, final

from .convert import status_to_proto
from .tuning import (
    LIST_CACHE_BUDGET,
    LIST_CACHE_ENTRY_OVERHEAD,
    LIST_CACHE_MAX_PART,
    STATUS_CACHE_BUDGET,
    STATUS_CACHE_ENTRY_OVERHEAD,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ..worker import JobStatus


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
