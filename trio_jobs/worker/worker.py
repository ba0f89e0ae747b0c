"""The Worker: starts, stops, follows and lists jobs on this host. Embeddable in any trio app.

Ownership: :func:`open_worker` owns the store, the spare spool files and a nursery; each job
is a task in that nursery (:meth:`Job.supervise`) which owns the job's process, cgroup and
output pump. A start runs in one worker thread (``launch.py``). Leaving
``open_worker`` stops every running job (reason: shutdown) with the default grace period,
persists their records, and closes the store -- also when the body was cancelled or raised.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import math
import os
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

import trio

from .cgroups.base import CgroupError
from .cgroups.none import NoCgroupDriver
from .errors import InvalidArgument, JobNotFound, WorkerClosed, WorkerError
from .job import CLEANUP_TIMEOUT, EMPTY_TIMEOUT, Job
from .launch import Launch, SpoolFiles, launch, undo
from .leftovers import group_members, kill_leftover_group, wait_gone
from .output import DEFAULT_MAX_CHUNK, DEFAULT_TAIL_SIZE, OutputLog, OutputReader
from .retention import DEFAULT_RETENTION, Retainer, Retention
from .spec import JobState, JobStatus, StopResult, check_transition
from .store import JobStore, utcnow

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable, Sequence
    from datetime import datetime

    from .cgroups.base import CgroupDriver
    from .spec import JobSpec
    from .validate import Authorize

log = logging.getLogger("trio_jobs.worker")

DEFAULT_OUTPUT_CAP: Final = 1 << 30
DB_NAME: Final = "jobs.sqlite3"
LOCK_NAME: Final = "lock"
OUTPUT_DIR: Final = "output"
ENDED_SIZES_KEPT: Final = 4096
"""Ended jobs whose output size stays in memory (see EndedSizes)."""


@asynccontextmanager
async def open_worker(
    data_dir: Path | str, *, cgroups: CgroupDriver | None = None,
    output_cap: int = DEFAULT_OUTPUT_CAP, default_grace: float = 5.0,
    tail_size: int = DEFAULT_TAIL_SIZE, retention: Retention = DEFAULT_RETENTION,
    clock: Callable[[], datetime] = utcnow,
) -> AsyncIterator[Worker]:
    """Open the store in ``data_dir`` (created 0700 if missing), mark leftovers LOST (the
    driver's ``prepare()`` removes their cgroups), and yield a :class:`Worker`.

    Only the records still RUNNING are read at open (they become LOST); ended jobs stay in
    the store until asked for, so opening costs the same whatever the history's length.
    Ended jobs beyond ``retention`` are deleted by a background task (worker/retention.py);
    ``clock`` (aware UTC now) is what its ``max_age`` is measured against.

    ``cgroups=None`` uses :class:`NoCgroupDriver` (no limits). On exit every running job is
    stopped (SIGTERM, ``default_grace``, SIGKILL) and recorded as stopped by shutdown.
    """
    if output_cap < 0 or tail_size < 1:
        raise ValueError("output_cap must be >= 0 and tail_size >= 1")
    _check_grace(default_grace)
    data_dir = Path(data_dir)
    out_dir = data_dir / OUTPUT_DIR

    def make_dirs() -> None:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        out_dir.mkdir(mode=0o700, exist_ok=True)

    try:
        await trio.to_thread.run_sync(make_dirs)
    except OSError as exc:
        raise WorkerError(f"cannot create the data directory {data_dir}: {exc}") from exc
    # One worker per data directory: a second one would mark the first one's running jobs
    # LOST and its driver would kill their cgroups. The lock dies with the process.
    lock_fd = await trio.to_thread.run_sync(_lock_data_dir, data_dir)
    try:
        async with _open_store_and_jobs(data_dir, out_dir, cgroups, output_cap, default_grace,
                                        tail_size, retention, clock) as worker:
            yield worker
    finally:
        os.close(lock_fd)


@asynccontextmanager
async def _open_store_and_jobs(
    data_dir: Path, out_dir: Path, cgroups: CgroupDriver | None, output_cap: int,
    default_grace: float, tail_size: int, retention: Retention, clock: Callable[[], datetime],
) -> AsyncIterator[Worker]:
    driver: CgroupDriver = cgroups if cgroups is not None else NoCgroupDriver()
    # The store first: a damaged or locked database stops the start before the driver
    # creates (and would leave) the jobs' parent cgroups.
    store = await JobStore.open(data_dir / DB_NAME)
    try:
        try:
            await driver.prepare()
        except CgroupError as exc:
            raise WorkerError(f"cannot prepare the cgroup driver {driver.name}: {exc}") from exc
        if driver.name == "none":  # a cgroup driver's prepare() killed them already
            await _kill_leftover_groups(store)
        await _recover(store, out_dir)
        spools = SpoolFiles(out_dir)
        try:
            await trio.to_thread.run_sync(spools.refill)
            async with trio.open_nursery() as nursery:
                worker = Worker(_store=store, _driver=driver, _nursery=nursery, _out_dir=out_dir,
                                _output_cap=output_cap, _default_grace=default_grace,
                                _tail_size=tail_size, _ended=EndedSizes(), _spools=spools,
                                _retention=retention, _clock=clock)
                await nursery.start(worker.retention.run)
                try:
                    yield worker
                finally:
                    # Shielded, with a deadline: the jobs get their grace period even when
                    # the body was cancelled; past the deadline the job tasks are cancelled,
                    # and their own shielded cleanup SIGKILLs and records them.
                    with trio.move_on_after(default_grace + CLEANUP_TIMEOUT, shield=True):
                        await worker.shutdown()
                    nursery.cancel_scope.cancel()
        finally:
            spools.close()
        # every job task has ended: a last try for final statuses the store refused earlier
        with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
            await worker._save_unsaved()
    finally:
        await store.aclose()



async def _kill_leftover_groups(store: JobStore) -> None:
    """Without cgroups: SIGKILL the process groups of jobs an unclean stop left running."""
    for job_id, pid, started in await store.running_processes():
        if not await trio.to_thread.run_sync(kill_leftover_group, pid, started):
            continue
        log.warning("job %s: killed process group %d left by the previous server", job_id, pid)
        # SIGKILL is delivered asynchronously: start serving only once they are gone
        members = await trio.to_thread.run_sync(group_members, pid)
        with trio.move_on_after(EMPTY_TIMEOUT) as scope:
            await wait_gone(members)
        if scope.cancelled_caught:
            log.warning("job %s: processes %s still exist %.0f s after SIGKILL", job_id,
                        members, EMPTY_TIMEOUT)


async def _recover(store: JobStore, out_dir: Path) -> None:
    """Mark jobs that were RUNNING when an earlier worker died as LOST. Reads only those
    records (a partial index): nothing of the ended history is loaded."""
    for status in await store.running_records():
        check_transition(status.state, JobState.LOST)
        path = out_dir / f"{status.job_id}.out"
        size = await trio.to_thread.run_sync(_file_size, path)
        status = JobStatus(**{**status.__dict__, "state": JobState.LOST,
                              "ended_at": utcnow(), "output_bytes": size})
        await store.update(status)
        log.warning("job %s was running when the previous server stopped: marked LOST",
                    status.job_id)


class EndedSizes:
    """The output sizes of the ``capacity`` most recently ended jobs (an LRU).

    ``follow()`` of an ended job needs the size of its output, and ``follow()`` is synchronous.
    Keeping it for every job of the history made the worker's memory grow with the history
    (about 250 bytes a job); older jobs are looked up in their spool file instead (the file
    of an ended job holds exactly its output), one ``stat`` when someone follows them.
    """

    __slots__ = ("_capacity", "_sizes")

    def __init__(self, capacity: int | None = None) -> None:
        self._capacity = ENDED_SIZES_KEPT if capacity is None else capacity
        self._sizes: collections.OrderedDict[str, int] = collections.OrderedDict()

    def add(self, job_id: str, size: int) -> None:
        self._sizes[job_id] = size
        self._sizes.move_to_end(job_id)
        if len(self._sizes) > self._capacity:
            self._sizes.popitem(last=False)

    def get(self, job_id: str) -> int | None:
        return self._sizes.get(job_id)

    def discard(self, job_id: str) -> None:
        self._sizes.pop(job_id, None)

    def __len__(self) -> int:
        return len(self._sizes)


def _canonical_job_id(job_id: object) -> str | None:
    """``job_id`` if it is a job id this worker could have made (a UUID in canonical form:
    safe to put in a file name), else None."""
    if not isinstance(job_id, str) or len(job_id) != 36:
        return None
    try:
        return job_id if str(uuid.UUID(job_id)) == job_id else None
    except ValueError:
        return None


def _lock_data_dir(data_dir: Path) -> int:
    """Hold an exclusive ``flock`` on ``data_dir/LOCK_NAME``; WorkerError if another has it."""
    path = data_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise WorkerError(f"cannot create the lock file {path}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise WorkerError(f"another trio-jobs server is using the data directory {data_dir} "
                              f"(it holds {path}); stop it, or give this one another data "
                              "directory") from None
        raise WorkerError(f"cannot lock {path}: {exc}") from exc
    return fd


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _check_grace(grace: float) -> None:
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not math.isfinite(grace) \
            or grace < 0:
        raise InvalidArgument(f"grace period must be a finite number of seconds >= 0, not {grace!r}")


@final
class Worker:
    """Use through :func:`open_worker`. Methods are safe to call from many tasks at once."""

    def __init__(self, *, _store: JobStore, _driver: CgroupDriver, _nursery: trio.Nursery,
                 _out_dir: Path, _output_cap: int, _default_grace: float, _tail_size: int,
                 _ended: EndedSizes, _spools: SpoolFiles, _retention: Retention = DEFAULT_RETENTION,
                 _clock: Callable[[], datetime] = utcnow) -> None:
        self._store = _store
        self._driver = _driver
        self._nursery = _nursery
        self._out_dir = _out_dir
        self._output_cap = _output_cap
        self._default_grace = _default_grace
        self._tail_size = _tail_size
        self._spools = _spools  # refilled by each job's end (Job._end_blocking)
        self._jobs: dict[str, Job] = {}  # started in this run, until their task ends
        self._ended = _ended  # output sizes of the most recently ended jobs
        # Final statuses the store could not take (disk full, locked): served from here and
        # written again before every start and at shutdown. Bounded by the jobs of this run.
        self._unsaved: dict[str, JobStatus] = {}
        self._closed = False
        self._deletion_listeners: list[Callable[[Sequence[str]], None]] = []
        self._end_listeners: list[Callable[[JobStatus], None]] = []
        # Deletes ended jobs beyond the limits; its task runs in the worker's nursery.
        self._retainer = Retainer(_store, _out_dir, _retention, clock=_clock,
                                  on_deleted=self._forget, after_pass=self._retry_unsaved)

    @property
    def cgroup_driver_name(self) -> str:
        return self._driver.name

    @property
    def cgroup_driver(self) -> CgroupDriver:
        return self._driver

    @property
    def retention(self) -> Retainer:
        """The retention of ended jobs (its limits, ``enforce()``, ``next_pass()``)."""
        return self._retainer

    def add_deletion_listener(self, listener: Callable[[Sequence[str]], None]) -> None:
        """Call ``listener(job_ids)`` (synchronously, on the loop) whenever retention has
        deleted jobs, e.g. to drop them from a cache. It must not raise."""
        self._deletion_listeners.append(listener)

    def add_end_listener(self, listener: Callable[[JobStatus], None]) -> None:
        """Call ``listener(status)`` (synchronously, on the loop) with the final status of
        each job this worker started, once it has ended and left the worker's memory (from
        then on :meth:`status` asks the store), e.g. to keep it in a cache. Not called for
        a job that retention deleted before that moment. It must not raise."""
        self._end_listeners.append(listener)

    def _forget(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self._ended.discard(job_id)
            job = self._jobs.get(job_id)
            if job is not None:  # its record was stored and deleted while its task ends
                job.deleted = True
        for listener in self._deletion_listeners:
            try:
                listener(job_ids)
            except Exception:  # never let a listener's bug stop retention or the worker
                log.exception("a deletion listener failed")

    async def start(self, spec: JobSpec) -> JobStatus:
        """Validate ``spec``, start the job, return its RUNNING status once the process runs.

        Raises InvalidJobSpec (nothing was created), WorkerClosed, or WorkerError (e.g. the
        cgroup could not be created).
        """
        return await self.start_with(lambda: spec)

    async def start_with(self, build: Callable[[], JobSpec], authorize: Authorize | None = None) -> JobStatus:
        """:meth:`start` the spec that ``build()`` returns. ``build`` runs first, in the
        start's worker thread, before anything is created: blocking checks (user lookups,
        stat) belong there, and whatever it raises propagates unchanged (nothing was created).
        ``authorize`` (a policy) is given the program file once the job's user has opened it
        and returns the path to execute (``validate.prepare``); what it raises propagates too.

        The start is one thread call (see ``launch.py``); it cannot be cancelled half-way.
        If the caller is cancelled meanwhile, the job runs (and is listed) and Cancelled
        reaches the caller at its next checkpoint: only the caller misses its id.
        """
        if self._closed:
            raise WorkerClosed("the worker is shutting down and starts no new jobs")
        if self._unsaved:
            await self._save_unsaved()
        job_id = str(uuid.uuid4())
        state = Launch(job_id=job_id, path=self._out_dir / f"{job_id}.out")
        try:
            started = await trio.to_thread.run_sync(lambda: launch(
                state, build, driver=self._driver, store=self._store, spools=self._spools,
                authorize=authorize))
        except BaseException as exc:
            await undo(state, CLEANUP_TIMEOUT)
            if isinstance(exc, CgroupError):
                raise WorkerError(f"cannot set up the job's cgroup: {exc}") from exc
            raise
        # The process runs and its record exists: from here to start_soon, no checkpoint.
        output = OutputLog(state.path, cap=self._output_cap, tail_size=self._tail_size,
                           write_fd=started.fd)
        job = Job(job_id=job_id, spec=started.spec, driver=self._driver, store=self._store,
                  output=output, cgroup=started.cgroup, spawned=started.spawned,
                  created_at=started.status.created_at, spools=self._spools)
        self._jobs[job_id] = job
        self._nursery.start_soon(self._run_job, job)
        if self._closed:  # shutdown began while we were starting: it did not see this job
            await job.stop(0, "shutdown")
            raise WorkerClosed("the worker is shutting down; the job was stopped")
        return started.status

    async def _run_job(self, job: Job) -> None:
        try:
            await job.supervise()
        except Exception:
            log.exception("job %s: supervisor failed", job.job_id)  # never take down others
        finally:
            if job.ended:
                self._ended.add(job.job_id, job.output.size)
                if not job.saved and job.final is not None:
                    self._unsaved[job.job_id] = job.final
            del self._jobs[job.job_id]
            if job.final is not None and not job.deleted:
                self._job_ended(job.final)
            self._retainer.poke()

    def _job_ended(self, status: JobStatus) -> None:
        for listener in self._end_listeners:
            try:
                listener(status)
            except Exception:  # a listener's bug must not stop the worker
                log.exception("an end listener failed")

    async def _save_unsaved(self) -> None:
        """Retry storing final statuses that failed earlier (stops at the first failure);
        once all are stored, free the journal slots that kept them (see worker/finals.py)."""
        for job_id, status in list(self._unsaved.items()):
            try:
                await self._store.update(status)
            except WorkerError as exc:
                log.warning("job %s: still cannot store the final status: %s", job_id, exc)
                return
            self._unsaved.pop(job_id, None)  # a concurrent retry may have stored it too
        if self._store.finals_pending and not self._store.closed:
            await self._store.clear_finals()

    async def _retry_unsaved(self) -> None:
        """After each retention pass (which may have freed space): retry final records."""
        if self._unsaved or self._store.finals_pending:
            await self._save_unsaved()

    async def stop(self, job_id: str, *, grace: float | None = None) -> StopResult:
        """Stop a job: SIGTERM, ``grace`` seconds (default: the worker's), SIGKILL.

        Returns once the job has ended. Stopping an ended job returns its status with
        ``force_ended`` False. Raises JobNotFound.
        """
        if grace is None:
            grace = self._default_grace
        _check_grace(grace)
        job = self._jobs.get(job_id)
        if job is not None:
            return await job.stop(grace, "user")
        return StopResult(status=await self.status(job_id), force_ended=False)

    async def status(self, job_id: str) -> JobStatus:
        """The job's status (usage is read live while it runs). Raises JobNotFound."""
        job = self._jobs.get(job_id)
        if job is not None:
            return await job.status()
        if not isinstance(job_id, str):
            raise JobNotFound(f"no job {job_id!r}")
        if job_id in self._unsaved:
            await trio.lowlevel.checkpoint()
            return self._unsaved[job_id]
        status = await self._store.get(job_id)
        if status is None:
            raise JobNotFound(f"no job {job_id}; `list` shows the jobs that exist")
        return status

    def running_count(self, *, owner: str | None = None) -> int:
        """How many jobs (of ``owner``, or of everyone) run now. In memory: no store query,
        so a quota check costs O(running jobs), not O(history)."""
        return sum(1 for job in self._jobs.values() if not job.ended and owner in (None, job.owner))

    async def job_page(self, *, owner: str | None = None, after: int = 0, limit: int) -> list[tuple[int, str]]:
        """(position, id) of at most ``limit`` jobs (``owner=None``: everyone's) after the
        position ``after`` (0: from the first job), in start order (the order of
        :meth:`list`); a cheap index scan, for callers that keep ended jobs' statuses (which
        never change) and need :meth:`statuses` only for the others. Positions only grow, so
        a later call with the last position seen continues where it stopped, also while new
        jobs start."""
        return await self._store.job_page(owner, after, limit)

    async def statuses(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """The status of each of these jobs, as :meth:`list` shows it (a running job without
        live usage). Ids of no job are left out. Running jobs are answered from memory; the
        store is asked (one query) only for the others."""
        found: dict[str, JobStatus] = {}
        others: list[str] = []
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is not None:
                found[job_id] = job.status_now()
            elif job_id in self._unsaved:
                found[job_id] = self._unsaved[job_id]
            else:
                others.append(job_id)
        if others:
            records = await self._store.get_many(others)
            for job_id, record in records.items():
                # a job may have started or ended while we waited for the store
                job = self._jobs.get(job_id)
                found[job_id] = (job.status_now() if job is not None
                                 else self._unsaved.get(job_id, record))
        else:
            await trio.lowlevel.checkpoint()
        return found

    async def list(self, *, owner: str | None = None) -> list[JobStatus]:
        """Jobs in start order: every job (``owner=None``) or those of ``owner``."""
        records = await self._store.list(owner)
        result = []
        for record in records:
            job = self._jobs.get(record.job_id)
            result.append(job.status_now() if job is not None
                          else self._unsaved.get(record.job_id, record))
        return result

    def follow(self, job_id: str, offset: int = 0, *, wait: bool = True,
               max_chunk: int = DEFAULT_MAX_CHUNK) -> OutputReader:
        """An async iterator of the job's output from ``offset`` (see OutputReader).

        Raises JobNotFound, or InvalidArgument for a negative offset or max_chunk < 1.
        """
        job = self._jobs.get(job_id)
        if job is not None:
            return job.output.follow(offset, wait=wait, max_chunk=max_chunk)
        if self._store.closed:
            raise WorkerClosed("the worker is closed")
        size = self._ended.get(job_id) if isinstance(job_id, str) else None
        name = _canonical_job_id(job_id)
        if name is None:
            raise JobNotFound(f"no job {job_id!r}; `list` shows the jobs that exist")
        path = self._out_dir / f"{name}.out"
        # Opened here, not at the reader's first read: the reader then holds the inode, so
        # retention deleting the job meanwhile never cuts it short (worker/retention.py).
        # One cached inode lookup: cheaper than a thread hop.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise JobNotFound(f"no job {job_id!r}; `list` shows the jobs that exist") from None
        except OSError as exc:
            raise WorkerError(f"cannot read the output file {path}: {exc}") from exc
        try:
            if size is None:  # an older job: its spool file says how much output it has
                size = os.fstat(fd).st_size
            return OutputLog.ended_log(path, size=size).follow(offset, wait=wait, max_chunk=max_chunk,
                                                               fd=fd)
        except BaseException:
            os.close(fd)
            raise

    def followers(self, job_id: str) -> int:
        """Open readers of a running job's output (0 for an ended or unknown job).

        A debug surface: a follower whose client died must be gone promptly."""
        job = self._jobs.get(job_id)
        return job.output.readers if job is not None else 0

    async def wait_followers(self, job_id: str, at_most: int) -> None:
        """Return once a running job has at most ``at_most`` open readers (or has ended)."""
        job = self._jobs.get(job_id)
        if job is None:
            await trio.lowlevel.checkpoint()
            return
        await job.output.wait_readers(at_most)

    async def shutdown(self, grace: float | None = None) -> None:
        """Start no new jobs; stop every running one (reason: shutdown) and wait. Idempotent."""
        if grace is None:
            grace = self._default_grace
        _check_grace(grace)
        self._closed = True
        async with trio.open_nursery() as nursery:
            for job in list(self._jobs.values()):
                nursery.start_soon(job.stop, grace, "shutdown")

        if self._unsaved and not self._store.closed:
            await self._save_unsaved()
