"""start() failing half way (cgroup errors, cancellation) leaves no record, file or process."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.worker import CgroupError, WorkerError, open_worker
from trio_jobs.worker.cgroups.none import NoCgroupDriver, NoJobCgroup

from .conftest import sh

if TYPE_CHECKING:
    from pathlib import Path

    from trio_jobs.worker import Limits


class FailingJobCgroup:
    """A real (process-group) job cgroup whose placement fails, as a full cgroup would."""

    def __init__(self) -> None:
        self._inner = NoJobCgroup()
        self.removed = False
        self.path = ""

    def add_process_blocking(self, pid: int) -> None:
        raise CgroupError("cgroup.procs: No space left on device")

    async def add_process(self, pid: int) -> None:
        await trio.lowlevel.checkpoint()
        self.add_process_blocking(pid)

    async def signal_all(self, sig: int) -> None:
        await self._inner.signal_all(sig)

    async def kill_all(self) -> None:
        await self._inner.kill_all()

    async def wait_empty(self) -> None:
        await self._inner.wait_empty()

    async def usage(self) -> object:
        return await self._inner.usage()

    async def oom_killed(self) -> bool:
        return await self._inner.oom_killed()

    async def remove(self) -> None:
        self.removed = True
        await self._inner.remove()

    def final_usage_blocking(self) -> tuple[object, bool]:
        return self._inner.final_usage_blocking()

    def try_remove_blocking(self) -> bool:
        self.removed = True
        return self._inner.try_remove_blocking()


class FailingDriver:
    def __init__(self, *, fail_create: bool) -> None:
        self._fail_create = fail_create
        self.cgroups: list[FailingJobCgroup] = []
        self.name = "none"

    def describe(self) -> str:
        return NoCgroupDriver().describe()

    async def prepare(self) -> None:
        await trio.lowlevel.checkpoint()

    def create_blocking(self, job_id: str, limits: Limits, *, group: str | None = None,
                        group_limits: Limits | None = None) -> FailingJobCgroup:
        if self._fail_create:
            raise CgroupError("mkdir: Permission denied")
        cg = FailingJobCgroup()
        self.cgroups.append(cg)
        return cg

    async def create(self, job_id: str, limits: Limits, *, group: str | None = None,
                     group_limits: Limits | None = None) -> FailingJobCgroup:
        await trio.lowlevel.checkpoint()
        return self.create_blocking(job_id, limits, group=group, group_limits=group_limits)


@pytest.mark.parametrize("fail_create", [True, False])
async def test_cgroup_failure_is_a_worker_error_and_nothing_runs(tmp_path: Path,
                                                                 fail_create: bool) -> None:
    driver = FailingDriver(fail_create=fail_create)
    marker = tmp_path / "ran"
    async with open_worker(tmp_path / "data", cgroups=driver) as worker:  # type: ignore[arg-type]
        with pytest.raises(WorkerError, match="cgroup"):
            await worker.start(sh(f"touch {marker}"))
        assert await worker.list() == []
        assert os.listdir(tmp_path / "data" / "output") == []
    assert not marker.exists()  # the held wrapper never exec'd the program
    assert all(cg.removed for cg in driver.cgroups)


def _children() -> set[int]:
    pids: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            pids |= {int(p) for p in f.read().split()}
    return pids


async def test_cancelled_start_leaves_nothing_behind(tmp_path: Path) -> None:
    before = _children()
    async with open_worker(tmp_path / "data") as worker:
        for i in range(30):  # cancel at different points of start() (each ~1-3 ms)
            with trio.move_on_after(i * 0.0002):
                await worker.start(sh("exec sleep 1000"))
        records = {s.job_id for s in await worker.list()}
        outputs = {name.removesuffix(".out") for name in os.listdir(tmp_path / "data" / "output")}
        assert outputs == records  # no output file without a record
    async with open_worker(tmp_path / "data") as worker:  # shutdown ended every started job
        assert all(s.ended for s in await worker.list())
    assert _children() <= before  # every process was killed and reaped
