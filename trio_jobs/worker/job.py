"""One running job: its process, cgroup and output pump, from start to the final record.

Life of a job (all inside :meth:`Job.run`, a task in the worker's nursery that owns a nursery
for the job's pump):

1. create the cgroup; spawn the held wrapper; ``add_process``; release it (see ``spawn``);
   insert the RUNNING record; ``task_status.started(status)``.
2. the pump (a thread of its own, worker/pump.py) copies the pipe into the output log until EOF.
3. the main process exits (pidfd readable, not reaped) -> ``kill_all`` on the cgroup ->
   ``wait_empty`` -> wait for the pump to reach EOF, at most ``DRAIN_TIMEOUT`` (a process that
   escaped the kill -- only possible without cgroups, via setsid -- may hold the pipe forever;
   then we stop reading, and it gets SIGPIPE) -> reap -> usage and OOM -> ``remove`` ->
   final status in memory -> the log ends (followers finish) -> the record is written.

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
from .limits import Usage
from .pump import pump_pipe
from .spawn import PIPE_SIZE, Spawned, spawn
from .spec import JobState, JobStatus, StopResult, check_transition
from .store import utcnow

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .cgroups.base import CgroupDriver, JobCgroup
    from .output import OutputLog
    from .spawn import ExitInfo
    from .spec import JobSpec
    from .store import JobStore
    from .validate import Prepared

log = logging.getLogger("trio_jobs.worker")

PIPE_READ_SIZE: Final = PIPE_SIZE  # up to a whole pipe's worth per read and file write
DRAIN_TIMEOUT: Final = 2.0  # after everything was killed, how long EOF may take to arrive
EMPTY_TIMEOUT: Final = 10.0  # how long a killed cgroup may take to empty before we go on
CLEANUP_TIMEOUT: Final = 15.0  # shielded cleanup when the job task itself is cancelled

Reason = Literal["user", "shutdown"]


@final
class Job:
    """A job this worker started. Created by the Worker, which runs :meth:`run`."""

    def __init__(self, *, job_id: str, spec: JobSpec, prepared: Prepared, driver: CgroupDriver,
                 store: JobStore, output: OutputLog) -> None:
        self.job_id = job_id
        self.output = output
        self._spec = spec
        self._prepared = prepared
        self._driver = driver
        self._store = store
        self._cgroup: JobCgroup | None = None
        self._spawned: Spawned | None = None
        self._signalled_by: Reason | None = None
        self._ended = trio.Event()
        self._final: JobStatus | None = None
        self._created_at = utcnow()
        self.started = False  # True once the process runs and the record exists
        self.saved = False  # True once the final record is in the store

    # -- status -------------------------------------------------------------------------------

    def _status(self, *, usage: Usage | None = None) -> JobStatus:
        spec = self._spec
        return JobStatus(
            job_id=self.job_id, owner=spec.owner, command=spec.command, args=tuple(spec.args),
            state=JobState.RUNNING, exit_code=None, signal=None, stopped_by_user=False,
            oom_killed=False, stopped_by_shutdown=False, created_at=self._created_at,
            ended_at=None, limits=spec.limits, usage=usage or Usage(),
            output_bytes=self.output.size, output_truncated=self.output.truncated,
        )

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
        if live_usage and self._cgroup is not None:
            try:
                usage = await self._cgroup.usage()
            except CgroupError as exc:
                log.warning("job %s: cannot read usage: %s", self.job_id, exc)
        return self._final or self._status(usage=usage)

    async def wait_ended(self) -> JobStatus:
        await self._ended.wait()
        assert self._final is not None
        return self._final

    # -- start and life -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[JobStatus] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Start the job, report ``started(status)`` once it runs, then supervise it to the end.

        Errors before ``started`` propagate (no record was written); after it, every error is
        logged and the job still gets a final record: this task never raises then.
        """
        self._cgroup = cgroup = await self._driver.create(self.job_id, self._spec.limits)
        try:
            spec, prepared = self._spec, self._prepared
            spawned = await spawn(prepared.program, tuple(spec.args), env=prepared.env,
                                  cwd=spec.working_dir, run_as=spec.run_as)
        except BaseException:
            with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                await cgroup.remove()
            raise
        self._spawned = spawned
        try:
            await cgroup.add_process(spawned.pid)
            spawned.release()
            status = self._status()
            await self._store.insert(status, pid=spawned.pid)
        except BaseException:
            with trio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                await self._abort_start(spawned, cgroup)
            raise
        assert spawned.output_fd is not None
        output_fd, spawned.output_fd = spawned.output_fd, None  # the pump owns it now
        self.started = True
        task_status.started(status)
        await self._supervise(spawned, cgroup, output_fd)

    async def _abort_start(self, spawned: Spawned, cgroup: JobCgroup) -> None:
        spawned.abort()  # a held wrapper exits 125 without exec
        if not spawned.has_exited():
            await _quietly(cgroup.kill_all(), self.job_id, "kill")
            spawned.kill()
        await spawned.wait_exited()
        spawned.reap()
        spawned.close_pipes()
        await _quietly(cgroup.remove(), self.job_id, "remove cgroup")

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
        usage, oom = Usage(), False
        if self._driver.name == "none":
            if exit_info is not None and exit_info.rusage is not None:
                ru = exit_info.rusage
                usage = Usage(cpu_usec=int((ru.ru_utime + ru.ru_stime) * 1_000_000),
                              memory_peak_bytes=ru.ru_maxrss * 1024)
        else:
            try:
                usage = await cgroup.usage()
                oom = await cgroup.oom_killed()
            except CgroupError as exc:
                log.warning("job %s: cannot read final usage: %s", self.job_id, exc)
        await _quietly(cgroup.remove(), self.job_id, "remove the cgroup")
        final = self._publish(exit_info, usage, oom)
        try:
            await self._store.update(final)
            self.saved = True
        except WorkerError as exc:
            # e.g. the disk is full: the worker keeps the status and retries (see Worker)
            log.error("job %s: cannot store the final status (will retry): %s", self.job_id, exc)

    def _publish(self, exit_info: ExitInfo | None, usage: Usage, oom: bool) -> JobStatus:
        code = exit_info.returncode if exit_info is not None else -signal.SIGKILL
        if exit_info is None:
            log.error("job %s: main process did not exit after SIGKILL", self.job_id)
        if code >= 0:
            state, exit_code, sig, by = JobState.EXITED, code, None, None
        else:
            state, exit_code, sig, by = JobState.KILLED, None, -code, self._signalled_by
        check_transition(JobState.RUNNING, state)
        base = self._status(usage=usage)
        self._final = JobStatus(
            **{**base.__dict__, "state": state, "exit_code": exit_code, "signal": sig,
               "stopped_by_user": by == "user", "stopped_by_shutdown": by == "shutdown",
               "oom_killed": oom, "ended_at": utcnow()},
        )
        self.output.finish()
        self._ended.set()
        return self._final

    # -- stop -----------------------------------------------------------------------------------

    def _note_signal(self, reason: Reason) -> bool:
        """Record that a stop signals the job now; False if the main process already exited."""
        assert self._spawned is not None
        if self._spawned.has_exited():
            return False
        if self._signalled_by is None:
            self._signalled_by = reason
        return True

    async def stop(self, grace: float, reason: Reason = "user") -> StopResult:
        """SIGTERM, wait ``grace`` seconds, SIGKILL; return once ended. See the module doc."""
        assert self._cgroup is not None
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


async def _quietly(op: Awaitable[object], job_id: str, what: str) -> None:
    """Await a cgroup operation; log (not raise) a CgroupError: the job must still end."""
    try:
        await op
    except CgroupError as exc:
        log.warning("job %s: cannot %s: %s", job_id, what, exc)
