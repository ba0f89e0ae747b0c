"""Load from hostile HTTP/2 peers against a real ``trio-jobs serve`` subprocess (issue 8).

Each attack class of the rpc tests (Rapid Reset, CONTINUATION flood, PING and SETTINGS floods,
zero-window readers, readers that never read the socket, a 2 GiB length prefix) runs in a loop
from an authenticated client (alice, dev PKI) while bob's ``GetJobStatus`` latency is measured
over 120 calls on his own connection: p99 must stay under 50 ms, or under twice bob's p99
measured just before in the same test without the attacker when the machine is that loaded;
on a miss the pair (baseline, attack) is run once more, and the figures of both attempts are
in the failure (``reliability/_latency.py``). The attacker is its own process (this module
run as a script), so building frames never competes with the measuring client for the GIL;
the server is another process. Rounds are bounded in count and time.

The soak runner's ``--quick`` mode (a few seconds of real load) is smoke-tested here too.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import trio
from hyperframe.frame import ContinuationFrame, DataFrame, PingFrame, RstStreamFrame, SettingsFrame
from rpc.rawh2 import (
    CANCEL,
    PREFACE,
    SETTINGS_INITIAL_WINDOW_SIZE,
    RawH2,
    grpc_message,
    open_raw_h2,
)

from trio_jobs.client import JobsClient
from trio_jobs.security.tls import client_ssl_context
from trio_jobs.v1 import jobs_pb2 as pb

from ._latency import Attempt, assert_p99_within_bound
from .test_connections import ctx_for, host_port, server_rss, timed_status_calls

if TYPE_CHECKING:
    import ssl
    from collections.abc import Iterable, Iterator, Sequence

    from e2e.conftest import Host
    from hyperframe.frame import Frame

pytestmark = pytest.mark.slow

BOUND: Final = 120.0  # per attempt (a miss is measured once more)
ROUND_BOUND: Final = 20.0  # one attack round (connect, flood, read to the close)
MAX_ROUNDS: Final = 200
STATUS_CALLS: Final = 120
MiB: Final = 1024 * 1024
TESTS_DIR: Final = Path(__file__).resolve().parent.parent
SERVICE: Final = "/trio_jobs.v1.JobService/"


def _status_request(job_id: str) -> bytes:
    return grpc_message(pb.GetJobStatusRequest(job_id=job_id).SerializeToString())


async def _send_until_closed(raw: RawH2, batches: Iterable[Sequence[Frame | bytes]]) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        for batch in batches:
            await raw.send(*batch)


async def _flood_and_read(raw: RawH2, batches: Iterable[Sequence[Frame | bytes]]) -> None:
    """Flood in one task while another reads until the server closes the connection."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_send_until_closed, raw, batches)
        await raw.read_to_close(max_frames=200_000)
        nursery.cancel_scope.cancel()


async def rapid_reset(raw: RawH2, job_id: str) -> None:
    def batches() -> Iterator[list[Frame | bytes]]:
        yield [PREFACE, SettingsFrame(0)]
        for _ in range(20):
            batch: list[Frame | bytes] = []
            for _ in range(200):
                sid = raw.new_stream_id()
                batch += [
                    raw.headers_frame(sid, SERVICE + "GetJobStatus"),
                    DataFrame(sid, _status_request(job_id), flags=["END_STREAM"]),
                    RstStreamFrame(sid, CANCEL),
                ]
            yield batch

    await _flood_and_read(raw, batches())


async def continuation_flood(raw: RawH2, _job_id: str) -> None:
    pad = raw.encoder.encode([("x-pad", "p" * 900)] * 17)[:16384]

    def batches() -> Iterator[list[Frame | bytes]]:
        yield [PREFACE, SettingsFrame(0), raw.headers_frame(1, SERVICE + "GetJobStatus", end_headers=False)]
        for _ in range(64):
            yield [ContinuationFrame(1, pad) for _ in range(64)]

    await _flood_and_read(raw, batches())


