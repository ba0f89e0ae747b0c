"""Replay end to end, property-tested: every follower of a job gets exactly the job's output
from its offset, and the job's exit status, however its connections are cut.

One in-process server (``trio_jobs.server.serve`` over loopback with real mutual TLS and real
job processes, no cgroups) per example. Hypothesis draws:

- the job: bursts of (size, pause) written by a real process, bytes derived from a seed so
  the expected output is known without asking the server, and an exit code;
- the followers: how many, each one's start offset (0, inside, at or beyond the end) and when
  it joins (once the job has written that many bytes, or after the job has ended);
- for each follower's successive connections, where its proxy cuts it: after a number of
  bytes from the server to the client (in the TLS handshake or headers, mid-frame, in the
  trailers) or once the follower has got a number of output bytes on it; by FIN or RST.

Each follower is a public ``JobsClient`` whose connections all go through its own cutting
proxy, calling ``tail(job_id, sink, offset=..., follow=True)``, which must reconnect and
resume. A "watcher" follows from 0 on a direct connection: the join times are its progress,
so nothing waits on the clock.

Why 100 random examples suffice: the bugs this hunts live in a few classes of cut (in the
handshake, before the call is answered, between or inside chunks mid-output, after the last
byte or in the trailers) crossed with a few classes of offset and join time. The kinds are
drawn evenly, and a run holds ~250 followers and 250-450 fired cuts (plus 50-200 in a
connect), 40-80 of them mid-output, so every class comes up dozens of times. Tried as
mutations: a client that resumes one byte late after a reconnect (silent loss) failed at
the 18th example; resuming a byte early, or a server that starts a byte late, at the first
(the client's own "output jumped" check). The explicit ``@example`` cases pin the corners
on every run, and the test asserts that cuts really fired mid-output and in a connect.
An example takes ~0.2 s (a server start and stop, a Python job and its pauses; reconnects
are immediate); the whole test 15-25 s on a busy 2-CPU machine, with or without coverage.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trio_jobs.client import JobInfo, JobsClient, JobsError, Reconnect
from trio_jobs.rpc import StatusCode
from trio_jobs.security.policy import Policy
from trio_jobs.security.tls import client_ssl_context, server_ssl_context
from trio_jobs.server import NO_CGROUPS, ServerConfig, ServerInfo, serve

if TYPE_CHECKING:
    import ssl

pytestmark = pytest.mark.slow

EXAMPLES: Final = 100
EXAMPLE_TIMEOUT: Final = 30.0
# Reconnect at once (the default waits 50 ms first, doubling): cuts cost little time, so an
# example can hold many. A follow that makes no progress for 10 s fails the example with
# the client's own message (rather than the example's timeout).
RECONNECT: Final = Reconnect(window=10.0, first_delay=0.001, max_delay=0.05)

POLICY: Final = """
[defaults]
run_as = ""
programs = ["*"]
[identities.alice]
"""

# The job: writes bursts of bytes derived from a seed (so the test knows them), pausing
# after each, then exits with the given code. Arguments: seed, exit code, then size:pause_ms.
PROGRAM: Final = r"""
import os, random, sys, time
seed, code = int(sys.argv[1]), int(sys.argv[2])
bursts = [tuple(map(int, a.split(":"))) for a in sys.argv[3:]]
data = memoryview(random.Random(seed).randbytes(sum(size for size, _ in bursts)))
at = 0
for size, pause in bursts:
    end = at + size
    while at < end:
        at += os.write(1, data[at:end])
    if pause:
        time.sleep(pause / 1000)
