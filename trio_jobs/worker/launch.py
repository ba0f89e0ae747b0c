"""Starting a job in one thread call, and the spool files that make it cheap.

Theory of operation. A start is a chain of small blocking steps: build the spec (the service
resolves its user here), validate it (``prepare``: a few opens and stats as the job's user,
and the policy's check of the opened program), create the output spool file, create the
cgroup (mkdir + limit writes in each hierarchy), fork the held wrapper (``spawn_blocking``), move it into the cgroup, release it,
insert the RUNNING record. Each step takes microseconds to a fraction of a millisecond, so a
``trio.to_thread`` round trip per step (0.05-0.3 ms each on a loaded 2-core host, where the
loop thread and the worker thread must both be scheduled) used to cost more than the steps.
:func:`launch` runs the whole chain in one worker thread, and the event loop is free
meanwhile.

Every guarantee of the step-by-step start holds:

- *Nothing is left when a start fails.* :func:`launch` records in its :class:`Launch` what
  it has created so far; when it raises, the thread has finished, and the caller undoes
  exactly that on the event loop (:func:`undo`: a shielded, bounded clean-up, because killing
  a cgroup and waiting for it to empty wait for the kernel). No record exists unless the
  insert -- the last step -- succeeded.
- *Placement before exec.* The wrapper is released only after ``add_process_blocking``.
- *Cancellation.* A ``trio.to_thread.run_sync`` call is not cancellable: once it returns,
  the process runs and its record exists, and the caller registers the job synchronously
  (no checkpoint between), so a cancelled caller can never leave an unsupervised process.
- *Crash right after the answer.* The record is inserted before the call returns, so a
  crash afterwards leaves a RUNNING record: the next start marks it LOST and kills the
  leftover (``leftovers``, or the cgroup driver's ``prepare()``).

Spool files. Creating a file allocates an inode; on the ext4 disk of our build VMs that
takes 0.06-1 ms (p50 ~0.6 ms, varying with the journal's activity), more than all other steps
together, while giving an existing inode a name takes ~20 us. :class:`SpoolFiles` keeps a few
*unnamed* files (``O_TMPFILE``) open in the output directory, created off the critical path
(at open, and by each job's end in the thread call that writes its final record: no round
trip of its own, which costs the event loop ~0.3 ms of CPU here), and a start links one to its ``<job>.out`` name (``linkat`` through
``/proc/self/fd``, which fails if the name exists, like ``O_EXCL``). An unnamed file has no
directory entry, so a crash leaves nothing behind (the kernel frees it). Where ``O_TMPFILE``
or ``/proc`` is missing, a start creates its file as before.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

import trio

from .cgroups.base import CgroupError
from .errors import WorkerError
from .limits import Usage
from .spawn import spawn_blocking
from .spec import JobState, JobStatus
from .store import utcnow
from .validate import prepare

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from datetime import datetime
    from pathlib import Path

    from .cgroups.base import CgroupDriver, JobCgroup
    from .spawn import Spawned
    from .spec import JobSpec
    from .store import JobStore
    from .validate import Authorize

log = logging.getLogger("trio_jobs.worker")

SPARE_SPOOL_FILES: Final = 4
"""Unnamed spool files kept ready: enough for a burst of starts before jobs end and refill
them (each costs one fd and one empty inode); past that, a start creates its own file."""


def running_status(job_id: str, spec: JobSpec, created_at: datetime, *, usage: Usage | None = None,
                   output_bytes: int = 0, output_truncated: bool = False) -> JobStatus:
    """The status of a job that runs (what the record says until it ends)."""
    return JobStatus(
        job_id=job_id, owner=spec.owner, command=spec.command, args=tuple(spec.args),
        state=JobState.RUNNING, exit_code=None, signal=None, stopped_by_user=False,
        oom_killed=False, stopped_by_shutdown=False, created_at=created_at, ended_at=None,
        limits=spec.limits, usage=usage or Usage(), output_bytes=output_bytes,
        output_truncated=output_truncated,
    )


@dataclass(kw_only=True)
class Launch:
    """One start: what :func:`launch` has created so far (set in its thread, in this order),
    for :func:`undo`. Read it only once the thread call has raised."""

    job_id: str
    path: Path  # the output spool file
    fd: int | None = None  # the spool file, open for writing (``path`` exists once set)
    cgroup: JobCgroup | None = None
    spawned: Spawned | None = None


@dataclass(frozen=True, kw_only=True)
class Started:
    """A successful :func:`launch`: the process runs (released), its record exists."""

    spec: JobSpec
    fd: int  # the spool file, open for writing
    cgroup: JobCgroup
    spawned: Spawned
    status: JobStatus  # the RUNNING record


def launch(state: Launch, build: Callable[[], JobSpec], *, driver: CgroupDriver, store: JobStore,
           spools: SpoolFiles, authorize: Authorize | None = None) -> Started:
    """Build, validate, create, spawn, place, release and record a job. Blocking: run it in
    one worker thread. On error, raises with ``state`` telling what exists (see :func:`undo`).

    Raises whatever ``build`` raises, InvalidJobSpec, CgroupError, WorkerError, WorkerClosed.
    """
    spec = build()
    prepared = prepare(spec, authorize)  # raises InvalidJobSpec before anything exists
    spec = dataclasses.replace(spec, command=prepared.program)  # the record shows what runs
    created_at = utcnow()
    fd = state.fd = spools.take(state.path)
    cgroup = state.cgroup = driver.create_blocking(state.job_id, spec.limits, group=spec.group,
                                                   group_limits=spec.group_limits)
    spawned = state.spawned = spawn_blocking(prepared.program, tuple(spec.args), env=prepared.env,
                                             base_env=prepared.base_env, cwd=prepared.cwd,
                                             run_as=spec.run_as)
    cgroup.add_process_blocking(spawned.pid)
    spawned.release()
    status = running_status(state.job_id, spec, created_at)
    store.insert_blocking(status, pid=spawned.pid, forked=spawned.forked)
    return Started(spec=spec, fd=fd, cgroup=cgroup, spawned=spawned, status=status)


async def undo(state: Launch, cleanup_timeout: float) -> None:
    """Remove what a failed :func:`launch` created: process, cgroup, spool file. Shielded and
    bounded by ``cleanup_timeout``; logs (never raises) what it cannot undo."""
    with trio.move_on_after(cleanup_timeout, shield=True) as scope:
        spawned, cgroup = state.spawned, state.cgroup
        if spawned is not None:
            assert cgroup is not None
            spawned.abort()  # a held wrapper exits 125 without exec
            if not spawned.has_exited():
                await quietly(cgroup.kill_all(), state.job_id, "kill")
                spawned.kill()
            await spawned.wait_exited()
            spawned.reap()
            spawned.close_pipes()
        if cgroup is not None:
            await quietly(cgroup.remove(), state.job_id, "remove the cgroup")
        if state.fd is not None:
            fd, state.fd = state.fd, None
            os.close(fd)
            await trio.to_thread.run_sync(lambda: state.path.unlink(missing_ok=True))
    if scope.cancelled_caught:
        log.warning("job %s: the clean-up of a failed start took over %.0f s", state.job_id,
                    cleanup_timeout)


async def quietly(op: Awaitable[object], job_id: str, what: str) -> None:
    """Await a cgroup operation; log (not raise) a CgroupError: the job must still end."""
    try:
        await op
    except CgroupError as exc:
        log.warning("job %s: cannot %s: %s", job_id, what, exc)


@final
class SpoolFiles:
    """Unnamed spool files, created ahead of need in the output directory (see the module
    doc). Thread-safe: :meth:`take` runs in start threads, :meth:`refill` in job-end threads."""

    def __init__(self, out_dir: Path, *, spares: int = SPARE_SPOOL_FILES) -> None:
        self._out_dir = out_dir
        self._want = spares
        self._lock = threading.Lock()
        self._spares: list[int] = []  # fds of unnamed files, open for writing
        self._dir_fd: int | None = None
        self._usable = spares > 0  # False once O_TMPFILE or linking through /proc failed
        self._closed = False

    @property
    def spares(self) -> int:
        return len(self._spares)

    @property
    def wanted(self) -> bool:
        """Whether :meth:`refill` has something to do."""
        return self._usable and not self._closed and len(self._spares) < self._want

    def take(self, path: Path) -> int:
        """Create ``path`` (which must not exist) and return an fd open for writing it.

        Blocking. Raises WorkerError (e.g. the disk is full, or the name exists)."""
        with self._lock:
            fd = self._spares.pop() if self._spares else None
            dir_fd = self._dir_fd
        if fd is not None and dir_fd is not None:
            try:
                os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=dir_fd, follow_symlinks=True)
                return fd
            except OSError as exc:
                os.close(fd)
                if exc.errno == errno.EEXIST:
                    raise WorkerError(f"cannot create the output file {path}: {exc}") from exc
                self._disable(f"cannot link a spool file into {self._out_dir}: {exc}")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise WorkerError(f"cannot create the output file {path}: {exc}") from exc

    def refill(self) -> None:
        """Create unnamed files until there are enough spares. Blocking; never raises (a
        failure only means that starts create their files themselves). Several threads may
        refill at once: the count is checked again under the lock, so it never overshoots."""
        while self.wanted:
            try:
                if self._dir_fd is None:
                    dir_fd = os.open(self._out_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                     | os.O_CLOEXEC)
                    with self._lock:
                        if self._dir_fd is None and not self._closed:
                            self._dir_fd, dir_fd = dir_fd, -1
                    if dir_fd >= 0:
                        os.close(dir_fd)
                fd = os.open(self._out_dir, os.O_TMPFILE | os.O_WRONLY | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EMFILE, errno.ENFILE, errno.EDQUOT):
                    return  # try again at the next job's end
                self._disable(f"no O_TMPFILE in {self._out_dir}: {exc}")
                return
            with self._lock:
                keep = not self._closed and len(self._spares) < self._want
                if keep:
                    self._spares.append(fd)
            if not keep:
                os.close(fd)
                return

    def _disable(self, why: str) -> None:
        log.info("spool files are created at each start: %s", why)
        self._usable = False

    def close(self) -> None:
        """Close the spares (unnamed: nothing remains on disk). Idempotent."""
        with self._lock:
            self._closed = True
            fds, self._spares = self._spares, []
            dir_fd, self._dir_fd = self._dir_fd, None
        for fd in fds:
            os.close(fd)
        if dir_fd is not None:
            os.close(dir_fd)