async def ping_flood(raw: RawH2, _job_id: str) -> None:
    def batches() -> Iterator[list[Frame | bytes]]:
        yield [PREFACE, SettingsFrame(0)]
        for j in range(0, 40_000, 1000):
            yield [PingFrame(0, i.to_bytes(8, "big")) for i in range(j, j + 1000)]

    await _flood_and_read(raw, batches())


async def settings_flood(raw: RawH2, _job_id: str) -> None:
    def batches() -> Iterator[list[Frame | bytes]]:
        yield [PREFACE, SettingsFrame(0)]
        for _ in range(20):
            yield [SettingsFrame(0, settings={SETTINGS_INITIAL_WINDOW_SIZE: 65535}) for _ in range(1000)]

    # The server may keep the connection (each SETTINGS is legal): flood, then hang up.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(raw.read_to_close, max_frames=200_000))
        await _send_until_closed(raw, batches())
        nursery.cancel_scope.cancel()


def _follow_frames(raw: RawH2, job_id: str, streams: int) -> list[Frame]:
    frames: list[Frame] = []
    body = grpc_message(pb.StreamOutputRequest(job_id=job_id, follow=True).SerializeToString())
    for _ in range(streams):
        sid = raw.new_stream_id()
        frames += [raw.headers_frame(sid, SERVICE + "StreamOutput"), DataFrame(sid, body, flags=["END_STREAM"])]
    return frames


async def zero_window_readers(raw: RawH2, job_id: str) -> None:
    """Window 0 and 50 followers of a job with megabytes of output; hold, never read."""
    await raw.send(PREFACE, SettingsFrame(0, settings={SETTINGS_INITIAL_WINDOW_SIZE: 0}))
    await raw.send(*_follow_frames(raw, job_id, 50))
    await trio.sleep_forever()  # held until the measurement ends (the round is cancelled)


async def never_reading_socket(raw: RawH2, job_id: str) -> None:
    """A normal window, 50 followers, and the socket is never read: TCP buffers fill."""
    await raw.send(PREFACE, SettingsFrame(0))
    await raw.send(*_follow_frames(raw, job_id, 50))
    await trio.sleep_forever()


async def huge_length_prefix(raw: RawH2, job_id: str) -> None:
    """A request announcing 2 GiB, repeatedly on one connection: RESOURCE_EXHAUSTED each time."""
    await raw.send(PREFACE, SettingsFrame(0))
    for _ in range(50):
        sid = raw.new_stream_id()
        await raw.send(
            raw.headers_frame(sid, SERVICE + "GetJobStatus"),
            DataFrame(sid, grpc_message(b"\0" * 16000, length=1 << 31)),
        )
        got, _ = await raw.read_until(lambda r, sid=sid: r.frame.stream_id == sid and (  # type: ignore[misc]
            "END_STREAM" in r.frame.flags or isinstance(r.frame, RstStreamFrame)))
        if got is None:
            return
        assert got.headers is None or ("grpc-status", "8") in got.headers, got.headers


ATTACKS: Final = {
    "rapid_reset": rapid_reset,
    "continuation_flood": continuation_flood,
    "ping_flood": ping_flood,
    "settings_flood": settings_flood,
    "zero_window_readers": zero_window_readers,
    "never_reading_socket": never_reading_socket,
    "huge_length_prefix": huge_length_prefix,
}


async def _attack_rounds(name: str, address: tuple[str, int], ctx: ssl.SSLContext, job_id: str) -> None:
    attack = ATTACKS[name]
    for i in range(MAX_ROUNDS):
        with trio.move_on_after(ROUND_BOUND):
            raw = await open_raw_h2(*address, ctx)
            if i == 0:
                print("attacking", flush=True)
            async with raw:
                await attack(raw, job_id)


