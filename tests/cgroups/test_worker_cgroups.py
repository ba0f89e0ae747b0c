"""The Must-show list end to end: jobs run by ``open_worker(data_dir, cgroups=driver)``.

Bomb-like jobs check their own limit file first (from /proc/self/cgroup) and refuse to run
(exit 3) when it does not hold the expected value, so a broken driver fails the test instead
of loading the machine.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.worker import JobSpec, JobState, Limits, MiB, open_worker
from trio_jobs.worker.cgroups.v1 import V1Driver

from ._helpers import (
    BUSY4,
    CPU_CASES,
    FORK_LOOP,
    FORK_N,
    IN_VM,
    LEAK_JOBS,
    alive,
    boost_cpu_weight,
    cpu_rounds,
    cpu_verdict,
    descendants,
    job_cgroup_dir,
    open_fds,
    parent_dirs,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from trio_jobs.worker import JobStatus, Worker

    from .conftest import Driver

pytestmark = pytest.mark.cgroups

PY = sys.executable

# Prints the value of a limit of the calling process's own cgroup, v1 or v2.
OWN_LIMIT = """
def own_limit(v2_file, v1_controller, v1_file):
    for line in open("/proc/self/cgroup").read().splitlines():
        hid, ctl, path = line.split(":", 2)
        if hid == "0" and ctl == "" and __import__("os").path.exists(
                "/sys/fs/cgroup" + path + "/" + v2_file):
            return open("/sys/fs/cgroup" + path + "/" + v2_file).read().strip()
        if v1_controller in ctl.split(","):
            return open("/sys/fs/cgroup/" + v1_controller + path + "/" + v1_file).read().strip()
"""

MEMORY_BOMB = (
    OWN_LIMIT
    + """
import sys
expected = sys.argv[1]
if expected != "max" and own_limit("memory.max", "memory", "memory.limit_in_bytes") != expected:
    sys.exit(3)
