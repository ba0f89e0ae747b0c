"""The kernel enforces every IO limit the driver writes: read and write bytes per second,
read and write operations per second, on a real block device.

Each limit gets its own job, the four in the same window (as the CPU test does), each doing
O_DIRECT IO on its own file: direct IO is submitted by the job's own task, so its cgroup is
charged for it on v1 as on v2 (buffered writes reach the device later, through writeback,
charged to the root on v1: see v1.py), and direct reads bypass the page cache, so every read
reaches the device. Each limit is also read back from the kernel's file for that device.

Bounds. Throttling cannot be beaten by load: a job faster than 75% of its nominal time (the
throttle grants one 100 ms slice up front) fails at once. Load and emulation (the TCG VM) can
only make it slower, so the upper bound is relative to the same IO done without limits right
before (1.25 x nominal + 2 x that baseline), and a miss of it is measured again once before it
fails. Failure messages show every figure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import trio

from trio_jobs.worker.cgroups.devices import BlockDevice, disk_of
from trio_jobs.worker.cgroups.v1 import V1JobCgroup
from trio_jobs.worker.limits import Limits, MiB

from ._helpers import cgroup_dir, read_lines, spawn_in

if TYPE_CHECKING:
    from trio_jobs.worker.cgroups.base import JobCgroup

    from .conftest import Driver

pytestmark = [pytest.mark.cgroups, pytest.mark.slow]

PY = sys.executable
BPS: Final = 2 * MiB  # bytes per second, read and write
BPS_CHUNK: Final = 1 * MiB
BPS_CHUNKS: Final = 6  # 3 s nominal
IOPS: Final = 100  # operations per second, read and write
IOPS_OPS: Final = 300  # 3 s nominal, one filesystem block each (one bio, one IO)
TOO_FAST: Final = 0.75  # of nominal
SLOW_FACTOR: Final = 1.25  # of nominal, plus SLOW_BASELINES times the unlimited run
SLOW_BASELINES: Final = 2.0

# argv: read|write, path, bytes per operation, operations. Prints the seconds the IO took
# (the interpreter's start, slow under emulation, is not timed).
DIRECT_IO = """
import mmap, os, sys, time
mode, path, size, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
buf = mmap.mmap(-1, max(size, mmap.PAGESIZE))  # page aligned, as O_DIRECT needs
view = memoryview(buf)[:size]
fd = os.open(path, (os.O_RDONLY if mode == "read" else os.O_WRONLY) | os.O_DIRECT)
io = os.preadv if mode == "read" else os.pwritev
t0 = time.monotonic()
for i in range(count):
    if io(fd, [view], i * size) != size:
        sys.exit("short " + mode)
if mode == "write":
    os.fsync(fd)
