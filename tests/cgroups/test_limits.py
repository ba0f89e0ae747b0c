"""The kernel really enforces the limits the driver writes (memory, cpu, io, pids).

Timing tests measure ratios the limits protect (CPU seconds per wall second, bytes per
second of a throttled device), so a loaded machine slows both sides, not the result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.worker.cgroups.devices import disk_of
from trio_jobs.worker.limits import Limits, MiB

from ._helpers import FORK_LOOP, boost_cpu_weight, members, read_limit, read_lines, spawn_in

if TYPE_CHECKING:
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


# Four busy processes (processes, not Python threads, so the GIL cannot be what limits them).
BUSY4 = "for i in 1 2 3 4; do (while :; do :; done) & done; echo started; wait"
CPU_WINDOW = 2.0  # wall seconds measured
CPU_CASES = {"half": Limits(cpu_millis=500), "tenth": Limits(cpu_millis=100), "none": Limits()}


async def _cpu_per_wall(driver: Driver) -> dict[str, float]:
    """CPU-s per wall-s of a busy job per case, all measured in the same window.

    Concurrent runs share whatever CPU the (shared, sometimes busy) host gives us at that
    moment, so the comparison between them holds even when that changes from second to
    second.
    """
    boost_cpu_weight(driver)
    jobs = {k: await driver.create(str(uuid.uuid4()), lim) for k, lim in CPU_CASES.items()}
    procs: list[trio.Process] = []
    try:
        with trio.fail_after(30):
            for job in jobs.values():
                proc = await spawn_in(job, ["/bin/sh", "-c", BUSY4], stdout=subprocess.PIPE)
                procs.append(proc)
                assert await read_lines(proc, 1) == ["started"]
            # Each job's usage is paired with the time it was read, so the window of every
            # job is exactly the time between its own two readings.
            s0 = {k: ((await j.usage()).cpu_usec, trio.current_time()) for k, j in jobs.items()}
            await trio.sleep(CPU_WINDOW)  # the measurement window itself, not a wait
            s1 = {k: ((await j.usage()).cpu_usec, trio.current_time()) for k, j in jobs.items()}
    finally:
        with trio.move_on_after(10, shield=True):
            for job in jobs.values():
                await job.remove()
            for proc in procs:
                await proc.wait()
    return {k: (s1[k][0] - s0[k][0]) / 1e6 / (s1[k][1] - s0[k][1]) for k in jobs}


@pytest.mark.slow
async def test_cpu_limit_half_a_cpu(driver: Driver) -> None:
    r = await _cpu_per_wall(driver)
    assert r["half"] <= 0.6, f"0.5 CPU limit gave {r['half']:.2f} CPU-s per s"
    assert r["tenth"] <= 0.13, f"0.1 CPU limit gave {r['tenth']:.2f} CPU-s per s"
    if sum(r.values()) < 0.5:
        pytest.skip(f"the host gave only {sum(r.values()):.2f} CPU-s per s to 12 busy processes")
    # "Far more" without a limit, in the same window. On an idle 2-CPU host: ~0.5/0.1/1.4.
    assert r["none"] >= 2 * r["tenth"], r
    assert r["none"] > r["tenth"] + 0.1, r


def _io_dir(tmp_path: Path) -> Path:
    explicit = os.environ.get("TRIO_JOBS_TEST_BLOCKDEV_DIR")  # set by the cgroup v2 VM
    return Path(explicit) if explicit else tmp_path


DIRECT_WRITE = """
import mmap, os, sys, time
path, total = sys.argv[1], int(sys.argv[2])
buf = mmap.mmap(-1, 1 << 20)  # page aligned, as O_DIRECT needs
buf.write(b"x" * (1 << 20))
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
t0 = time.monotonic()
for _ in range(total >> 20):
    os.write(fd, buf)
os.fsync(fd)
print(round(time.monotonic() - t0, 3))
os.close(fd)
os.unlink(path)
"""


@pytest.mark.slow
async def test_io_write_limit_direct_io(driver: Driver, tmp_path: Path) -> None:
    directory = _io_dir(tmp_path)
    disk = disk_of((await trio.Path(directory).stat()).st_dev)
    if disk is None:
        pytest.skip(f"{directory} is not on a block device (tmpfs/overlay/9p): no io limit to test")
    job = await driver.create(str(uuid.uuid4()), Limits(io_write_bps=2 * MiB))
    target = directory / f"trio-jobs-io-{uuid.uuid4().hex}"
    try:
        with trio.fail_after(60):
            proc = await spawn_in(
                job, [PY, "-c", DIRECT_WRITE, str(target), str(8 * MiB)], stdout=subprocess.PIPE
            )
            out = await read_lines(proc, 1)
            assert await proc.wait() == 0, out
    finally:
        await trio.Path(target).unlink(missing_ok=True)
    seconds = float(out[0])
    assert 3.0 <= seconds <= 5.0, f"8 MiB at 2 MiB/s on {disk.name} took {seconds} s"
    assert (await job.usage()).io_write_bytes >= 8 * MiB
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
