"""Hostile jobs (issue 8): each leaves the server responsive and is reported truthfully.

One real ``trio-jobs serve`` (with cgroups where the host has them) serves every test of this
module. Alice runs the hostile job; Bob, another user, times 100 ``status`` calls on his own
job through an in-process ``JobsClient`` -- once before (the baseline: the server otherwise
idle, measured in each test) and once while the hostile job runs. The bound
(``reliability/_latency.py``) is 50 ms for the p99, or twice the baseline p99 when the machine
is so loaded that even the idle server is slower than 25 ms; a miss is measured once more
while the hostile job still runs, and the test fails only if both windows miss, with the
figures of both (so the test still says "the hostile job did not hurt others", and a
scheduler stall of a busy CI box is not taken for a regression).
Figures are printed (``pytest -s``); docs/reliability.md records a run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from e2e.conftest import Host

from trio_jobs.client import JobInfo, JobLimits, JobsClient, StopOutcome

from ._latency import Attempt, assert_p99_within_bound
from .conftest import connect, p99, status_latencies

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from .conftest import InProc

pytestmark = pytest.mark.cgroups

CALLS = 100
MiB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    base = tmp_path_factory.mktemp("hostile")
    (base / "logs").mkdir()
    host = Host(base / "home", base / "logs")
    try:
        host.start_server()
        yield host
    finally:
        host.close()


def _needs_cgroups(host: Host) -> None:
    if "cgroups: none" in host.banner:
        pytest.skip("no usable cgroups on this host: memory and pids limits cannot be enforced")


class Users:
    def __init__(self, host: Host, alice: JobsClient, bob: JobsClient, admin: JobsClient) -> None:
        self.host, self.alice, self.bob, self.admin = host, alice, bob, admin
        self.bob_job = ""
        self.baseline: list[float] = []

    async def measure(self, label: str) -> float:
        """Bob's status p99 now, against this test's baseline; asserts the bound (see the
        module docstring) and returns the p99 of the window that met it."""

        async def attempt(_number: int) -> Attempt:
            during = await status_latencies(self.bob, self.bob_job, CALLS)
            return Attempt(baseline=self.baseline, during=during)

        attempts = await assert_p99_within_bound(label, attempt)
        return p99(attempts[-1].during)


@pytest.fixture
async def users(server: Host) -> AsyncIterator[Users]:
    pki = server.home / "pki"
    async with (
        connect(server.address, pki, "alice") as alice,
        connect(server.address, pki, "bob") as bob,
        connect(server.address, pki, "admin") as admin,
    ):
        u = Users(server, alice, bob, admin)
        u.bob_job = (await bob.start("sleep", ["600"])).job_id
        await status_latencies(bob, u.bob_job, 10)  # warm up the connection
        u.baseline = await status_latencies(bob, u.bob_job, CALLS)
        try:
            yield u
        finally:
            with trio.move_on_after(30, shield=True):
                await bob.stop(u.bob_job, grace=0)


async def wait_output(client: JobsClient, job_id: str, at_least: int, marker: bytes = b"") -> bytes:
    """Follow a job until it has written ``at_least`` bytes including ``marker`` (or ended)."""
    got = bytearray()
    with trio.fail_after(60), trio.CancelScope() as scope:

        async def sink(data: bytes) -> None:
            got.extend(data)
            if len(got) >= at_least and marker in got:
                scope.cancel()

        await client.tail(job_id, sink)
    return bytes(got)


async def follow_to_end(client: JobsClient, job_id: str) -> tuple[bytes, JobInfo]:
    got = bytearray()

    async def sink(data: bytes) -> None:
        got.extend(data)

    with trio.fail_after(60):
        info = await client.tail(job_id, sink)
    return bytes(got), info


def _job_cgroup(controller: str, pid: int) -> Path | None:
    """The cgroup directory of process ``pid`` for a v1 ``controller`` (or v2), if it exists.

    Found from the world-readable ``/proc/<pid>/cgroup``: job cgroup names are opaque (they
    do not carry the job id), so a job's cgroup is located through one of its processes.
    """
    root = Path("/sys/fs/cgroup")
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers and controller not in controllers.split(","):
            continue
        for mount in [root / controller] if controllers else [root / "unified", root]:
            d = mount / path.lstrip("/")
            if (d / f"{controller}.max").exists() or (d / f"{controller}.current").exists():
                return d
    return None


# -- the tests --------------------------------------------------------------------------------


async def test_output_flood(users: Users) -> None:
    """``yes`` and ``cat /dev/zero`` at full speed (CPU capped at one core)."""
    flood = await users.alice.start("sh", ["-c", "yes & exec cat /dev/zero"], limits=JobLimits(cpu_millis=1000))
    assert len(await wait_output(users.alice, flood.job_id, 8 * MiB)) >= 8 * MiB
    await users.measure("output flood (yes + cat /dev/zero)")
    running = await users.alice.status(flood.job_id)
    assert running.state == "running"
    assert running.output_bytes >= 8 * MiB
    stopped = await users.alice.stop(flood.job_id, grace=1)
    assert (stopped.job.state, stopped.job.signal, stopped.job.stopped_by_user) == ("killed", 15, True)
    assert stopped.force_ended
    final = await users.alice.status(flood.job_id)
    assert final.output_bytes >= running.output_bytes
    # every recorded byte can be read back
    tail = await trio.run_process(
        [sys.executable, "-m", "trio_jobs.cli", "tail", flood.job_id, "--no-follow"],
        env=users.host.env("alice"),
        capture_stdout=True,
    )
    assert len(tail.stdout) == final.output_bytes


async def test_memory_bomb(users: Users) -> None:
    _needs_cgroups(users.host)
    bomb = "b = []\nwhile True: b.append(b'x' * (1 << 20))"
    limits = JobLimits(memory_bytes=64 * MiB, cpu_millis=1000)
    # once: the kernel kills it, and the status says so
    single = await users.alice.start("python3", ["-c", bomb], limits=limits)
    _, info = await follow_to_end(users.alice, single.job_id)
    assert (info.state, info.signal, info.oom_killed, info.stopped_by_user) == ("killed", 9, True, False)
    assert info.usage.memory_peak_bytes <= 64 * MiB + MiB
    # over and over while another user works
    looping = await users.alice.start(
        "sh", ["-c", f"while :; do python3 -c \"{bomb}\"; echo exit $?; done"], limits=limits
    )
    await wait_output(users.alice, looping.job_id, 0, b"exit 137")  # the kernel killed one
    await users.measure("memory bomb (python3 in a loop, 64 MiB limit)")
    stopped = await users.alice.stop(looping.job_id, grace=0)
    assert stopped.job.state == "killed"
    assert stopped.job.oom_killed  # truthful: the kernel did OOM-kill a process of this job
    assert stopped.job.stopped_by_user


async def test_fork_bomb(users: Users) -> None:
    _needs_cgroups(users.host)
    script = "echo $$; bomb() { bomb | bomb & }; bomb; exec sleep 600"
    job = await users.alice.start("sh", ["-c", script], limits=JobLimits(pids_max=64, cpu_millis=1000))
    first = await wait_output(users.alice, job.job_id, 2, b"\n")
    cg = _job_cgroup("pids", int(first.split(b"\n")[0]))
    assert cg is not None, "the job's pids cgroup"
    await users.measure("fork bomb (64 pids)")
    assert int((cg / "pids.current").read_text()) <= 64
    events = (cg / "pids.events").read_text().split()
    assert int(events[events.index("max") + 1]) > 0, "the fork bomb never hit pids.max"
    stopped = await users.alice.stop(job.job_id, grace=0)
    assert (stopped.job.state, stopped.job.signal, stopped.job.stopped_by_user) == ("killed", 9, True)
    assert not cg.exists(), "the job's cgroup (and every forked process) is gone"
    after = await users.alice.start("echo", ["fine"])
    assert (await follow_to_end(users.alice, after.job_id))[0] == b"fine\n"


async def test_job_ignoring_sigterm(users: Users) -> None:
    job = await users.alice.start("sh", ["-c", "trap '' TERM; echo ready; exec sleep 600"])
    await wait_output(users.alice, job.job_id, 6)
    outcome: list[StopOutcome] = []
    took: list[float] = []
    async with trio.open_nursery() as nursery:

        async def stop() -> None:
            t0 = time.perf_counter()
            outcome.append(await users.alice.stop(job.job_id, grace=1))
            took.append(time.perf_counter() - t0)

        nursery.start_soon(stop)
        await users.measure("job ignoring SIGTERM (during stop --grace 1s)")
    (stopped,) = outcome
    assert (stopped.job.state, stopped.job.signal, stopped.job.stopped_by_user) == ("killed", 9, True)
    assert stopped.force_ended
    assert 1.0 <= took[0] < 15.0, took


async def test_job_closing_stdout_early(users: Users) -> None:
    job = await users.alice.start("sh", ["-c", "echo before; exec >&- 2>&-; exec sleep 600"])
    assert await wait_output(users.alice, job.job_id, 7) == b"before\n"
    await users.measure("job that closed stdout and stderr")
    status = await users.alice.status(job.job_id)
    assert (status.state, status.output_bytes, status.output_truncated) == ("running", 7, False)
    # a follower keeps waiting for the end of a job that still runs
    with trio.move_on_after(0.5) as waited:
        await follow_to_end(users.alice, job.job_id)
    assert waited.cancelled_caught
    stopped = await users.alice.stop(job.job_id, grace=5)
    assert (stopped.job.state, stopped.job.signal) == ("killed", 15)
    assert (await follow_to_end(users.alice, job.job_id))[0] == b"before\n"


async def test_invalid_utf8_and_nul_bytes(users: Users, tmp_path: Path) -> None:
    blob = os.urandom(700_000) + b"\x00" * 1000 + b"\xff\xfe\xc3\x28\xed\xa0\x80\xf8\x88\x80\x80\x80"
    data_file = tmp_path / "blob"
    data_file.write_bytes(blob)
    printf = r"\377\376\000A\000\303\050\n"
    # admin runs as the server's user, who may read the test's file
    job = await users.admin.start("sh", ["-c", f"printf '{printf}'; cat {data_file}; printf '\\000'"])
    expected = b"\xff\xfe\x00A\x00\xc3\x28\n" + blob + b"\x00"
    got, info = await follow_to_end(users.admin, job.job_id)
    assert got == expected
    assert (info.state, info.exit_code, info.output_bytes) == ("exited", 0, len(expected))
    await users.measure("binary output (invalid UTF-8, NUL bytes)")
    for extra in ([], ["--offset", "1"], ["--no-follow"]):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_jobs.cli", "tail", job.job_id, *extra],
            env=users.host.env("admin"),
            capture_stdout=True,
            stderr=subprocess.DEVNULL,
        )
        start = 1 if extra[:1] == ["--offset"] else 0
        assert result.stdout == expected[start:], extra


async def test_output_flood_past_the_cap(inproc: InProc) -> None:
    """In-process server with an 8 MiB output cap: the flood is cut at the cap, marked
    truncated, the job keeps running (its pipe is still drained) and others are served."""
    async with connect(inproc.address, inproc.pki, "alice") as alice, connect(inproc.address, inproc.pki, "bob") as bob:
        own = await bob.start("sleep", ["600"])
        baseline = await status_latencies(bob, own.job_id, CALLS)
        flood = await alice.start("yes")
        got = await wait_output(alice, flood.job_id, inproc.cap)
        assert got[: len(got) // 2 * 2] == b"y\n" * (len(got) // 2)
        with trio.fail_after(60):
            # we read the first `cap` bytes; `yes` is already writing past them
            while not (status := await alice.status(flood.job_id)).output_truncated:
                pass  # each try is a round trip; the next append past the cap flips it
        assert (status.state, status.output_bytes) == ("running", inproc.cap)

        async def attempt(_number: int) -> Attempt:
            during = await status_latencies(bob, own.job_id, CALLS)
            return Attempt(baseline=baseline, during=during)

        await assert_p99_within_bound("output flood past the cap (in-process server)", attempt)
        stopped = await alice.stop(flood.job_id, grace=1)
        assert (stopped.job.state, stopped.job.output_bytes, stopped.job.output_truncated) == ("killed", inproc.cap, True)
        await bob.stop(own.job_id, grace=0)
