"""The kernel really enforces the limits the driver writes (memory, swap, cpu, pids; io in
test_io_limits.py).

The CPU test measures the ratios the limits protect (CPU seconds per wall second) for capped
and uncapped jobs in the same window, so a loaded machine slows both sides, not the result.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.worker.cgroups.v1 import V1JobCgroup
from trio_jobs.worker.limits import DEFAULT_LIMITS, Limits, MiB

from ._helpers import (
    BUSY4,
    CPU_CASES,
    FORK_LOOP,
    boost_cpu_weight,
    cgroup_dir,
    cpu_rounds,
    cpu_verdict,
    members,
    read_limit,
    read_lines,
    spawn_in,
)

if TYPE_CHECKING:
    from ._helpers import CpuRate
    from .conftest import Driver

pytestmark = pytest.mark.cgroups

PY = sys.executable

# Touches every page: 200 MB that must really be resident.
ALLOC_200MB = "b = b'\\x01' * (200 * 1000 * 1000); print(len(b) // 1000000)"


@pytest.mark.parametrize("limited", [True, False])
async def test_memory_limit_oom_kills(driver: Driver, limited: bool) -> None:
    limits = Limits(memory_bytes=64 * MiB) if limited else Limits()
    job = await driver.create(str(uuid.uuid4()), limits)
    if limited:
        assert int(read_limit(job, "memory")) == 64 * MiB  # read back before the bomb
    with trio.fail_after(60):
        proc = await spawn_in(job, [PY, "-c", ALLOC_200MB], stdout=subprocess.PIPE)
        out = await read_lines(proc, 1)
        code = await proc.wait()
        await job.wait_empty()
    usage = await job.usage()
    if limited:
        assert code == -signal.SIGKILL
        assert out == []
        assert await job.oom_killed()
        assert usage.memory_peak_bytes <= 64 * MiB + 1 * MiB
    else:
        assert code == 0
        assert out == ["200"]
        assert not await job.oom_killed()
        assert usage.memory_peak_bytes >= 200 * 1000 * 1000
    await job.remove()


async def _cpu_rounds(driver: Driver) -> list[dict[str, CpuRate]]:
    """CPU-s per wall-s of a busy job per case, all measured in the same window (and in a
    second one on a miss: see _helpers.cpu_rounds).

    Concurrent runs share whatever CPU the (shared, sometimes busy) host gives us at that
    moment, so the comparison between them holds even when that changes from second to
    second.
    """
    boost_cpu_weight(driver)
    jobs = {k: await driver.create(str(uuid.uuid4()), lim) for k, lim in CPU_CASES.items()}
    procs: list[trio.Process] = []

    async def read_usec(case: str) -> int:
        return (await jobs[case].usage()).cpu_usec

    try:
        with trio.fail_after(30):
            for job in jobs.values():
                proc = await spawn_in(job, ["/bin/sh", "-c", BUSY4], stdout=subprocess.PIPE)
                procs.append(proc)
                assert await read_lines(proc, 1) == ["started"]
            return await cpu_rounds(read_usec)
    finally:
        with trio.move_on_after(10, shield=True):
            for job in jobs.values():
                await job.remove()
            for proc in procs:
                await proc.wait()


@pytest.mark.slow
async def test_cpu_limit_half_a_cpu(driver: Driver) -> None:
    # On an idle 2-CPU host: ~0.5 / 0.1 / 1.4 CPU-s per s (see _helpers.cpu_misses).
    cpu_verdict(await _cpu_rounds(driver))


@pytest.mark.parametrize("memory", [64 * MiB, DEFAULT_LIMITS.memory_bytes], ids=["64MiB", "default"])
async def test_memory_limit_leaves_no_swap(driver: Driver, memory: int) -> None:
    """DESIGN: memory limit, swap 0. Read back from the kernel: on v1 the memory+swap limit
    equals the memory limit (without swap accounting, swappiness 0 instead); on v2
    memory.swap.max is 0 (the file exists only with swap accounting)."""
    job = await driver.create(str(uuid.uuid4()), Limits(memory_bytes=memory))
    try:
        assert int(read_limit(job, "memory")) == memory
        d = cgroup_dir(job, "memory")
        if isinstance(job, V1JobCgroup):
            memsw = d / "memory.memsw.limit_in_bytes"
            if memsw.exists():
                assert int(memsw.read_text()) == memory
            else:
                assert (d / "memory.swappiness").read_text().strip() == "0"
        else:
            swap = d / "memory.swap.max"
            if not swap.exists():
                pytest.skip(f"no swap accounting on this kernel: {swap} does not exist")
            assert swap.read_text().strip() == "0"
    finally:
        await job.remove()


async def test_pids_limit_contains_a_fork_loop(driver: Driver) -> None:
    job = await driver.create(str(uuid.uuid4()), Limits(pids_max=64))
    assert read_limit(job, "pids") == "64"  # read back before forking
    with trio.fail_after(60):
        proc = await spawn_in(job, [PY, "-c", FORK_LOOP], stdout=subprocess.PIPE)
        made, failed = (int(x) for x in (await read_lines(proc, 1))[0].split())
        assert made == 63  # 64 including the job's own process
        assert failed == 300 - 63
        assert len(members(job)) == 64
        # The host is unaffected: we can still start processes outside the job.
        assert (await trio.run_process(["true"])).returncode == 0
        # ... and the job is stoppable.
        await job.kill_all()
        await job.wait_empty()
        assert await proc.wait() == -signal.SIGKILL
    assert members(job) == set()
    await job.remove()


async def test_limits_are_written_as_asked(driver: Driver) -> None:
    job = await driver.create(
        str(uuid.uuid4()), Limits(cpu_millis=1500, memory_bytes=100 * MiB, pids_max=77)
    )
    cpu = read_limit(job, "cpu")
    assert cpu in ("150000", "150000 100000")
    assert read_limit(job, "memory") == str(100 * MiB)
    assert read_limit(job, "pids") == "77"
    await job.remove()
