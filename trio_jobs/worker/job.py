"""One running job: its process, cgroup and output pump, from start to the final record.

Life of a job:

1. start, in one worker thread (``launch.py``): create the cgroup; spawn the held wrapper;
   ``add_process``; release it (see ``spawn``); insert the RUNNING record. Only then is a
   :class:`Job` made, and :meth:`Job.supervise` (a task in the worker's nursery that owns a
   nursery for the job's pump) runs it to its end:
2. the pump (a thread of its own, worker/pump.py) copies the pipe into the output log until EOF.
3. the main process exits (pidfd readable, not reaped) -> ``kill_all`` on the cgroup ->
   ``wait_empty`` -> wait for the pump to reach EOF, at most ``DRAIN_TIMEOUT`` (a process that
   escaped the kill -- only possible without cgroups, via setsid -- may hold the pipe forever;
   then we stop reading, and it gets SIGPIPE) -> reap -> in one worker thread: usage and OOM,
   the cgroup's rmdir, the final record written -> (``remove`` if the cgroup was still busy)
   -> final status in memory -> the log ends (followers finish).

Stop: SIGTERM to every process (``signal_all``), wait up to the grace period, then
``kill_all``; wait for the end. A signal is only sent while the main process has not exited
(checked without reaping), and it is only "what ended the job" when the main process then
died of a signal: so a job that exits on its own in the same instant is EXITED with
``force_ended`` False, truthfully. A job that handles SIGTERM and exits with a code is EXITED
too (it chose its exit code); ``force_ended`` is then False.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Final, Literal, final

import trio

from .cgroups.base import CgroupError
from .errors import WorkerError
from .launch import quietly as _quietly
from .launch import running_status
from .limits import Usage
from .pump import pump_pipe
from .spawn import PIPE_SIZE
from .spec import JobState, JobStatus, StopResult, check_transition
from .store import utcnow

if TYPE_CHECKING:
    from datetime import datetime

    from .cgroups.base import CgroupDriver, JobCgroup
    from .launch import SpoolFiles
    from .output import OutputLog
    from .spawn import ExitInfo, Spawned
    from .spec import JobSpec
    from .store import JobStore

log = logging.getLogger("trio_jobs.worker")

PIPE_READ_SIZE: Final = PIPE_SIZE  # up to a whole pipe's worth per read and file write
DRAIN_TIMEOUT: Final = 2.0  # after everything was killed, how long EOF may take to arrive
EMPTY_TIMEOUT: Final = 10.0  # how long a killed cgroup may take to empty before we go on
CLEANUP_TIMEOUT: Final = 15.0  # shielded cleanup when the job task itself is cancelled

Reason = Literal["user", "shutdown"]


@final
class Job:
    """A job this worker started: its process runs and its record exists. Created by the
    Worker from a successful launch, which then runs :meth:`supervise`."""

    def __init__(self, *, job_id: str, spec: JobSpec, driver: CgroupDriver, store: JobStore,
                 output: OutputLog, cgroup: JobCgroup, spawned: Spawned,
                 created_at: datetime, spools: SpoolFiles) -> None:
        self.job_id = job_id
        self.output = output
        self._spec = spec
        self._driver = driver
        self._store = store
        self._cgroup = cgroup
        self._spawned = spawned
        self._spools = spools
        self._signalled_by: Reason | None = None
        self._ended = trio.Event()
        self._final: JobStatus | None = None
        self._ending = False  # the cgroup is being read and removed for the final status
        self._created_at = created_at
        self.saved = False  # True once the final record is in the store
        self.deleted = False  # True once retention deleted the record (the job had ended)

    # -- status -------------------------------------------------------------------------------

    def _status(self, *, usage: Usage | None = None) -> JobStatus:
        return running_status(self.job_id, self._spec, self._created_at, usage=usage,
                              output_bytes=self.output.size,
                              output_truncated=self.output.truncated)

    @property
    def ended(self) -> bool:
        return self._final is not None

    @property
    def owner(self) -> str:
        return self._spec.owner

    @property
    def final(self) -> JobStatus | None:
        """The final status once the job has ended (None while it runs)."""
        return self._final

    async def status(self, *, live_usage: bool = True) -> JobStatus:
        """The current status; for a running job with ``live_usage``, usage read now."""
        if self._final is not None:
            await trio.lowlevel.checkpoint()
            return self._final
        usage = Usage()
        if live_usage and self._ending:
            # the cgroup is going away: wait (briefly) for the final status and its usage
            with trio.move_on_after(CLEANUP_TIMEOUT):
                await self._ended.wait()
        elif live_usage:
            try:
                usage = await self._cgroup.usage()
            except CgroupError as exc:
                if not self._ending:
                    log.warning("job %s: cannot read usage: %s", self.job_id, exc)
                else:  # it ended while we read, and its cgroup went: the final status has it
                    with trio.move_on_after(CLEANUP_TIMEOUT):
                        await self._ended.wait()
        return self._final or self._status(usage=usage)

    def status_now(self) -> JobStatus:
        """The current status without usage (what ``list`` shows), synchronously."""
        return self._final or self._status()

    async def wait_ended(self) -> JobStatus:
        await self._ended.wait()
        assert self._final is not None
        return self._final

    # -- life -----------------------------------------------------------------------------------

    async def supervise(self) -> None:
        """Run the job to its end and write its final record. Never raises (errors are
        logged; the job still gets a final record); cancellation kills the job first."""
        spawned = self._spawned
        assert spawned.output_fd is not None
        output_fd, spawned.output_fd = spawned.output_fd, None  # the pump owns it now
        await self._supervise(spawned, self._cgroup, output_fd)

    async def _supervise(self, spawned: Spawned, cgroup: JobCgroup, output_fd: int) -> None:
        pump_done = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, output_fd, pump_done)
                await spawned.wait_exited()
                await _quietly(cgroup.kill_all(), self.job_id, "kill the rest of the job")
                with trio.move_on_after(EMPTY_TIMEOUT) as empty:
                    await _quietly(cgroup.wait_empty(), self.job_id, "wait for the cgroup")
                if empty.cancelled_caught:
                    log.warning("job %s: cgroup %s not empty %.0f s after kill_all", self.job_id,
                                cgroup.path, EMPTY_TIMEOUT)
                with trio.move_on_after(DRAIN_TIMEOUT):
                    await pump_done.wait()
                if not pump_done.is_set():
                    log.warning("job %s: output pipe still open %.0f s after the job ended "
                                "(an escaped process holds it); output after this is dropped",
                                self.job_id, DRAIN_TIMEOUT)
                nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                await self._finish(spawned, cgroup)

    async def _pump(self, output_fd: int, done: trio.Event) -> None:
        """Copy the job's pipe into the output log until EOF (or until cancelled)."""
        await pump_pipe(output_fd, self.output, read_size=PIPE_READ_SIZE, name=f"job {self.job_id}")
        done.set()

    async def _finish(self, spawned: Spawned, cgroup: JobCgroup) -> None:
        """Kill what is left, reap, collect usage, remove the cgroup, publish the final status."""
        if not spawned.has_exited():  # only when we are being cancelled (worker torn down)
            self._note_signal("shutdown")
            await _quietly(cgroup.kill_all(), self.job_id, "kill")
            with trio.move_on_after(CLEANUP_TIMEOUT / 2):
                await spawned.wait_exited()
        exit_info: ExitInfo | None = spawned.reap() if spawned.has_exited() else None
        spawned.close_pipes()
        if exit_info is None:
            log.error("job %s: main process did not exit after SIGKILL", self.job_id)
        # Usage, OOM, the rmdirs, the final record and a spare spool file in one thread call:
        # a dozen cgroupfs operations (~1 ms on v1) and an SQLite write that would otherwise
        # hold up the event loop (e.g. the next StartJob), for one round trip.
        self._ending = True
        base = self._status()  # the output's size: the pump has stopped
        final, removed, self.saved = await trio.to_thread.run_sync(
            self._end_blocking, cgroup, exit_info, base)
        if not removed:
            await _quietly(cgroup.remove(), self.job_id, "remove the cgroup")
        self._final = final
        self.output.finish()
        self._ended.set()

    def _end_blocking(self, cgroup: JobCgroup, exit_info: ExitInfo | None, base: JobStatus
                      ) -> tuple[JobStatus, bool, bool]:
        """(final status, cgroup removed, record stored); logs what it cannot read, remove
        or store. Then makes a spare spool file for a later start (see ``launch``)."""
        usage, oom, removed = Usage(), False, False
        if self._driver.name == "none":
            if exit_info is not None and exit_info.rusage is not None:
                ru = exit_info.rusage
                usage = Usage(cpu_usec=int((ru.ru_utime + ru.ru_stime) * 1_000_000),
                              memory_peak_bytes=ru.ru_maxrss * 1024)
        else:
            try:
                usage, oom = cgroup.final_usage_blocking()
            except CgroupError as exc:
                log.warning("job %s: cannot read final usage: %s", self.job_id, exc)
        try:
            removed = cgroup.try_remove_blocking()
        except CgroupError as exc:
            log.warning("job %s: cannot remove the cgroup yet: %s", self.job_id, exc)
        final = self._final_status(base, exit_info, usage, oom)
        try:
            # False: the database refused it (e.g. the disk is full); the store kept it in
            # reserved space (worker/finals.py) and logged why; the worker keeps the status
            # and retries (see Worker)
            saved = self._store.finalize_blocking(final)
        except WorkerError as exc:  # the store is closed
            log.error("job %s: cannot store the final status: %s", self.job_id, exc)
            saved = False
        self._spools.refill()
        return final, removed, saved

    def _final_status(self, base: JobStatus, exit_info: ExitInfo | None, usage: Usage,
                      oom: bool) -> JobStatus:
        code = exit_info.returncode if exit_info is not None else -signal.SIGKILL
        if code >= 0:
            state, exit_code, sig, by = JobState.EXITED, code, None, None
        else:
            # stable by now: a stop only records itself while the main process runs
            state, exit_code, sig, by = JobState.KILLED, None, -code, self._signalled_by
        check_transition(JobState.RUNNING, state)
        return JobStatus(
            **{**base.__dict__, "state": state, "exit_code": exit_code, "signal": sig,
               "stopped_by_user": by == "user", "stopped_by_shutdown": by == "shutdown",
               "oom_killed": oom, "usage": usage, "ended_at": utcnow()},
        )

    # -- stop -----------------------------------------------------------------------------------

    def _note_signal(self, reason: Reason) -> bool:
        """Record that a stop signals the job now; False if the main process already exited."""
        if self._spawned.has_exited():
            return False
        if self._signalled_by is None:
            self._signalled_by = reason
        return True

    async def stop(self, grace: float, reason: Reason = "user") -> StopResult:
        """SIGTERM, wait ``grace`` seconds, SIGKILL; return once ended. See the module doc."""
        if self._final is not None:  # already ended: not an error, and not our doing
            await trio.lowlevel.checkpoint()
            return StopResult(status=self._final, force_ended=False)
        if grace > 0 and self._note_signal(reason):
            await _quietly(self._cgroup.signal_all(signal.SIGTERM), self.job_id, "SIGTERM")
            with trio.move_on_after(grace):
                await self._ended.wait()
        if self._final is None and self._note_signal(reason):
            await _quietly(self._cgroup.kill_all(), self.job_id, "SIGKILL")
        final = await self.wait_ended()
        forced = final.state is JobState.KILLED and (final.stopped_by_user
                                                     or final.stopped_by_shutdown)
        return StopResult(status=final, force_ended=forced and self._signalled_by == reason)

