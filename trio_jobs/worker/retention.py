"""Retention: ended jobs (record and output file) are deleted oldest first beyond the limits.

DESIGN §7: an ended job is deleted once it is beyond any of ``max_jobs`` ended jobs,
``max_output_bytes`` of ended jobs' output, or ``max_age`` since it ended. "Oldest" is the
earliest end (``ended_at``, then start order): a long job that ended a minute ago is young,
whenever it started. A running job is never deleted (only rows that are not RUNNING are
candidates, and a job's row stays RUNNING until its final record is written). A deleted job
is gone: ``status`` and ``follow`` raise JobNotFound, ``job_page`` does not return it, and the
worker's listeners (the service's ListJobs cache) forget it.

When. :meth:`Retainer.run` is a task in the worker's nursery. It runs a pass at start
(after ``task_status.started()``: a restart never waits for it), after jobs end
(:meth:`Retainer.poke`, at most one pass per ``min_interval``: a burst of ends is one pass),
and every ``check_interval`` (for ``max_age``, and to retry final records a full disk
refused). Cost of a pass with nothing to delete: one thread call reading one row
(``ended_totals``) and the oldest ended row of an index -- not a scan of the history.

How. A pass works in batches of ``BATCH`` jobs, each one thread call that reads the totals and
the oldest ended rows, picks those beyond a limit, unlinks their output files and then
deletes their records (one statement). The store's lock is held only for the two SQL
statements, never across the unlinks, so a call waits at most one statement; the event loop
never waits. Thread calls are not cancelled half-way, so a cancelled pass stops between
batches with every batch complete.

Order: file first, then record. A crash in between leaves records of ended jobs whose output
file is gone. They are the oldest ended records, so the next pass (the first runs at start)
deletes them first -- nothing is left that is never cleaned, and nothing scans the output
directory at start. It also lets a full disk recover: unlinking frees the space that the
DELETE needs. If an unlink fails (other than "already gone"), the pass stops before that job
(its record is kept with its file) and the next pass retries.

Followers of a job being deleted: a reader of an ended job opens the output file when it is
created (``Worker.follow``), so once it exists it reads every byte to the end from the
unlinked inode and ends normally; the space is freed when it closes. A ``follow()`` after
the unlink raises JobNotFound. A live follower of a job that ended and was deleted before
it had to open the file (only possible with tiny limits) gets JobNotFound from its reader.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final, final

import trio

from .errors import WorkerClosed, WorkerError
from .store import utcnow

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from .store import JobStore

log = logging.getLogger("trio_jobs.worker")

BATCH: Final = 256
"""Jobs deleted per thread call: a few ms of SQL and unlinks, so other calls never wait long."""
DEFAULT_MAX_JOBS: Final = 100_000
DEFAULT_MAX_OUTPUT_BYTES: Final = 10 << 30
DEFAULT_MAX_AGE: Final = 30 * 86400.0


@dataclass(frozen=True, kw_only=True)
class Retention:
    """How much history the worker keeps (DESIGN §7). ``None`` = no limit of that kind."""

    max_jobs: int | None = DEFAULT_MAX_JOBS  # ended jobs
    max_output_bytes: int | None = DEFAULT_MAX_OUTPUT_BYTES  # total output of ended jobs
    max_age: float | None = DEFAULT_MAX_AGE  # seconds since a job ended
    min_interval: float = 1.0  # seconds between passes that job ends trigger
    check_interval: float = 60.0  # seconds between passes when nothing triggers one

    def __post_init__(self) -> None:
        for name in ("max_jobs", "max_output_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a whole number >= 1 or None, not {value!r}")
        for name in ("max_age", "min_interval", "check_interval"):
            value = getattr(self, name)
            if value is None and name == "max_age":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 \
                    or value == float("inf"):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
        if self.max_age is not None and self.max_age <= 0:
            raise ValueError(f"max_age must be > 0 seconds or None, not {self.max_age!r}")
        if self.check_interval <= 0:
            raise ValueError(f"check_interval must be > 0 seconds, not {self.check_interval!r}")


DEFAULT_RETENTION: Final = Retention()
KEEP_EVERYTHING: Final = Retention(max_jobs=None, max_output_bytes=None, max_age=None)


def _ended_before(ended_at: str | None, cutoff: datetime) -> bool:
    """True if a record's end is before ``cutoff``; a missing or unreadable end time (not
    one this code writes) counts as the oldest, as the index sorts it."""
    try:
        return ended_at is None or datetime.fromisoformat(ended_at) < cutoff
    except (ValueError, TypeError):
        return True


@final
class Retainer:
    """Enforces a :class:`Retention` on a store (see the module doc). Made by the worker."""

    def __init__(
        self, store: JobStore, out_dir: Path, limits: Retention, *,
        clock: Callable[[], datetime] = utcnow,
        on_deleted: Callable[[list[str]], None],
        after_pass: Callable[[], Awaitable[None]],
    ) -> None:
        self._store = store
        self._out_dir = out_dir
        self.limits = limits
        self._clock = clock  # aware UTC "now", injectable for tests of max_age
        self._on_deleted = on_deleted  # synchronous, on the loop, right after each batch
        self._after_pass = after_pass  # e.g. retry final records a full disk refused
        self._lock = trio.Lock()  # one pass at a time (background and enforce())
        self._wake = trio.Event()
        self._passed = trio.Event()  # set (and replaced) at the end of every pass
        self.deleted = 0  # jobs deleted since the worker opened (monitoring, tests)

    def poke(self) -> None:
        """A job ended: run a pass soon. Synchronous, cheap."""
        self._wake.set()

    async def next_pass(self) -> None:
        """Return once the next pass (background or :meth:`enforce`) has completed."""
        await self._passed.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The background task: a pass now, then after pokes and every ``check_interval``.
        Runs until cancelled; a failed pass is logged and retried at the next wake."""
        task_status.started()
        limits = self.limits
        while True:
            self._wake = trio.Event()  # pokes from here on ask for the next pass
            try:
                await self.enforce()
            except WorkerClosed:
                return
            except WorkerError as exc:
                log.warning("retention: %s (retried in %.0f s)", exc, limits.check_interval)
            except Exception:  # a bug here must not take the worker (and its jobs) down
                log.exception("retention: the pass failed (retried in %.0f s)", limits.check_interval)
            with trio.move_on_after(limits.check_interval):
                await self._wake.wait()
            await trio.sleep(limits.min_interval)  # pokes meanwhile join this pass

    async def enforce(self) -> int:
        """Run one pass now: delete every ended job beyond a limit. Returns how many."""
        async with self._lock:
            try:
                return await self._enforce()
            finally:
                self._passed.set()
                self._passed = trio.Event()

    async def _enforce(self) -> int:
        total = 0
        more = True
        while more:
            cutoff = None
            if self.limits.max_age is not None:
                cutoff = self._clock() - timedelta(seconds=self.limits.max_age)
            ids, more = await trio.to_thread.run_sync(self._batch_blocking, cutoff)
            if ids:  # no checkpoint between the thread's return and this
                total += len(ids)
                self.deleted += len(ids)
                self._on_deleted(ids)
        if total:
            log.info("retention: deleted %d ended job(s) (output and record)", total)
        await self._after_pass()
        return total

    def _batch_blocking(self, cutoff: datetime | None) -> tuple[list[str], bool]:
        """Delete up to BATCH jobs beyond a limit; (their ids, maybe more to delete)."""
        limits = self.limits
        (count, size), rows = self._store.ended_oldest_blocking(BATCH)
        doomed: list[tuple[int, str]] = []
        for seq, job_id, ended_at, output_bytes in rows:
            expired = cutoff is not None and _ended_before(ended_at, cutoff)
            if not (expired or (limits.max_jobs is not None and count > limits.max_jobs)
                    or (limits.max_output_bytes is not None and size > limits.max_output_bytes)):
                break  # oldest first: the rest are within every limit
            doomed.append((seq, job_id))
            count -= 1
            size -= output_bytes
        unlinked: list[tuple[int, str]] = []
        for seq, job_id in doomed:
            try:
                os.unlink(self._out_dir / f"{job_id}.out")
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("retention: cannot delete the output of job %s: %s; keeping its record "
                                "and retrying later", job_id, exc)
                    self._store.delete_blocking([s for s, _ in unlinked])
                    return [i for _, i in unlinked], False
            unlinked.append((seq, job_id))
        self._store.delete_blocking([s for s, _ in unlinked])
        return [i for _, i in unlinked], len(doomed) == BATCH
