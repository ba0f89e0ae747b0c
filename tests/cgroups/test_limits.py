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

from ._helpers import members, read_limit, read_lines, spawn_in

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
CPU_WINDOW = 1.5  # wall seconds measured


async def _cpu_per_wall(driver: Driver, limits: Limits) -> float:
    job = await driver.create(str(uuid.uuid4()), limits)
    with trio.fail_after(30):
        proc = await spawn_in(job, ["/bin/sh", "-c", BUSY4], stdout=subprocess.PIPE)
        assert await read_lines(proc, 1) == ["started"]
        u0, t0 = (await job.usage()).cpu_usec, trio.current_time()
        await trio.sleep(CPU_WINDOW)  # the measurement window itself, not a wait for an event
        u1, t1 = (await job.usage()).cpu_usec, trio.current_time()
        await job.kill_all()
        await job.wait_empty()
        await proc.wait()
    await job.remove()
    return (u1 - u0) / 1e6 / (t1 - t0)


@pytest.mark.slow
async def test_cpu_limit_half_a_cpu(driver: Driver) -> None:
    limited = await _cpu_per_wall(driver, Limits(cpu_millis=500))
    unlimited = await _cpu_per_wall(driver, Limits())
    assert limited <= 0.6, f"0.5 CPU limit gave {limited:.2f} CPU-s per s"
    # "Far more" without the limit: on a 2-CPU host four busy processes get most of both
    # CPUs; leave room for teammates' load.
    assert unlimited > 0.9, (limited, unlimited)
    assert unlimited >= 1.5 * limited, (limited, unlimited)


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


FORK_LOOP = """
import os, signal, sys
made = failed = 0
for _ in range(300):  # bounded: a few hundred forks, never an exponential bomb
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        signal.pause()
        os._exit(0)
    made += 1
print(made, failed, flush=True)
signal.pause()
"""


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