os._exit(code)
"""


def expected_output(seed: int, bursts: tuple[tuple[int, int], ...]) -> bytes:
    return random.Random(seed).randbytes(sum(size for size, _ in bursts))


@dataclass(frozen=True)
class Cut:
    after: int  # bytes the connection carries before the cut
    in_output: bool  # ``after`` counts output the follower got on it, not server-to-client bytes
    reset: bool  # an RST (SO_LINGER 0) rather than a FIN


@dataclass(frozen=True)
class Follower:
    offset: int
    join_at: int | None  # start once the job has written this many bytes; None: once it ended
    cuts: tuple[Cut, ...]  # one per connection, in order; later connections are not cut


@dataclass(frozen=True)
class Case:
    seed: int
    bursts: tuple[tuple[int, int], ...]  # (size, pause in ms)
    exit_code: int
    followers: tuple[Follower, ...]

    @property
    def total(self) -> int:
        return sum(size for size, _ in self.bursts)


# Bursts separated by a pause mostly reach a follower as separate chunks (up to 64 KiB each).
BURST_SIZE: Final = st.one_of(st.integers(0, 2_000), st.integers(0, 30_000), st.integers(0, 200_000))
# What a connection carries from the server, measured: ~1.4 KB of TLS handshake, ~0.1 KB of
# HTTP/2 settings and the call's headers, then each chunk of output with ~40 bytes of framing,
# then ~0.7 KB of trailers (the final status).
PREAMBLE: Final = 1_600
TRAILERS: Final = 800


def cut_positions(total: int, offset: int) -> st.SearchStrategy[Cut]:
    """A cut in the handshake or headers, at any byte of what the connection carries, or once
    the follower has got a number of output bytes on it (a late follower gets its backlog in
    64 KiB chunks, so a cut at a random wire byte mostly lands inside the first one)."""
    remaining = total - min(offset, total)
    span = PREAMBLE + remaining + 40 * (remaining // 1000 + 10) + TRAILERS
    return st.sampled_from(["preamble", "wire", "output", "output"]).flatmap(lambda kind: st.builds(
        Cut,
        st.integers(0, remaining) if kind == "output"
        else st.integers(0, PREAMBLE) if kind == "preamble" else st.integers(PREAMBLE, span),
        st.just(kind == "output"),
        st.booleans(),
    ))


@st.composite
def followers(draw: st.DrawFn, total: int) -> Follower:
    # Kinds first (sampled_from draws them evenly, where one_of would favour its first
    # branch): mostly inside the output and joining while the job runs, where cuts land
    # between chunks; at and beyond the end, and after the job ended, too.
    where = draw(st.sampled_from(["start", "inside", "inside", "inside", "end", "beyond"]))
    offset = (
        0 if where == "start" else total if where == "end"
        else draw(st.integers(0, total) if where == "inside" else st.integers(total + 1, total + 1000))
    )
    when = draw(st.sampled_from(["start", "running", "running", "ended"]))
    join_at = 0 if when == "start" else None if when == "ended" else draw(st.integers(0, total))
    cuts = draw(st.lists(cut_positions(total, offset), max_size=4))
    return Follower(offset, join_at, tuple(cuts))


@st.composite
def cases(draw: st.DrawFn) -> Case:
    bursts = tuple(draw(st.lists(st.tuples(BURST_SIZE, st.integers(0, 30)), min_size=1, max_size=10)))
    total = sum(size for size, _ in bursts)
    return Case(
        seed=draw(st.integers(0, 2**32)), bursts=bursts, exit_code=draw(st.integers(0, 255)),
        followers=tuple(draw(st.lists(followers(total), min_size=1, max_size=4))),
    )


@dataclass
class Progress:
    """Bytes a follower has received; tasks wait for a count without polling."""

    received: int = 0
    ended: trio.Event = field(default_factory=trio.Event)
    _waiters: list[tuple[int, trio.Event]] = field(default_factory=list)

    def add(self, n: int) -> None:
        self.received += n
        still = []
        for at, ev in self._waiters:
            if at <= self.received:
                ev.set()
            else:
                still.append((at, ev))
        self._waiters = still

    async def wait_for(self, at: int | None) -> None:
        """Until ``at`` bytes were received (None: until ``ended`` is set)."""
        if at is None:
            await self.ended.wait()
        elif self.received < at:
            ev = trio.Event()
            self._waiters.append((at, ev))
            await ev.wait()


@dataclass
class Proxy:
    """A loopback TCP proxy to ``upstream`` that cuts its n-th connection as ``cuts[n]`` says.

    A cut closes both sides (so the server, too, sees the connection end at once): after
    forwarding exactly ``after`` bytes from the server to the client, or once the follower
    (``progress``) has got ``after`` output bytes on this connection. ``fired`` lists the cuts
    that happened, ``delivered`` the follower's byte count when its next connection came,
    i.e. once it had taken in all the cut connection brought (see :meth:`delivered_at_cuts`).
    """

    upstream: tuple[str, int]
    cuts: tuple[Cut, ...]
    progress: Progress
    connections: int = 0
    fired: list[Cut] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)

    def delivered_at_cuts(self) -> list[int]:
        """For each fired cut, the bytes the follower had got by then (once it has ended)."""
        return self.delivered + [self.progress.received] * (len(self.fired) - len(self.delivered))

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port: int = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._carry, listeners)
            task_status.started(port)

    async def _carry(self, client: trio.SocketStream) -> None:
        cut = self.cuts[self.connections] if self.connections < len(self.cuts) else None
        self.connections += 1
        if len(self.delivered) < len(self.fired):
            self.delivered.append(self.progress.received)
        base = self.progress.received
        async with client:
            try:
                server = await trio.open_tcp_stream(*self.upstream)
            except OSError:
                return
            async with server, trio.open_nursery() as pumps:
                wire_cut = cut if cut is not None and not cut.in_output else None
                pumps.start_soon(self._pump, client, server, None, pumps.cancel_scope)
                pumps.start_soon(self._pump, server, client, wire_cut, pumps.cancel_scope)
                if cut is not None and cut.in_output:
                    await self.progress.wait_for(base + cut.after)
                    self._fire(cut, client, server)
                    pumps.cancel_scope.cancel()

    def _fire(self, cut: Cut, *streams: trio.SocketStream) -> None:
        self.fired.append(cut)
        if cut.reset:  # closing with linger 0 sends an RST instead of a FIN
            for stream in streams:
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async def _pump(
        self, src: trio.SocketStream, dst: trio.SocketStream, cut: Cut | None, done: trio.CancelScope
    ) -> None:
        left = cut.after if cut is not None else None
        try:
            while data := await src.receive_some(65536):
                if left is not None and len(data) >= left:
                    if left:
                        await dst.send_all(data[:left])
                    assert cut is not None
                    self._fire(cut, src, dst)
                    break
                await dst.send_all(data)
                if left is not None:
                    left -= len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            done.cancel()  # either direction ending (EOF, error, cut) ends the connection


@dataclass
class Result:
    data: bytearray = field(default_factory=bytearray)
    progress: Progress = field(default_factory=Progress)
    final: JobInfo | None = None
    connect_failures: int = 0
    proxy: Proxy | None = None


async def follow(
    who: Follower, job_id: str, upstream: tuple[str, int], ctx: ssl.SSLContext, job: Progress, result: Result
) -> None:
    """Once the job has written ``who.join_at`` bytes (as the watcher saw them), tail it
    from ``who.offset`` through a proxy that cuts as ``who.cuts`` says."""
    await job.wait_for(who.join_at)
    proxy = result.proxy = Proxy(upstream, who.cuts, result.progress)

    async def sink(data: bytes) -> None:
        result.data += data
        result.progress.add(len(data))

    async with trio.open_nursery() as nursery:
        port = await nursery.start(proxy.run)
        # JobsClient.connect does not retry (its caller decides); a cut during its handshake
        # is retried here, as a user would. Every connection after it is tail's business.
        async with contextlib.AsyncExitStack() as stack:
            while True:
                try:
                    jobs = await stack.enter_async_context(
                        JobsClient.connect(f"127.0.0.1:{port}", ssl_context=ctx, reconnect=RECONNECT)
                    )
                    break
                except JobsError as exc:
                    result.connect_failures += 1
                    if exc.code != StatusCode.UNAVAILABLE or result.connect_failures > len(who.cuts):
                        raise
            result.final = await jobs.tail(job_id, sink, offset=who.offset, follow=True)
        nursery.cancel_scope.cancel()


def count_cuts(case: Case, results: list[Result], stats: Counter[str]) -> None:
    """Where the cuts that fired left each follower: ``stats["cut mid-output"]`` etc."""
    for who, result in zip(case.followers, results, strict=True):
        start = min(who.offset, case.total)
        assert result.proxy is not None
        for received in result.proxy.delivered_at_cuts():
            where = (
                "before the first byte" if received == 0 and start < case.total
                else "mid-output" if start + received < case.total
                else "after the last byte"
            )
            stats[f"cut {where}"] += 1
        stats["cut in connect"] += result.connect_failures


async def scenario(case: Case, data_dir: Path, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> list[Result]:
    config = ServerConfig(
        host="127.0.0.1", port=0, data_dir=data_dir, ssl_context=server_ctx,
        policy=Policy.from_toml(POLICY), cgroups=NO_CGROUPS, handle_signals=False, shutdown_timeout=10.0,
        release_memory_interval=None,
    )
    results = [Result() for _ in case.followers]
    with trio.fail_after(EXAMPLE_TIMEOUT):
        async with trio.open_nursery() as nursery:
            info: ServerInfo = await nursery.start(serve, config)
            upstream = info.addresses[0]
            host, port = upstream
            async with JobsClient.connect(f"{host}:{port}", ssl_context=client_ctx) as jobs:
                args = ["-c", PROGRAM, str(case.seed), str(case.exit_code), *(f"{s}:{p}" for s, p in case.bursts)]
                job = await jobs.start(sys.executable, args)
                watched = Progress()  # the job's output as the watcher got it: join times

                async def sink(data: bytes) -> None:
                    watched.add(len(data))

                async with trio.open_nursery() as followers:
                    for who, result in zip(case.followers, results, strict=True):
                        followers.start_soon(follow, who, job.job_id, upstream, client_ctx, watched, result)
                    final = await jobs.tail(job.job_id, sink, offset=0, follow=True)
                    watched.ended.set()
            assert watched.received == case.total, "the watcher (no proxy) lost bytes"
            assert final.exit_status == case.exit_code
            info.handle.request_shutdown()
    return results


@pytest.fixture(scope="module")
def contexts(dev_pki: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return (
        server_ssl_context(cert=dev_pki / "server.crt", key=dev_pki / "server.key", ca=dev_pki / "ca.crt"),
        client_ssl_context(cert=dev_pki / "alice.crt", key=dev_pki / "alice.key", ca=dev_pki / "ca.crt"),
    )


def test_every_follower_gets_the_output_from_its_offset_and_the_exit_status(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    server_ctx, client_ctx = contexts
    stats: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    # a cut inside the TLS handshake of the first connection (connect fails) and of a
    # reconnect; cuts mid-output with FIN and RST; an offset beyond the end; a late joiner
    @example(Case(seed=1, bursts=((70_000, 20), (5, 10), (1_000, 10), (130_000, 0)), exit_code=3, followers=(
        Follower(offset=0, join_at=0, cuts=(
            Cut(100, in_output=False, reset=False),  # in the handshake: connect fails
            Cut(30_000, in_output=True, reset=True),  # mid-output, by RST
            Cut(200, in_output=False, reset=True),  # in the handshake of tail's reconnect
            Cut(1_000, in_output=True, reset=False),  # mid-output again, by FIN
        )),
        Follower(offset=123, join_at=1000, cuts=(Cut(60_000, in_output=False, reset=False),)),  # mid-chunk
        Follower(offset=300_000, join_at=0, cuts=(Cut(1_650, in_output=False, reset=True),)),  # beyond the end
        Follower(offset=201_005, join_at=None, cuts=(  # at the end, once the job ended
            Cut(2_000, in_output=False, reset=False), Cut(1_500, in_output=False, reset=True)
        )),
    )))
    @example(Case(seed=2, bursts=(), exit_code=255, followers=(  # no output; a cut in the trailers
        Follower(offset=0, join_at=0, cuts=(Cut(1_900, in_output=False, reset=False),)),
    )))
    @given(case=cases())
    def check(case: Case) -> None:
        with tempfile.TemporaryDirectory() as d:
            results = trio.run(scenario, case, Path(d) / "data", server_ctx, client_ctx)
        expected = expected_output(case.seed, case.bursts)
        for i, (who, result) in enumerate(zip(case.followers, results, strict=True)):
            got = bytes(result.data)
            want = expected[who.offset:]
            if got != want:
                at = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got), len(want)))
                assert result.proxy is not None
                fired = list(zip(result.proxy.fired, result.proxy.delivered_at_cuts(), strict=True))
                pytest.fail(
                    f"follower {i} (offset {who.offset}): got {len(got)} bytes, want {len(want)}; "
                    f"first difference at {at}; cuts fired (cut, bytes it had by then): {fired}"
                )
            assert result.final is not None
            assert result.final.state == "exited"
            assert result.final.exit_status == case.exit_code
            assert result.final.output_bytes == case.total
        count_cuts(case, results, stats)

    check()
    # the proxy really cut, where it matters (the explicit examples alone guarantee these)
    assert stats["cut mid-output"] > 0, stats
    assert stats["cut in connect"] > 0, stats
