"""The worker with the host's real cgroup driver (v1 on hybrid hosts, v2 where available).

Job cgroups live under a parent made for the test (under this process's own cgroup) and are
removed afterwards. Skipped, with the reason, where the host offers no usable cgroups.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.worker import CgroupError, JobState, Limits, open_worker
from trio_jobs.worker.cgroups.detect import detect_driver
from trio_jobs.worker.cgroups.v1 import V1Driver
from trio_jobs.worker.cgroups.v2 import V2Driver
from trio_jobs.worker.job import DRAIN_TIMEOUT

from .conftest import read_all, sh

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from trio_jobs.worker import Worker

pytestmark = pytest.mark.cgroups


@pytest.fixture
async def cg_worker(tmp_path: Path) -> AsyncIterator[Worker]:
    try:
        driver = detect_driver(parent=f"trio-jobs-test-{uuid.uuid4().hex[:12]}", require=True)
    except CgroupError as exc:
        pytest.skip(f"this host offers no usable cgroups: {exc}")
    assert isinstance(driver, V1Driver | V2Driver)
    try:
        async with open_worker(tmp_path / "data", cgroups=driver) as worker:
            yield worker
    finally:
        with trio.move_on_after(30, shield=True):
            await driver.prepare()  # kills and removes any job cgroup left behind
            await driver.remove_parent()


async def test_setsid_and_double_fork_descendants_die_with_the_job(cg_worker: Worker) -> None:
    start = trio.current_time()
    with trio.fail_after(20):
        status = await cg_worker.start(
            sh("setsid sleep 1000 & (sleep 1000 &) ; echo $!; echo hi"))
        out = await read_all(cg_worker, status.job_id)
    # the cgroup kill got every process, so the pipe closed at once: no drain timeout
    assert trio.current_time() - start < DRAIN_TIMEOUT
    assert out.endswith(b"hi\n")
    final = await cg_worker.status(status.job_id)
    assert (final.state, final.exit_code) == (JobState.EXITED, 0)
    assert final.usage.cpu_usec > 0


async def test_a_job_that_forks_at_once_is_inside_its_cgroup(cg_worker: Worker) -> None:
    status = await cg_worker.start(sh("(cat /proc/self/cgroup) & cat /proc/self/cgroup; wait"))
    out = (await read_all(cg_worker, status.job_id)).decode()
    lines = out.splitlines()
    assert "/trio-jobs-test-" in out  # in a job cgroup under the test's parent ...
    assert status.job_id not in out  # ... whose world-readable name does not reveal the job
    # the same cgroup membership for the forked child and the main process
    assert sorted(lines[: len(lines) // 2]) == sorted(lines[len(lines) // 2 :])


async def test_memory_limit_oom_is_reported(cg_worker: Worker) -> None:
    status = await cg_worker.start(sh(
        "head -c 200000000 /dev/zero | tail -n 1 >/dev/null", limits=Limits(memory_bytes=32 << 20)))
    with trio.fail_after(60):
        await read_all(cg_worker, status.job_id)
    final = await cg_worker.status(status.job_id)
    assert final.oom_killed
