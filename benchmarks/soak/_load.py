"""The soak's clients: each one starts, follows, queries, lists and stops jobs until the end.

Every client has its own connection (``JobsClient``) and identity group, and loops:

- 60%: a short job printing a known line -> follow it to the end (``tail``) and check the exact
  bytes and the exit status, then ``status`` it;
- 25%: a long ``sleep`` -> ``status`` (running) -> ``stop`` (grace 0) -> check it was killed;
- 15%: a job writing 64 KiB -> ``tail`` from a random offset and check the byte count;
- every 5th iteration a ``list`` of the identity's jobs.

Expected refusals (RESOURCE_EXHAUSTED: the identity's running-job cap when its clients
overlap) are counted apart; any other error, or a wrong answer, is unexpected. Latencies are
kept per RPC (bounded: a reservoir of at most ``MAX_SAMPLES`` per RPC).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import trio

from trio_jobs.client import JobsClient, JobsError
from trio_jobs.rpc import StatusCode

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

MAX_SAMPLES: Final = 50_000  # per RPC; beyond it, reservoir sampling keeps memory bounded
CALL_TIMEOUT: Final = 60.0  # no single operation of a client may take longer than this
BIG_OUTPUT: Final = 65536
EXPECTED_CODES: Final = frozenset({StatusCode.RESOURCE_EXHAUSTED})


@dataclass
class Stats:
    requests: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    expected: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)  # first messages (bounded)
    unexpected_count: int = 0
    jobs_started: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(8))

    def record(self, rpc: str, seconds: float) -> None:
        self.requests[rpc] += 1
        samples = self.latencies.setdefault(rpc, [])
        if len(samples) < MAX_SAMPLES:
            samples.append(seconds)
        else:
            i = self.rng.randrange(self.requests[rpc])
            if i < MAX_SAMPLES:
                samples[i] = seconds

    def fail(self, what: str) -> None:
        self.unexpected_count += 1
        if len(self.unexpected) < 20:
            self.unexpected.append(what)


class _Timed:
    def __init__(self, stats: Stats, rpc: str) -> None:
        self.stats, self.rpc = stats, rpc

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.stats.record(self.rpc, time.perf_counter() - self.t0)


async def _sink_into(buf: bytearray, data: bytes) -> None:
    buf += data


async def _one_iteration(client: JobsClient, stats: Stats, rng: random.Random, n: int, tag: str) -> None:
    kind = rng.random()
    if kind < 0.60:
        line = f"soak {tag} {n}\n"
        with _Timed(stats, "StartJob"):
            job = await client.start("printf", ["%s", line])
        stats.jobs_started += 1
        out = bytearray()
        with _Timed(stats, "StreamOutput"):
            final = await client.tail(job.job_id, lambda d: _sink_into(out, d))
        if bytes(out) != line.encode() or final.state != "exited" or final.exit_code != 0:
            stats.fail(f"printf job {job.job_id}: output {bytes(out)!r}, state {final.state} {final.exit_code}")
        with _Timed(stats, "GetJobStatus"):
            status = await client.status(job.job_id)
        if status.state != "exited":
            stats.fail(f"status of ended job {job.job_id}: {status.state}")
    elif kind < 0.85:
        with _Timed(stats, "StartJob"):
            job = await client.start("sleep", ["600"])
        stats.jobs_started += 1
        with _Timed(stats, "GetJobStatus"):
            status = await client.status(job.job_id)
        if status.state != "running":
            stats.fail(f"sleep job {job.job_id} is {status.state}, not running")
        with _Timed(stats, "StopJob"):
            outcome = await client.stop(job.job_id, grace=0)
        if outcome.job.state != "killed" or not outcome.force_ended:
            stats.fail(f"stopped job {job.job_id}: {outcome.job.state}, force_ended={outcome.force_ended}")
    else:
        with _Timed(stats, "StartJob"):
            job = await client.start("head", ["-c", str(BIG_OUTPUT), "/dev/zero"])
        stats.jobs_started += 1
        offset = rng.randrange(BIG_OUTPUT)
        out = bytearray()
        with _Timed(stats, "StreamOutput"):
            final = await client.tail(job.job_id, lambda d: _sink_into(out, d), offset=offset)
        if len(out) != BIG_OUTPUT - offset or out.count(0) != len(out) or final.exit_code != 0:
            stats.fail(f"head job {job.job_id}: {len(out)} bytes from {offset}, exit {final.exit_code}")
    if n % 5 == 0:
        with _Timed(stats, "ListJobs"):
            await client.list()


async def run_client(
    index: int,
    address: str,
    ssl_context: ssl.SSLContext,
    stats: Stats,
    deadline: float,
    think: float,
) -> None:
    """One client's loop until ``deadline`` (trio clock). Never raises for a server error."""
    rng = random.Random(index)
    tag = f"c{index}"
    try:
        async with JobsClient.connect(address, ssl_context=ssl_context) as client:
            n = 0
            while trio.current_time() < deadline:
                n += 1
                try:
                    with trio.fail_after(CALL_TIMEOUT):
                        await _one_iteration(client, stats, rng, n, tag)
                except JobsError as exc:
                    if exc.code in EXPECTED_CODES:
                        stats.expected[exc.code.name] += 1
                    else:
                        stats.fail(f"{tag}: {exc.code.name}: {exc.message}")
                except trio.TooSlowError:
                    stats.fail(f"{tag}: an iteration took over {CALL_TIMEOUT:g}s")
                if think:
                    await trio.sleep(rng.uniform(0, think))  # a user's pause: load, not a test wait
    except JobsError as exc:
        stats.fail(f"{tag}: connection: {exc.code.name}: {exc.message}")


async def run_load(
    address: str,
    contexts: Callable[[int], ssl.SSLContext],
    *,
    clients: int,
    seconds: float,
    think: float,
) -> Stats:
    stats = Stats()
    deadline = trio.current_time() + seconds
    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(run_client, i, address, contexts(i), stats, deadline, think)
    return stats