b = b"\\x01" * (200 * 1000 * 1000)
print(len(b) // 1000000)
"""
)

# The shared fork loop, after checking that the limit file really holds 64.
FORK_LOOP_CHECKED = (
    OWN_LIMIT
    + """
import sys
if own_limit("pids.max", "pids", "pids.max") != "64":
    sys.exit(3)
"""
    + FORK_LOOP
)


def _spec(command: str, *args: str, limits: Limits | None = None) -> JobSpec:
    return JobSpec(command=command, args=args, owner="tester", limits=limits or Limits())


@pytest.fixture
async def worker(driver: Driver, tmp_path: Path) -> AsyncIterator[Worker]:
    async with open_worker(tmp_path / "data", cgroups=driver, default_grace=1.0) as w:
        assert w.cgroup_driver_name == driver.name
        yield w


async def _output(worker: Worker, job_id: str) -> bytes:
    out = bytearray()
    reader = worker.follow(job_id)
    try:
        async for chunk in reader:
            out += chunk.data
    finally:
        await reader.aclose()
    return bytes(out)


async def _first_lines(worker: Worker, job_id: str, count: int) -> list[str]:
    out = bytearray()
    reader = worker.follow(job_id)
    try:
        async for chunk in reader:
            out += chunk.data
            if out.count(b"\n") >= count:
                break
    finally:
        await reader.aclose()
    return out.decode().splitlines()[:count]


async def _run(worker: Worker, spec: JobSpec) -> tuple[JobStatus, bytes]:
    started = await worker.start(spec)
    out = await _output(worker, started.job_id)
    return await worker.status(started.job_id), out


@pytest.mark.parametrize("limited", [True, False])
async def test_memory_job_is_oom_killed_only_under_the_limit(worker: Worker, limited: bool) -> None:
    limits = Limits(memory_bytes=64 * MiB) if limited else Limits()
    expected = str(64 * MiB) if limited else "max"
    with trio.fail_after(60):
        status, out = await _run(worker, _spec(PY, "-c", MEMORY_BOMB, expected, limits=limits))
    if limited:
        assert status.state is JobState.KILLED, (status, out)
        assert status.signal == signal.SIGKILL
        assert status.oom_killed
        assert status.usage.memory_peak_bytes <= 65 * MiB
    else:
        assert status.state is JobState.EXITED, (status, out)
        assert status.exit_code == 0
        assert out == b"200\n"
        assert not status.oom_killed


@pytest.mark.slow
async def test_cpu_limit_through_the_worker(worker: Worker, driver: Driver) -> None:
    boost_cpu_weight(driver)
    # All three jobs run in the same window (see _helpers.cpu_rounds), measured through the
    # live usage of the worker's status.
    with trio.fail_after(40):
        ids = {}
        for case, limits in CPU_CASES.items():
            job = await worker.start(_spec("/bin/sh", "-c", BUSY4, limits=limits))
            assert await _first_lines(worker, job.job_id, 1) == ["started"]
            ids[case] = job.job_id

        async def read_usec(case: str) -> int:
            return (await worker.status(ids[case])).usage.cpu_usec

        rounds = await cpu_rounds(read_usec)
        for i in ids.values():
            assert (await worker.stop(i, grace=0)).force_ended
    cpu_verdict(rounds)


async def test_fork_loop_is_contained_and_stoppable(worker: Worker) -> None:
    with trio.fail_after(60):
        job = await worker.start(_spec(PY, "-c", FORK_LOOP_CHECKED, limits=Limits(pids_max=64)))
        lines = await _first_lines(worker, job.job_id, 1)
        assert lines, await worker.status(job.job_id)
        made, failed = (int(x) for x in lines[0].split())
        assert (made, failed) == (63, 300 - 63)
        assert (await trio.run_process(["true"])).returncode == 0  # the host still forks
        result = await worker.stop(job.job_id, grace=0)
    assert result.force_ended
    assert result.status.state is JobState.KILLED
    assert result.status.stopped_by_user


async def test_stop_leaves_no_descendant_alive(worker: Worker) -> None:
    script = (
        "setsid sleep 1000 & echo $!; "
        "(sleep 1000 & echo $!); "
        "(setsid sh -c 'sleep 1000 & echo $!' &); "
        "trap '' TERM; sleep 1000"
    )
    with trio.fail_after(30):
        job = await worker.start(_spec("/bin/sh", "-c", script))
        pids = [int(x) for x in await _first_lines(worker, job.job_id, 3)]
        assert all(alive(p) for p in pids)
        result = await worker.stop(job.job_id, grace=0.2)
    assert result.force_ended
    for p in pids:
        assert not alive(p)


async def test_job_that_forks_at_once_is_entirely_inside(worker: Worker, driver: Driver) -> None:
    script = "sleep 60 & (sleep 60 &); sleep 60 | cat & echo $$; exec sleep 60"
    with trio.fail_after(30):
        job = await worker.start(_spec("/bin/sh", "-c", script))
        (main,) = (int(x) for x in await _first_lines(worker, job.job_id, 1))
        path = str(job_cgroup_dir(driver, main) / "cgroup.procs")
        assert job.job_id not in path  # the name is opaque
        inside = {int(p) for p in (await trio.Path(path).read_text()).split()}
        assert descendants(main) | {main} <= inside
        assert len(inside) >= 5
        await worker.stop(job.job_id, grace=0)
    assert not await trio.Path(path).exists()  # removed after the job


async def test_group_limit_binds_two_jobs_started_through_the_worker(
    worker: Worker, driver: Driver
) -> None:
    """JobSpec.group/group_limits reach the driver: a fork loop split over two jobs of one
    group stops at the group's pids.max, and the group's cgroup outlives them, empty."""
    def spec(count: int) -> JobSpec:
        script = "import os; print(os.getpid(), flush=True)\n" + FORK_N
        return JobSpec(command=PY, args=("-c", script, str(count)), owner="alice",
                       limits=Limits(pids_max=200), group="alice",
                       group_limits=Limits(pids_max=64))

    with trio.fail_after(60):
        first = await worker.start(spec(40))
        main, counts = await _first_lines(worker, first.job_id, 2)
        assert counts == "40 0"
        path = job_cgroup_dir(driver, int(main))
        assert first.job_id not in str(path)
        group = path.parent
        assert group.parent in set(parent_dirs(driver))
        pids = driver.parent_dir("pids") / group.name if isinstance(driver, V1Driver) else group
        assert (pids / "pids.max").read_text().strip() == "64"  # the group's, read back
        second = await worker.start(spec(300))
        _, counts = await _first_lines(worker, second.job_id, 2)
        assert counts == f"22 {300 - 22}"  # 64 - 41 (the first job) - 1 (itself)
        for job in (first, second):
            assert (await worker.stop(job.job_id, grace=0)).force_ended
    # The group outlives its jobs (until the driver's remove_parent), holding none of them.
    assert not [p for p in group.iterdir() if p.is_dir()]


@pytest.mark.slow
async def test_no_cgroup_process_or_fd_left_after_200_jobs(driver: Driver, tmp_path: Path) -> None:
    fds_before = open_fds()
    with trio.fail_after(600 if IN_VM else 240):
        async with open_worker(tmp_path / "data", cgroups=driver) as worker:
            for i in range(LEAK_JOBS):
                script = "setsid sleep 1000 & exit 0" if i % 20 == 0 else "exit 0"
                status, _ = await _run(worker, _spec("/bin/sh", "-c", script))
                assert status.state is JobState.EXITED
                assert status.exit_code == 0
    from trio_jobs.worker.cgroups.v1 import V1Driver

    if isinstance(driver, V1Driver):
        parents = {
            driver.parent_dir(c) for c in ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer")
        }
    else:
        parents = {driver.parent_dir}
    for parent in parents:
        assert [e.name for e in parent.iterdir() if e.is_dir()] == []
    assert descendants(os.getpid()) == set()
    assert open_fds() == fds_before
