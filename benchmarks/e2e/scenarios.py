"""The measured scenarios. Each returns plain figures (dicts of floats) for the report.

Times are wall-clock from this driver process (a client like any other), except the job's
own wall time, which is the server's record (``ended_at - created_at``). Rates are MB/s
(10^6 bytes per second). Every loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from trio_jobs.worker import JobSpec, open_worker

from .harness import FOLLOWER_IDENTITIES, PYTHON, percentile

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from trio_jobs.client import JobInfo, JobsClient

    from .ceilings import StartCeiling
    from .harness import BenchServer

Figures = dict[str, float]
CLI: Final = (PYTHON, "-m", "trio_jobs.cli")
READ_SIZE: Final = 1 << 20
# bob's job: a line every 20 ms holding the wall-clock time it was written (ns since the epoch)
TICKER: Final = "i=0; while [ $i -lt 30000 ]; do date +%s%N; i=$((i+1)); sleep 0.02; done"


DROP_CACHES: Final = Path("/proc/sys/vm/drop_caches")


def _settle() -> None:
    os.sync()
    with contextlib.suppress(OSError):  # not root, or a container: the figures say so
        DROP_CACHES.write_text("1\n")


async def settle_disk() -> None:
    """Before a job that writes much, untimed: write back the dirty pages (``sync``) and drop
    the clean page cache (as root). The spool files go through the page cache, and a figure
    would otherwise measure the scenarios before it: with ~2 GB dirty the kernel throttles
    every writer to the disk's writeback rate, and on the development VM (Firecracker)
    memory the guest has not used lately costs the host a fault on first touch: touching
    fresh anonymous memory took 0.34 s per GiB for the first ~3 GiB and 2.0-2.75 s per GiB
    beyond, so a 1 GiB job written after three others kept in the cache ran at ~370 MB/s
    instead of ~1,300 MB/s."""
    await trio.to_thread.run_sync(_settle)


async def _discard(data: bytes) -> None:
    """A tail sink that drops what it gets."""


def _wall(job: JobInfo) -> float:
    assert job.ended_at is not None, job
    return (job.ended_at - job.created_at).total_seconds()


async def _starts(client: JobsClient, count: int, concurrency: int, argv: tuple[str, ...]) -> list[str]:
    """Start ``count`` jobs with ``concurrency`` tasks on one connection; their ids."""
    ids: list[str] = []
    per_task = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]

    async def worker(n: int) -> None:
        for _ in range(n):
            ids.append((await client.start(argv[0], argv[1:])).job_id)

    async with trio.open_nursery() as nursery:
        for n in per_task:
            nursery.start_soon(worker, n)
    return ids


async def _waited_starts(client: JobsClient, count: int) -> list[tuple[float, float]]:
    """StartJob of /bin/true, one at a time, each job's end awaited before the next start
    (a follower's stream, which returns at the end), as the ceiling reaps each child
    before its next spawn: otherwise a start also pays for the previous job's end, which
    the server handles at the same moment (a queueing figure, which jobs/s covers).
    Seconds per start: (to the answer, to the end as this client sees it)."""
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        job = await client.start("/bin/true")
        t1 = time.perf_counter()
        await client.tail(job.job_id, _discard)  # returns once the job has ended
        samples.append((t1 - t0, time.perf_counter() - t0))
    return samples


async def job_start(
    server: BenchServer, ceiling: StartCeiling, *, sequential: int, burst: int, concurrency: int, rounds: int
) -> Figures:
    """StartJob of /bin/true: latency one at a time, and jobs/s with concurrent callers; the
    ceiling's latency and rate (``ceilings.StartCeiling``) measured in the same rounds,
    alternately first and second. Like for like: the answer against the spawn's return
    (both *to exec*), and the job's end as the client sees it against ``waitpid`` (both *to
    exit*, the program's run included). Percentiles of all samples, medians of the
    per-round rates."""
    per_seq, per_burst = max(1, sequential // rounds), max(concurrency, burst // rounds)
    samples: list[tuple[float, float]] = []
    ceiling_samples: list[tuple[float, float]] = []
    rates: list[float] = []
    ceiling_rates: list[float] = []
    async with server.client() as client:
        await _waited_starts(client, 5)  # warm-up
        await trio.to_thread.run_sync(ceiling.latencies, 5)

        async def ours() -> None:
            samples.extend(await _waited_starts(client, per_seq))
            t0 = time.perf_counter()
            ids = await _starts(client, per_burst, concurrency, ("/bin/true",))
            rates.append(per_burst / (time.perf_counter() - t0))
            for job_id in ids:  # untimed: the burst's jobs end before the next measurement
                await client.tail(job_id, _discard)

        async def theirs() -> None:
            ceiling_samples.extend(await trio.to_thread.run_sync(ceiling.latencies, per_seq))
            ceiling_rates.append(await trio.to_thread.run_sync(ceiling.rate, per_burst))

        for r in range(rounds):
            for step in (ours, theirs) if r % 2 == 0 else (theirs, ours):
                await step()
    to_answer, to_end = [s[0] for s in samples], [s[1] for s in samples]
    to_exec, to_exit = [s[0] for s in ceiling_samples], [s[1] for s in ceiling_samples]
    return {
        "p50_ms": percentile(to_answer, 50) * 1e3,
        "p99_ms": percentile(to_answer, 99) * 1e3,
        "end_p50_ms": percentile(to_end, 50) * 1e3,
        "jobs_s": statistics.median(rates),
        "ceiling_p50_ms": percentile(to_exec, 50) * 1e3,
        "ceiling_p99_ms": percentile(to_exec, 99) * 1e3,
        "ceiling_exit_p50_ms": percentile(to_exit, 50) * 1e3,
        "ceiling_jobs_s": statistics.median(ceiling_rates),
        "hierarchies": ceiling.hierarchies,
    }


def run_cli_tail(server: BenchServer, job_id: str, identity: str = "admin") -> Figures:
    """``trio-jobs tail JOB`` into a pipe that we drain: bytes, first/last byte (monotonic)."""
    proc = subprocess.Popen(
        [*CLI, "tail", job_id], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server.cli_env(identity)
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    fd = proc.stdout.fileno()
    total = 0
    first = last = 0.0
    # into one reused buffer: a fresh 1 MiB object per read costs ~100,000 page faults per
    # GiB, CPU this reader would take from the server and the CLI it measures
    buf = bytearray(READ_SIZE)
    while n := os.readv(fd, [buf]):
        if not total:
            first = time.monotonic()
        total += n
        last = time.monotonic()
    err = proc.stderr.read()
    code = proc.wait(timeout=60)
    proc.stdout.close()
    proc.stderr.close()
    if code != 0:
        raise RuntimeError(f"trio-jobs tail exited {code}: {err.decode(errors='replace')[-500:]}")
    return {"bytes": total, "first": first, "last": last}


async def streaming(
    server: BenchServer, size: int, rounds: int, ceiling_round: Callable[[], Awaitable[None]] | None = None
) -> Figures:
    """One ``trio-jobs tail`` of ``head -c SIZE /dev/zero``; the job's wall time alone, followed,
    with a stalled follower and beside a spinning process. ``rounds`` interleaved rounds,
    medians: this machine's speed drifts by 2-4x between phases of seconds, which a single
    alone-then-followed pair mistakes for the follower's effect. ``ceiling_round`` (if
    given) runs at the start of each round, so that a ceiling measured there drifts with
    the figures."""
    argv = ("head", "-c", str(size), "/dev/zero")
    mbps: list[float] = []
    ended_mbps: list[float] = []
    walls: dict[str, list[float]] = {"alone": [], "followed": [], "stalled": [], "spinner": []}
    for _ in range(rounds):
        if ceiling_round is not None:
            await ceiling_round()
        async with server.client() as client:
            await settle_disk()
            alone = await client.start(argv[0], argv[1:])
            # a follower from the last offset gets no bytes: it only tells us when the job ended
            walls["alone"].append(_wall(await client.tail(alone.job_id, _discard, offset=size)))
            await settle_disk()
            async with _spinning():
                beside = await client.start(argv[0], argv[1:])
                walls["spinner"].append(_wall(await client.tail(beside.job_id, _discard, offset=size)))
            await settle_disk()
            followed = await client.start(argv[0], argv[1:])
            got = await trio.to_thread.run_sync(run_cli_tail, server, followed.job_id)
            followed_final = await client.status(followed.job_id)
            if got["bytes"] != size or followed_final.output_truncated:
                raise RuntimeError(f"tail got {got['bytes']} of {size} bytes")
            mbps.append(size / (got["last"] - got["first"]) / 1e6)
            walls["followed"].append(_wall(followed_final))
            # the same output again, now that the job has ended: no producer to wait for
            again = await trio.to_thread.run_sync(run_cli_tail, server, followed.job_id)
            if again["bytes"] != size:
                raise RuntimeError(f"tail of the ended job got {again['bytes']} of {size} bytes")
            ended_mbps.append(size / (again["last"] - again["first"]) / 1e6)
        await settle_disk()
        walls["stalled"].append(_wall(await _with_stalled_follower(server, argv, size)))
    return {
        "mbps": statistics.median(mbps),
        "ended_mbps": statistics.median(ended_mbps),
        "job_alone_s": statistics.median(walls["alone"]),
        "job_followed_s": statistics.median(walls["followed"]),
        "job_stalled_s": statistics.median(walls["stalled"]),
        "job_spinner_s": statistics.median(walls["spinner"]),
    }


@contextlib.asynccontextmanager
async def _spinning() -> AsyncIterator[None]:
    """One process that keeps a CPU busy (in a session of its own, like a follower's client),
    nothing else: what the machine itself does to the job when something else wants a CPU,
    the reference for the job's wall time with a follower."""
    spin = "print('spinning', flush=True)\nwhile True: pass"
    proc = await trio.lowlevel.open_process([PYTHON, "-c", spin], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None
    try:
        with trio.fail_after(30):  # spinning before the job starts
            if not await proc.stdout.receive_some(1):
                raise RuntimeError("the spinning process ended at start")
        yield
    finally:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()
            await proc.stdout.aclose()


async def _with_stalled_follower(server: BenchServer, argv: tuple[str, ...], size: int) -> JobInfo:
    """The job run while a follower (its own connection) stops reading at its first chunk: its
    flow-control window closes and the server's stream to it waits. The job must not."""
    stalled = trio.Event()

    async def stuck_sink(_data: bytes) -> None:
        stalled.set()
        await trio.sleep_forever()

    async with server.client() as client, server.client() as other, trio.open_nursery() as nursery:
        job = await client.start(argv[0], argv[1:])
        nursery.start_soon(other.tail, job.job_id, stuck_sink)
        await stalled.wait()
        final = await client.tail(job.job_id, _discard, offset=size)  # returns once the job has ended
        nursery.cancel_scope.cancel()
    return final


async def _sample_rss(server: BenchServer, peak: list[int], done: trio.Event) -> None:
    # A benchmark, not a test: polling /proc every 20 ms is how RSS is observed.
    while not done.is_set():
        peak[0] = max(peak[0], server.rss())
        with trio.move_on_after(0.02):
            await done.wait()


async def fanout(server: BenchServer, workdir: Path, size: int, count: int) -> Figures:
    """``count`` followers (one process, one connection each) of a job writing ``size``
    bytes: ``live``, every follower attached before the job's first byte of payload, then
    ``replay``, as many followers of the same job once it has ended.

    The gate: the job writes :data:`MARKER`, then blocks reading a FIFO. The followers'
    process prints ``attached`` once every follower has received the marker (its stream is
    then open on the server and has sent it bytes); only then, after checking that the job
    is still running and has written the marker and nothing else, the driver writes the
    FIFO, and the job ``exec``s ``head -c SIZE /dev/zero``. The followers' process starts
    in ~0.2 s (its imports), the 32 MiB pass the pipe in ~20 ms: without the gate a
    "live" fan-out is a replay of an ended job.
    """
    fifo = workdir / f"fanout-go-{uuid.uuid4().hex[:8]}"
    os.mkfifo(fifo, 0o600)
    # Held open for reading and writing (Linux): the job's open never blocks, and the line we
    # write stays in the FIFO until the job reads it, whenever it gets there.
    go = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    script = f"echo {MARKER.decode().strip()}; read go < {shlex.quote(str(fifo))}; exec head -c {size} /dev/zero"
    try:
        async with server.client() as client:
            await settle_disk()
            job = await client.start("sh", ["-c", script])

            async def release() -> None:
                held = await client.status(job.job_id)
                if held.state != "running" or held.output_bytes != len(MARKER):
                    raise RuntimeError(f"the fan-out job was not held at its marker: {held}")
                os.write(go, b"go\n")

            live = await _followers(server, workdir, job.job_id, count, size, release)
            final = await client.status(job.job_id)
            if final.state != "exited" or final.exit_code != 0 or final.output_bytes != len(MARKER) + size:
                raise RuntimeError(f"the fan-out job did not write its {size} bytes: {final}")
            replay = await _followers(server, workdir, job.job_id, count, size, None)
    finally:
        os.close(go)
        fifo.unlink()
    return {f"{phase}_{key}": value for phase, figs in (("live", live), ("replay", replay)) for key, value in figs.items()}


MARKER: Final = b"following\n"
"""The fan-out job's first line, before it waits to be released."""


async def _followers(
    server: BenchServer, workdir: Path, job_id: str, count: int, size: int,
    release: Callable[[], Awaitable[None]] | None,
) -> Figures:  # fmt: skip
    """Run the followers' process on ``job_id``; ``release`` (if given) once all are attached.
    Aggregate MB/s of payload (all followers' bytes / first byte to the last follower's end)
    and the server's peak RSS growth meanwhile."""
    argv = [
        PYTHON, "-m", "benchmarks.e2e.followers", "--server", server.address, "--pki", str(server.pki),
        "--identities", ",".join(FOLLOWER_IDENTITIES), "--job", job_id, "--count", str(count),
        "--marker-bytes", str(len(MARKER)), "--expect", str(size),
    ]  # fmt: skip
    before = server.rss()
    peak = [before]
    done = trio.Event()
    errors = workdir / "followers.stderr"
    lines: list[bytes] = []
    with errors.open("wb") as err:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    try:
        with trio.fail_after(900):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_sample_rss, server, peak, done)
                pending = b""
                while chunk := await proc.stdout.receive_some(4096):
                    *new, pending = (pending + chunk).split(b"\n")
                    for line in new:
                        lines.append(line)
                        if line == b"attached" and release is not None:
                            await release()
                await proc.wait()
                done.set()
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(30, shield=True):
                await proc.wait()
        await proc.stdout.aclose()
    if proc.returncode != 0 or not lines or not lines[-1].startswith(b"{"):
        raise RuntimeError(f"followers failed ({proc.returncode}): {errors.read_text(errors='replace')[-1000:]}")
    if release is not None and b"attached" not in lines:
        raise RuntimeError("the followers ended without all being attached")
    got = json.loads(lines[-1])
    if got["complete"] != count:
        raise RuntimeError(f"only {got['complete']} of {count} followers got the marker and all {size} bytes")
    return {"mbps": got["bytes"] / (got["last"] - got["first"]) / 1e6, "rss_growth_mib": (peak[0] - before) / 2**20}


async def _latencies(call: object, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        t0 = time.perf_counter()
        await call()  # type: ignore[operator]
        samples.append(time.perf_counter() - t0)
    return samples


async def scale_running(server: BenchServer, jobs: int, concurrency: int) -> Figures:
    """``jobs`` sleeping jobs at once: server RSS per job, then stop them all."""
    async with server.client() as client:
        await _starts(client, 5, 1, ("/bin/true",))  # warm-up: the first start loads code
        before = server.rss()
        ids = await _starts(client, jobs, concurrency, ("sleep", "3600"))
        after = server.rss()
        running = sum(1 for j in await client.list() if j.state == "running")
        status = await _latencies(lambda: client.status(random.choice(ids)), 200)

        async def stop(job_id: str) -> None:
            await client.stop(job_id, grace=0)

        async with trio.open_nursery() as nursery:
            limiter = trio.CapacityLimiter(concurrency)

            async def bounded(job_id: str) -> None:
                async with limiter:
                    await stop(job_id)

            for job_id in ids:
                nursery.start_soon(bounded, job_id)
    return {
        "running": running,
        "rss_per_job_kib": (after - before) / jobs / 1024,
        "status_p99_ms": percentile(status, 99) * 1e3,
    }


async def prefill_history(home: Path, jobs: int, concurrency: int) -> float:
    """Write ``jobs`` ended ``/bin/true`` jobs of admin into ``home/data``; jobs/s.

    The faster honest way (about twice the rate of StartJob calls over the API, and it was
    quadratic there until StartJob stopped listing the caller's history): the same
    ``Worker`` the server runs, in this process, on the data directory the server then
    opens. The records and output files are exactly what the server writes.
    """
    data = home / "data"
    data.mkdir(parents=True, mode=0o700)
    spec = JobSpec(command="/bin/true", owner="admin")
    per_task = [jobs // concurrency + (i < jobs % concurrency) for i in range(concurrency)]
    t0 = time.perf_counter()
    async with open_worker(data) as worker:

        async def starter(n: int) -> None:
            for _ in range(n):
                job = await worker.start(spec)
                async for _chunk in worker.follow(job.job_id):  # ends when the job has ended
                    pass

        async with trio.open_nursery() as nursery:
            for n in per_task:
                nursery.start_soon(starter, n)
    return jobs / (time.perf_counter() - t0)


async def history(many: BenchServer, few: BenchServer, calls: int, rounds: int) -> Figures:
    """``list``, ``status`` and StartJob latency on a server with a big history (``many``)
    against the same calls on a server with 10 ended jobs (``few``), in the same rounds,
    alternately first and second, both warm: before the timed calls, one untimed call of
    each kind on each server (the big history's first ``list`` fills its cache of ended
    jobs). The starts are timed as in ``job_start`` (each job's end awaited, untimed), after
    every ``list``, so that the 10-job server lists 10 jobs."""
    per = max(1, calls // rounds)
    samples: dict[str, list[float]] = {}
    async with many.client() as big, few.client() as small:
        few_ids = []
        for _ in range(10):
            job = await small.start("/bin/true")
            await small.tail(job.job_id, _discard)
            few_ids.append(job.job_id)
        many_ids = [j.job_id for j in (await big.list_proto()).jobs]
        servers = {"many": (big, many_ids), "few": (small, few_ids)}
        for client, ids in servers.values():  # warm-up
            await client.list_proto()
            await client.status(ids[0])
        for r in range(rounds):
            for name in ("many", "few") if r % 2 == 0 else ("few", "many"):
                client, ids = servers[name]
                samples.setdefault(f"list_{name}", []).extend(await _latencies(client.list_proto, per))
                samples.setdefault(f"status_{name}", []).extend(await _status_calls(client, ids, per * 5))
        for client, _ids in servers.values():  # warm-up
            await _waited_starts(client, 1)
        for r in range(rounds):
            for name in ("many", "few") if r % 2 == 0 else ("few", "many"):
                starts = await _waited_starts(servers[name][0], per)
                samples.setdefault(f"start_{name}", []).extend(answer for answer, _end in starts)
    return {
        "jobs": len(many_ids),
        "list_p50_ms": percentile(samples["list_many"], 50) * 1e3,
        "list_p99_ms": percentile(samples["list_many"], 99) * 1e3,
        "status_p99_ms": percentile(samples["status_many"], 99) * 1e3,
        "start_p50_ms": percentile(samples["start_many"], 50) * 1e3,
        "list_few_p99_ms": percentile(samples["list_few"], 99) * 1e3,
        "status_few_p99_ms": percentile(samples["status_few"], 99) * 1e3,
        "start_few_p50_ms": percentile(samples["start_few"], 50) * 1e3,
    }


async def _status_calls(client: JobsClient, ids: list[str], count: int) -> list[float]:
    """Seconds per ``status`` of a job drawn at random from ``ids``."""
    return await _latencies(lambda: client.status(random.choice(ids)), count)


async def isolation(server: BenchServer, size: int, calls: int) -> Figures:
    """alice floods (``head -c SIZE /dev/zero`` + her ``tail``); bob's status and follower.

    bob's follower is judged by delivery delay: for each line of his ticker, the wall-clock
    time it reached him minus the time written in it, before and during the flood.
    """
    delays: list[tuple[float, float]] = []  # (arrival monotonic, delay s)
    partial = bytearray()

    async def tick_sink(data: bytes) -> None:
        now_wall, now = time.time(), time.monotonic()
        partial.extend(data)
        *lines, rest = bytes(partial).split(b"\n")
        partial[:] = rest
        delays.extend((now, now_wall - int(line) / 1e9) for line in lines if line.isdigit())

    async with server.client("bob") as bob, server.client("alice") as alice, trio.open_nursery() as nursery:
        ticker = await bob.start("sh", ["-c", TICKER])
        nursery.start_soon(bob.tail, ticker.job_id, tick_sink)
        idle_start = time.monotonic()
        idle: list[float] = []
        # at least half a second before the flood, so that bob's follower gets ~25 lines
        while len(idle) < calls or (time.monotonic() - idle_start < 0.5 and len(idle) < calls * 100):
            idle += await _latencies(lambda: bob.status(ticker.job_id), 1)
        idle_end = time.monotonic()
        flood = await alice.start("head", ["-c", str(size), "/dev/zero"])
        flood_done = trio.Event()
        loaded: list[float] = []
        window_start = time.monotonic()

        async def alice_tail() -> None:
            got = await trio.to_thread.run_sync(run_cli_tail, server, flood.job_id, "alice")
            if got["bytes"] != size:
                raise RuntimeError(f"alice's tail got {got['bytes']} of {size} bytes")
            flood_done.set()

        nursery.start_soon(alice_tail)
        with trio.fail_after(600):
            while not flood_done.is_set() and len(loaded) < calls * 20:
                loaded += await _latencies(lambda: bob.status(ticker.job_id), 1)
            await flood_done.wait()
        window_end = time.monotonic()
        await bob.stop(ticker.job_id, grace=0)
    before = [d for t, d in delays if idle_start <= t <= idle_end] or [0.0]
    during = [d for t, d in delays if window_start <= t <= window_end]
    if not during:
        raise RuntimeError("bob's follower got nothing during the flood")
    return {
        "status_idle_p99_ms": percentile(idle, 99) * 1e3,
        "status_flood_p99_ms": percentile(loaded, 99) * 1e3,
        "status_flood_calls": len(loaded),
        "flood_s": window_end - window_start,
        "bob_lines": len(during),
        "bob_idle_max_delay_ms": max(before) * 1e3,
        "bob_p99_delay_ms": percentile(during, 99) * 1e3,
        "bob_max_delay_ms": max(during) * 1e3,
    }
