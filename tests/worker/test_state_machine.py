"""A hypothesis state machine: start / natural exit / stop / exit-racing-stop / follow in random
orders against a model of each job's state, with real processes.

Each job is ``sh`` blocked reading a FIFO the test holds open; writing ``code\\n`` into it makes
the job exit on its own with that code. The worker runs in its own trio loop in a thread (the
rules are synchronous) and is reached with ``trio.from_thread``.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from trio_jobs.worker import JobSpec, JobState, StopResult, open_worker

from .conftest import read_all

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from trio_jobs.worker import JobStatus, Worker

T = TypeVar("T")
SCRIPT = 'echo started; IFS= read -r code < "$1"; echo "bye $code"; exit "$code"'


class WorkerThread:
    """open_worker running in a trio loop of its own thread."""

    def __init__(self, data_dir: Path) -> None:
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, args=(data_dir,), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("worker thread did not start")
        if self._error is not None:
            raise self._error

    def _main(self, data_dir: Path) -> None:
        try:
            trio.run(self._serve, data_dir)
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self, data_dir: Path) -> None:
        async with open_worker(data_dir, default_grace=5) as worker:
            self.worker: Worker = worker
            self.token = trio.lowlevel.current_trio_token()
            self._done = trio.Event()
            self._ready.set()
            await self._done.wait()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def bounded() -> T:
            with trio.fail_after(30):
                return await fn(*args)

        return trio.from_thread.run(bounded, trio_token=self.token)

    def close(self) -> None:
        trio.from_thread.run_sync(self._done.set, trio_token=self.token)
        self._thread.join(60)
        assert not self._thread.is_alive()
        if self._error is not None:
            raise self._error


@dataclass
class ModelJob:
    job_id: str
    fifo_fd: int
    code: int
    state: JobState = JobState.RUNNING
    signal: int | None = None
    output: bytes | None = None  # final output once ended
    code_written: bool = False  # the exit code was written into the FIFO


class JobMachine(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self._dir = tempfile.TemporaryDirectory()
        self.root = Path(self._dir.name)
        self.portal = WorkerThread(self.root / "data")
        self.model: dict[str, ModelJob] = {}
        self.count = 0

    # -- rules ----------------------------------------------------------------------------------

    @rule(target=jobs, code=st.integers(0, 5))
    def start(self, code: int) -> str:
        self.count += 1
        fifo = self.root / f"fifo{self.count}"
        os.mkfifo(fifo)
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)  # a writer exists: no block
        spec = JobSpec(command="/bin/sh", args=("-c", SCRIPT, "sh", str(fifo)), owner="m")
        status = self.portal.run(self.portal.worker.start, spec)
        assert status.state is JobState.RUNNING
        self.model[status.job_id] = ModelJob(job_id=status.job_id, fifo_fd=fd, code=code)
        return status.job_id

    def _ended(self, job: ModelJob, status: JobStatus) -> None:
        job.state, job.signal = status.state, status.signal
        job.output = self.portal.run(read_all, self.portal.worker, job.job_id)
        if status.state is JobState.EXITED:
            assert status.exit_code == job.code
            assert job.output == f"started\nbye {job.code}\n".encode()
        else:  # killed somewhere along the script (after reading the code, if it was written)
            assert f"started\nbye {job.code}\n".encode().startswith(job.output)
            if not job.code_written:
                assert b"started\n".startswith(job.output)

    @rule(job_id=jobs)
    def natural_exit(self, job_id: str) -> None:
        job = self.model[job_id]
        if job.state is not JobState.RUNNING:
            return
        os.write(job.fifo_fd, f"{job.code}\n".encode())
        job.code_written = True
        self.portal.run(read_all, self.portal.worker, job_id)  # ends when the job ended
        status = self.portal.run(self.portal.worker.status, job_id)
        assert (status.state, status.exit_code) == (JobState.EXITED, job.code)
        self._ended(job, status)

    @rule(job_id=jobs, grace=st.sampled_from([0, 5]))
    def stop(self, job_id: str, grace: float) -> None:
        job = self.model[job_id]
        result: StopResult = self.portal.run(
            lambda: self.portal.worker.stop(job_id, grace=grace))
        if job.state is JobState.RUNNING:  # it is blocked on the FIFO: only the stop ends it
            assert result.force_ended
            assert result.status.stopped_by_user
            assert (result.status.state, result.status.signal) == (
                JobState.KILLED, signal.SIGKILL if grace == 0 else signal.SIGTERM)
            self._ended(job, result.status)
        else:
            assert not result.force_ended
            assert (result.status.state, result.status.signal) == (job.state, job.signal)

    @rule(job_id=jobs)
    def exit_racing_stop(self, job_id: str) -> None:
        job = self.model[job_id]
        if job.state is not JobState.RUNNING:
            return
        os.write(job.fifo_fd, f"{job.code}\n".encode())
        job.code_written = True
        result: StopResult = self.portal.run(lambda: self.portal.worker.stop(job_id, grace=5))
        s = result.status
        assert result.force_ended == (s.state is JobState.KILLED)
        assert s.stopped_by_user == result.force_ended
        assert s.state is JobState.EXITED or s.signal == signal.SIGTERM
        self._ended(job, s)

    @rule(job_id=jobs, offset=st.integers(0, 30))
    def follow_now(self, job_id: str, offset: int) -> None:
        job = self.model[job_id]
        got = self.portal.run(partial(read_all, self.portal.worker, job_id, offset, wait=False))
        if job.output is not None:
            assert got == job.output[offset:]
        else:  # running and blocked on the FIFO: at most "started\n" so far
            full = self.portal.run(partial(read_all, self.portal.worker, job_id, 0, wait=False))
            assert b"started\n".startswith(full)
            assert full[offset:].startswith(got)  # read later: the output only grows

    @rule(job_id=consumes(jobs))
    def forget(self, job_id: str) -> None:
        """Drop a job from the bundle (it stays in the worker and the model)."""

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def statuses_match_the_model(self) -> None:
        listed = {s.job_id: s for s in self.portal.run(self.portal.worker.list)}
        assert listed.keys() == self.model.keys()
        for job_id, job in self.model.items():
            status = listed[job_id]
            assert status.state is job.state
            assert status.signal == job.signal
            if job.output is not None:
                assert status.output_bytes == len(job.output)
                assert status.ended_at is not None
            else:
                assert status.ended_at is None

    def teardown(self) -> None:
        try:
            self.portal.close()  # stops the jobs still running (reason: shutdown)
        finally:
            for job in self.model.values():
                os.close(job.fifo_fd)
            self._dir.cleanup()


JobMachine.TestCase.settings = settings(max_examples=25, stateful_step_count=12, deadline=None)
test_job_state_machine = JobMachine.TestCase
