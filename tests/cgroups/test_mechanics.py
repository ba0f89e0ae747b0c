"""Placement, signalling, kill, end-of-job waiting, removal and leaks, on real cgroups."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from trio_jobs.worker.cgroups.base import CgroupError
from trio_jobs.worker.cgroups.v1 import V1Driver
from trio_jobs.worker.cgroups.v2 import V2Driver
from trio_jobs.worker.limits import Limits

from ._helpers import (
    MECHANICS_LEAK_JOBS,
    alive,
    descendants,
    members,
    open_fds,
    read_lines,
    spawn_in,
)

if TYPE_CHECKING:
    from .conftest import Driver

pytestmark = pytest.mark.cgroups

NO_LIMITS = Limits()


def _job_id() -> str:
    return str(uuid.uuid4())


async def test_forking_job_has_every_descendant_inside(mechanics_driver: Driver) -> None:
    job = await mechanics_driver.create(_job_id(), NO_LIMITS)
    # The program forks at once, a pipeline and a nested subshell, then reports readiness.
    script = "sleep 60 & sleep 60 | cat & (sleep 60 &); echo ready; exec sleep 60"
    with trio.fail_after(20):
        proc = await spawn_in(job, ["/bin/sh", "-c", script], stdout=subprocess.PIPE)
        assert await read_lines(proc, 1) == ["ready"]
        tree = descendants(proc.pid) | {proc.pid}
        inside = members(job)
        # Every descendant of the job's process is in the cgroup ((sleep 60 &) was orphaned
        # away from the tree; it is in the cgroup nonetheless).
        assert tree <= inside
        assert len(inside) >= 5
        await job.kill_all()
        await job.wait_empty()
        await proc.wait()
        await job.remove()


async def test_kill_leaves_no_descendant_incl_setsid_and_double_fork(
    mechanics_driver: Driver,
) -> None:
    job = await mechanics_driver.create(_job_id(), NO_LIMITS)
    script = (
        "setsid sleep 1000 & echo $!; "
        "(sleep 1000 & echo $!); "
        "(setsid sh -c 'sleep 1000 & echo $!' &); "
        "sleep 1000"
    )
    with trio.fail_after(20):
        proc = await spawn_in(job, ["/bin/sh", "-c", script], stdout=subprocess.PIPE)
        pids = [int(x) for x in await read_lines(proc, 3)]
        assert all(alive(p) for p in pids)
        assert set(pids) <= members(job)
        await job.kill_all()
        await job.wait_empty()
        assert await proc.wait() == -signal.SIGKILL
    for p in pids:
        assert not alive(p)
    assert members(job) == set()
    await job.remove()
    await job.remove()  # idempotent


async def test_signal_all_reaches_every_process(mechanics_driver: Driver) -> None:
    job = await mechanics_driver.create(_job_id(), NO_LIMITS)
    script = "setsid sleep 1000 & echo $!; (sleep 1000 & echo $!); echo ok; exec sleep 1000"
    with trio.fail_after(20):
        proc = await spawn_in(job, ["/bin/sh", "-c", script], stdout=subprocess.PIPE)
        lines = await read_lines(proc, 3)
        assert lines[2] == "ok"
        await job.signal_all(signal.SIGTERM)
        await job.wait_empty()  # woken by the exits, no kill needed
        assert await proc.wait() == -signal.SIGTERM
    assert not alive(int(lines[0]))
    assert not alive(int(lines[1]))
    await job.remove()


async def test_wait_empty_returns_when_the_job_exits_by_itself(mechanics_driver: Driver) -> None:
    job = await mechanics_driver.create(_job_id(), NO_LIMITS)
    with trio.fail_after(20):
        # A job that blocks until it is told to end (the wrapper gives the program
        # /dev/null as stdin, so it must not read stdin: that would end it at once).
        proc = await spawn_in(job, ["/bin/sh", "-c", "exec sleep 1000"])
        try:
            # Nothing happens until we let the job end: wait_empty must still be blocked.
            async with trio.open_nursery() as nursery:
                done = trio.Event()

                async def waiter() -> None:
                    await job.wait_empty()
                    done.set()

                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert not done.is_set()
                assert members(job) == {proc.pid}
                proc.kill()  # the job "ends": its only process exits, not through the driver
            assert done.is_set()
        finally:
            proc.kill()  # idempotent; never leave the process to later tests
            await proc.wait()
    await job.remove()


async def test_remove_kills_what_is_left_and_is_idempotent(mechanics_driver: Driver) -> None:
    job = await mechanics_driver.create(_job_id(), NO_LIMITS)
    with trio.fail_after(20):
        proc = await spawn_in(job, ["/bin/sh", "-c", "sleep 1000 & exec sleep 1000"])
        await job.remove()
        assert await proc.wait() == -signal.SIGKILL
        await job.remove()
    assert not await trio.Path(job.path).exists()
    assert (await job.usage()).cpu_usec == 0  # safe after removal
    assert not await job.oom_killed()


async def test_prepare_kills_and_removes_leftovers_of_an_earlier_run(
    mechanics_driver: Driver,
) -> None:
    job_id = _job_id()
    job = await mechanics_driver.create(job_id, NO_LIMITS)
    with trio.fail_after(20):
        proc = await spawn_in(job, ["/bin/sh", "-c", "setsid sleep 1000 & exec sleep 1000"])
        # A "restarted server": a new driver over the same parent.
        await mechanics_driver.prepare()
        assert await proc.wait() == -signal.SIGKILL
    assert not await trio.Path(job.path).exists()


async def test_create_refuses_bad_ids_and_duplicates(mechanics_driver: Driver) -> None:
    for bad in ["", ".", "..", "a/b", "x\0y", "cgroup.procs"]:
        with pytest.raises(CgroupError, match="cannot name a cgroup"):
            await mechanics_driver.create(bad, NO_LIMITS)
    job_id = _job_id()
    job = await mechanics_driver.create(job_id, NO_LIMITS)
    with pytest.raises(CgroupError, match="already exists"):
        await mechanics_driver.create(job_id, NO_LIMITS)
    assert await trio.Path(job.path).is_dir()  # the failed duplicate removed only its own
    with pytest.raises(CgroupError, match="positive integer"):
        await mechanics_driver.create(_job_id(), Limits(pids_max=0))
    await job.remove()


async def test_end_of_job_calls_read_usage_and_remove_only_an_empty_cgroup(
    mechanics_driver: Driver,
) -> None:
    """The worker's end-of-job thread: final usage + OOM, then an rmdir that never waits."""
    job = mechanics_driver.create_blocking(_job_id(), NO_LIMITS)
    with trio.fail_after(20):
        proc = await spawn_in(job, ["/bin/sh", "-c", "echo ready; exec sleep 60"],
                              stdout=subprocess.PIPE)
        assert await read_lines(proc, 1) == ["ready"]
        assert not job.try_remove_blocking()  # populated: left for remove()
        assert await trio.Path(job.path).is_dir()
        await job.kill_all()
        await job.wait_empty()
        await proc.wait()
    usage, oom = job.final_usage_blocking()
    assert usage.cpu_usec > 0
    assert not oom
    if not job.try_remove_blocking():  # EBUSY for a moment after the last exit is allowed
        await job.remove()  # ...and then remove() finishes (it retries, bounded)
    assert not await trio.Path(job.path).exists()
    assert job.try_remove_blocking()  # idempotent: gone is removed


