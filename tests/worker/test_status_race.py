"""A status read racing the job's end: the cgroup vanishes under the usage read.

The end of a job reads its cgroup's final usage and removes the cgroup; a ``status`` that
started reading live usage just before gets an error from the vanished files. It must answer
with the final status (which has the usage), not a warning and a status with zero usage.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import trio

from trio_jobs.worker import JobState
from trio_jobs.worker.cgroups.base import CgroupError

from .conftest import sh

if TYPE_CHECKING:
    import pytest

    from trio_jobs.worker import Worker
    from trio_jobs.worker.limits import Usage


async def test_status_during_the_end_answers_the_final_status(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    started = await worker.start(sh("exec sleep 1000"))
    job = worker._jobs[started.job_id]
    real_usage = job._cgroup.usage

    async def vanishing_usage() -> Usage:
        nursery.start_soon(functools.partial(worker.stop, started.job_id, grace=0))
        while not job._ending:  # the end has begun: the cgroup is going away
            await trio.sleep(0.001)
        raise CgroupError("cannot read cpu.stat: No such device")

    job._cgroup.usage = vanishing_usage  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            status = await worker.status(started.job_id)
    assert status.state is JobState.KILLED
    assert status == await worker.status(started.job_id)  # the recorded final status
    assert "cannot read usage" not in caplog.text
    job._cgroup.usage = real_usage  # type: ignore[method-assign]
