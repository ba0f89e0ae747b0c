"""``Worker.add_end_listener``: each job's final status, once, when the job leaves memory.

The service keeps what it is given for GetJobStatus (tests/service/test_status_cache.py);
here: the status is the one the store then holds, every job is reported exactly once, and a
listener that raises is logged without keeping the others or the worker from going on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
import trio.testing

from .conftest import read_all, sh

if TYPE_CHECKING:
    import pytest

    from trio_jobs.worker import JobStatus, Worker


async def test_each_job_is_reported_once_with_its_stored_final_status(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(status: JobStatus) -> None:
        raise RuntimeError("a listener's bug")

    seen: list[JobStatus] = []
    worker.add_end_listener(broken)
    worker.add_end_listener(seen.append)
    ids = []
    with trio.fail_after(20):
        for script in ("echo one", "exit 4", "kill -TERM $$"):
            ids.append((await worker.start(sh(script))).job_id)
            await read_all(worker, ids[-1])  # ends once the job has ended
        await trio.testing.wait_all_tasks_blocked()
    assert [s.job_id for s in seen] == ids
    assert all(s.ended for s in seen)
    assert seen == [await worker.status(job_id) for job_id in ids]  # from the store now
    assert [(s.exit_code, s.signal) for s in seen] == [(0, None), (4, None), (None, 15)]
    failures = [r for r in caplog.records if r.message == "an end listener failed"]
    assert len(failures) == 3
    assert all(r.levelno == logging.ERROR for r in failures)


async def test_a_running_job_is_not_reported(worker: Worker) -> None:
    seen: list[JobStatus] = []
    worker.add_end_listener(seen.append)
    job = await worker.start(sh("sleep 1000"))
    await trio.testing.wait_all_tasks_blocked()
    assert seen == []
    with trio.fail_after(20):
        await worker.stop(job.job_id, grace=0)
        await trio.testing.wait_all_tasks_blocked()
    assert [(s.job_id, s.stopped_by_user) for s in seen] == [(job.job_id, True)]