async def test_add_process_of_a_dead_pid_is_a_clear_error(mechanics_driver: Driver) -> None:
    job = await mechanics_driver.create(_job_id(), NO_LIMITS)
    # A pid above the kernel's maximum (2**22) cannot name a process.
    with pytest.raises(CgroupError, match=r"cgroup\.procs"):
        await job.add_process(2**22 - 1)
    await job.remove()


@pytest.mark.slow
async def test_no_leaks_after_200_jobs(mechanics_driver: Driver) -> None:
    fds_before = open_fds()
    with trio.fail_after(120):
        for i in range(MECHANICS_LEAK_JOBS):
            job = await mechanics_driver.create(f"leak-{i}", NO_LIMITS)
            # Every tenth job leaves a daemonized grandchild behind that must be killed.
            argv = ["/bin/sh", "-c", "setsid sleep 1000 &" if i % 10 == 0 else "exit 0"]
            proc = await spawn_in(job, argv)
            await proc.wait()
            await job.kill_all()
            await job.wait_empty()
            await job.remove()
    if isinstance(mechanics_driver, V1Driver):
        parents = {mechanics_driver.parent_dir(c) for c in ("cpu", "memory", "freezer", "pids")}
    else:
        assert isinstance(mechanics_driver, V2Driver)
        parents = {mechanics_driver.parent_dir}
    for parent in parents:
        assert [e for e in parent.iterdir() if e.is_dir()] == []
    assert descendants(os.getpid()) == set()
    assert open_fds() == fds_before