def attacker_main(argv: list[str]) -> None:
    """``python -m reliability.test_load NAME HOST PORT PKI_DIR JOB_ID`` (PYTHONPATH=tests):
    run rounds of one attack as alice until killed (or MAX_ROUNDS). Its own process, so that
    building frames never competes with the measuring client for the GIL."""
    name, host_name, port, pki, job_id = argv
    ctx = client_ssl_context(cert=Path(pki) / "alice.crt", key=Path(pki) / "alice.key", ca=Path(pki) / "ca.crt")
    trio.run(_attack_rounds, name, (host_name, int(port)), ctx, job_id)


# Known rpc-layer weaknesses (reported; the rpc layer is not ours to change): the figures are
# printed, and these cases pass once rpc fixes them (xfail is not strict).
KNOWN_STALLS: Final[dict[str, str]] = {}  # rapid_reset, settings_flood: fixed in rpc (issue 3)


async def _read_line(stream: trio.abc.ReceiveStream) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        data = await stream.receive_some(1)
        if not data:
            break
        buf += data
    return buf


async def _under_attack(host: Host, name: str, alice_job: str, bob: JobsClient, bob_job: str) -> list[float]:
    """Start the attacker, wait until it attacks, time bob's calls, kill it; bob's latencies."""
    server_name, port = host_port(host)
    attacker = await trio.lowlevel.open_process(
        [sys.executable, "-m", "reliability.test_load", name, server_name, str(port), str(host.home / "pki"), alice_job],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(TESTS_DIR)},
    )
    try:
        assert attacker.stdout is not None
        assert await _read_line(attacker.stdout) == b"attacking\n"
        samples = await timed_status_calls(bob, bob_job, STATUS_CALLS)
        assert attacker.poll() is None, "the attacker stopped before the measurement ended"
    finally:
        attacker.kill()
        with trio.move_on_after(ROUND_BOUND, shield=True):
            await attacker.wait()
        await attacker.stdout.aclose()  # type: ignore[union-attr]
    # the attacker is gone: the server is still fine
    assert (await bob.status(bob_job)).state == "running"
    return samples


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_STALLS[n], strict=False)) if n in KNOWN_STALLS else n
        for n in ATTACKS
    ],
)
async def test_attack_leaves_other_users_served(host: Host, name: str) -> None:
    host.start_server()
    # alice's target: a job with megabytes of output (followers have something to block on)
    alice_job = host.start("sh", "-c", "head -c 8000000 /dev/zero; exec sleep 600", identity="alice")
    bob_job = host.start("sleep", "600", identity="bob")
    rss_before = server_rss(host)

    async def attempt(_number: int) -> Attempt:
        with trio.fail_after(BOUND):
            baseline = await timed_status_calls(bob, bob_job, STATUS_CALLS)  # no attacker
            during = await _under_attack(host, name, alice_job, bob, bob_job)
        return Attempt(baseline=baseline, during=during, note=f"server RSS {server_rss(host) / MiB:.0f} MiB")

    with trio.fail_after(3 * BOUND):  # the warm-up and at most two attempts
        async with JobsClient.connect(host.address, ssl_context=ctx_for(host, "bob")) as bob:
            await timed_status_calls(bob, bob_job, 10)  # warm up the connection
            await assert_p99_within_bound(f"{name}: bob's status", attempt)
    rss_after = server_rss(host)
    print(f"{name}: server RSS {rss_before / MiB:.0f} -> {rss_after / MiB:.0f} MiB")
    assert rss_after - rss_before < 64 * MiB
    assert "Traceback" not in host.server_stderr()
    host.run("stop", alice_job, "--grace", "0", identity="alice")
    host.run("stop", bob_job, "--grace", "0", identity="bob")


def test_soak_quick_smoke() -> None:
    """``python -m benchmarks.soak --quick``: a few seconds of real load, exit 0, a report."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak", "--quick"],
        capture_output=True,
        cwd=TESTS_DIR.parent,
        timeout=180,
        check=False,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "unexpected errors: 0" in out, out
    assert "p99" in out, out


if __name__ == "__main__":
    attacker_main(sys.argv[1:])