print(round(time.monotonic() - t0, 4))
"""


@dataclass(frozen=True, kw_only=True)
class Case:
    name: str
    mode: str  # "read" or "write"
    limits: Limits
    limit: int
    v1_file: str  # blkio.throttle.*_device
    v2_key: str  # in io.max
    op_bytes: int
    ops: int

    @property
    def total(self) -> int:
        return self.op_bytes * self.ops

    @property
    def nominal(self) -> float:
        """Seconds the IO takes at exactly the limit."""
        return (self.total if self.v2_key.endswith("bps") else self.ops) / self.limit


def _cases(block: int) -> list[Case]:
    return [
        Case(name="read_bps", mode="read", limits=Limits(io_read_bps=BPS), limit=BPS,
             v1_file="blkio.throttle.read_bps_device", v2_key="rbps",
             op_bytes=BPS_CHUNK, ops=BPS_CHUNKS),
        Case(name="write_bps", mode="write", limits=Limits(io_write_bps=BPS), limit=BPS,
             v1_file="blkio.throttle.write_bps_device", v2_key="wbps",
             op_bytes=BPS_CHUNK, ops=BPS_CHUNKS),
        Case(name="read_iops", mode="read", limits=Limits(io_read_iops=IOPS), limit=IOPS,
             v1_file="blkio.throttle.read_iops_device", v2_key="riops",
             op_bytes=block, ops=IOPS_OPS),
        Case(name="write_iops", mode="write", limits=Limits(io_write_iops=IOPS), limit=IOPS,
             v1_file="blkio.throttle.write_iops_device", v2_key="wiops",
             op_bytes=block, ops=IOPS_OPS),
    ]


@dataclass(frozen=True, kw_only=True)
class Run:
    seconds: float
    io_bytes: int  # the job's read or write bytes, as its cgroup counted them


def _io_dir(tmp_path: Path) -> Path:
    explicit = os.environ.get("TRIO_JOBS_TEST_BLOCKDEV_DIR")  # set by the cgroup v2 VM
    return Path(explicit) if explicit else tmp_path


def _make_files(files: dict[str, Path], cases: list[Case]) -> None:
    """Every case's file, written and synced beforehand (by the test, unthrottled), so the
    jobs read real data and write over allocated blocks (pure data IO, no allocation)."""
    for case in cases:
        with open(files[case.name], "wb") as f:
            f.write(b"\x5a" * case.total)
            f.flush()
            os.fsync(f.fileno())


def _limit_read_back(job: JobCgroup, disk: BlockDevice, case: Case) -> str | None:
    """The job's limit for ``case`` on ``disk``, from the kernel's file."""
    d = cgroup_dir(job, "blkio")
    if isinstance(job, V1JobCgroup):
        for line in (d / case.v1_file).read_text().splitlines():
            dev, value = line.split()
            if dev == disk.dev:
                return value
        return None
    for line in (d / "io.max").read_text().splitlines():
        dev, *settings = line.split()
        if dev == disk.dev:
            return dict(s.split("=", 1) for s in settings).get(case.v2_key)
    return None


async def _io_round(driver: Driver, disk: BlockDevice, cases: list[Case],
                    files: dict[str, Path], *, limited: bool) -> dict[str, Run]:
    """Every case's IO at once, each in its own job (with its limit, or with none)."""
    jobs: dict[str, JobCgroup] = {}
    runs: dict[str, Run] = {}
    failed: dict[str, tuple[int, list[str]]] = {}

    async def run(case: Case) -> None:
        argv = [PY, "-c", DIRECT_IO, case.mode, str(files[case.name]), str(case.op_bytes),
                str(case.ops)]
        proc = await spawn_in(jobs[case.name], argv, stdout=subprocess.PIPE)
        out = await read_lines(proc, 1)
        code = await proc.wait()
        if code != 0 or not out:
            failed[case.name] = (code, out)
            return
        usage = await jobs[case.name].usage()
        io_bytes = usage.io_read_bytes if case.mode == "read" else usage.io_write_bytes
        runs[case.name] = Run(seconds=float(out[0]), io_bytes=io_bytes)

    try:
        for case in cases:
            jobs[case.name] = await driver.create(str(uuid.uuid4()),
                                                  case.limits if limited else Limits())
            if limited:
                value = _limit_read_back(jobs[case.name], disk, case)
                assert value == str(case.limit), (case.name, disk, value)
        async with trio.open_nursery() as nursery:
            for case in cases:
                nursery.start_soon(run, case)
    finally:
        with trio.move_on_after(10, shield=True):
            for job in jobs.values():
                await job.remove()
    assert not failed, f"IO jobs failed (exit code, output): {failed}"
    return runs


def _figures(cases: list[Case], base: dict[str, Run], lim: dict[str, Run]) -> str:
    return "\n".join(
        f"  {c.name} {c.limit}/s: {c.total} B in {c.ops} ops took {lim[c.name].seconds:.3f} s "
        f"(nominal {c.nominal:.2f}, unlimited {base[c.name].seconds:.3f} s, allowed "
        f"{TOO_FAST * c.nominal:.2f}-{_slowest(c, base):.2f} s), "
        f"cgroup counted {lim[c.name].io_bytes} B"
        for c in cases
    )


def _slowest(case: Case, base: dict[str, Run]) -> float:
    return SLOW_FACTOR * case.nominal + SLOW_BASELINES * base[case.name].seconds


async def test_io_limits_are_enforced(driver: Driver, tmp_path: Path) -> None:
    directory = _io_dir(tmp_path)
    st = await trio.Path(directory).stat()
    disk = disk_of(st.st_dev)
    if disk is None:
        pytest.skip(f"{directory} is not on a block device (tmpfs/overlay/9p): no io limit to test")
    cases = _cases(st.st_blksize)
    tag = uuid.uuid4().hex
    files = {c.name: directory / f"trio-jobs-io-{tag}-{c.name}" for c in cases}
    rounds: list[str] = []
    try:
        with trio.fail_after(150):
            await trio.to_thread.run_sync(_make_files, files, cases)
            for attempt in (1, 2):
                base = await _io_round(driver, disk, cases, files, limited=False)
                lim = await _io_round(driver, disk, cases, files, limited=True)
                rounds.append(f"round {attempt} on {disk.name} ({disk.dev}):\n"
                              + _figures(cases, base, lim))
                # Throttling cannot be beaten by load: fail at once.
                assert all(lim[c.name].seconds >= TOO_FAST * c.nominal for c in cases), rounds[-1]
                # The IO reached the device, and was charged to the job's cgroup.
                assert all(lim[c.name].io_bytes >= c.total for c in cases), rounds[-1]
                if all(lim[c.name].seconds <= _slowest(c, base) for c in cases):
                    return
    finally:
        for f in files.values():
            await trio.Path(f).unlink(missing_ok=True)
    pytest.fail("IO limits slower than asked, twice:\n" + "\n".join(rounds))
