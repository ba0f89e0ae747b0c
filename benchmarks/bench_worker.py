"""Worker benchmarks (issue 2): RSS vs followers and output size, follower throughput, start
latency. Not a timed test; figures depend on the machine and its load.

    .venv/bin/python -m benchmarks.bench_worker [--quick]

1. RSS growth of this process while N followers follow a job writing S bytes
   (``head -c S /dev/zero``), for N in {1, 100} and S in {100 MiB, 1 GiB}: peak VmHWM-style
   sampling of VmRSS minus the RSS before the job started. Target < 50 MiB and flat.
2. Aggregate follower throughput from the page cache: F followers read an ended job's
   256 MiB output at once (in-process, no network). Target >= 1 GB/s.
3. Start latency: ``Worker.start`` of ``true`` (call -> process released into its program),
   NoCgroupDriver, p50/p99 over K starts. Target p50 <= 2 ms.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import trio

from trio_jobs.worker import JobSpec, Worker, open_worker

MiB = 1024 * 1024


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def drain(worker: Worker, job_id: str, max_chunk: int = 64 * 1024) -> int:
    n = 0
    async for chunk in worker.follow(job_id, max_chunk=max_chunk):
        n += len(chunk.data)
    return n


async def rss_case(worker: Worker, followers: int, size: int) -> tuple[float, float, float]:
    """(RSS growth MiB, seconds, aggregate GB/s of the followers)."""
    base = rss_bytes()
    peak = base
    done = trio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes())
            with trio.move_on_after(0.02):
                await done.wait()

    t0 = time.perf_counter()
    status = await worker.start(JobSpec(command="head", args=("-c", str(size), "/dev/zero"),
                                        owner="bench"))
    totals: list[int] = []

    async def one() -> None:
        totals.append(await drain(worker, status.job_id))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        async with trio.open_nursery() as followers_nursery:
            for _ in range(followers):
                followers_nursery.start_soon(one)
        done.set()
    elapsed = time.perf_counter() - t0
    assert totals == [size] * followers, (totals[:3], size)
    return (peak - base) / MiB, elapsed, sum(totals) / elapsed / 1e9


async def throughput(worker: Worker, followers: int, size: int, max_chunk: int) -> float:
    status = await worker.start(JobSpec(command="head", args=("-c", str(size), "/dev/zero"),
                                        owner="bench"))
    await drain(worker, status.job_id)  # the job has ended; its file is in the page cache
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(followers):
            nursery.start_soon(drain, worker, status.job_id, max_chunk)
    return followers * size / (time.perf_counter() - t0) / 1e9


async def start_latency(worker: Worker, count: int) -> tuple[float, float]:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        status = await worker.start(JobSpec(command="/bin/true", owner="bench"))
        samples.append(time.perf_counter() - t0)
        await drain(worker, status.job_id)
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return statistics.median(samples) * 1000, p99 * 1000


async def main(quick: bool, latency_only: bool) -> None:
    big = 256 * MiB if quick else 1024 * MiB
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as d:
        async with open_worker(Path(d), output_cap=1 << 31) as worker:
            if latency_only:
                p50, p99 = await start_latency(worker, 300)
                print(f"start latency: p50 {p50:.2f} ms   p99 {p99:.2f} ms")
                return
            print("== RSS growth while following (NoCgroupDriver, in-process)")
            for size in (100 * MiB, big):
                for n in (1, 100):
                    growth, secs, gbps = await rss_case(worker, n, size)
                    print(f"  {n:3d} followers x {size // MiB:5d} MiB: RSS +{growth:6.1f} MiB"
                          f"  ({secs:5.1f} s, followers {gbps:5.2f} GB/s aggregate)")
            print("== aggregate follower throughput from the page cache (ended job, 256 MiB)")
            for n, chunk in ((1, 64 * 1024), (8, 64 * 1024), (8, 1 << 20)):
                gbps = await throughput(worker, n, 256 * MiB, chunk)
                print(f"  {n} followers, max_chunk {chunk // 1024:5d} KiB: {gbps:5.2f} GB/s")
            print("== start latency (Worker.start of /bin/true, call -> process released)")
            p50, p99 = await start_latency(worker, 100 if quick else 300)
            print(f"  p50 {p50:.2f} ms   p99 {p99:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="256 MiB instead of 1 GiB")
    parser.add_argument("--latency-only", action="store_true", help="only the start latency")
    args = parser.parse_args()
    trio.run(main, args.quick, args.latency_only)
