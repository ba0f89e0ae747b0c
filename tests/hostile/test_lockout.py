"""One source address cannot lock every client out (issue #16, item 8; DESIGN §3).

Found by an attacker: 1,000 TCP connections that send nothing took all of the server's
``max_connections``, and a certificate naming no policy identity kept an idle connection
forever. Against a real ``trio-jobs serve`` subprocess, each test performs the attack from
127.0.0.1 and a bystander binds its client socket to 127.0.0.2 (another loopback address)
and must be answered within a few seconds:

1. 1,000 plain TCP connections that send nothing;
2. 1,000 connections that complete TLS (half also the HTTP/2 preface) and then idle;
3. a certificate of the development CA for "mallory", who is not in the policy: one
   PERMISSION_DENIED, then GOAWAY and the server closes the connection;
4. an idle connection is closed at the idle timeout, and an open ``tail`` is not idle.

Every loop is bounded in count, every wait by ``fail_after``; every socket is closed at
the end.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from typing import TYPE_CHECKING, Final

import pytest
import trio
from hyperframe.frame import GoAwayFrame, PingFrame, SettingsFrame
from rpc.rawh2 import NO_ERROR, RawH2, Received

from trio_jobs.rpc import open_channel
from trio_jobs.security.pki import issue_client
from trio_jobs.security.tls import client_ssl_context
from trio_jobs.v1 import jobs_pb2 as pb

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Iterator

    from e2e.conftest import Host

pytestmark = pytest.mark.slow

BOUND: Final = 120.0  # every test's wall-clock safety bound, never a way of waiting
FLOOD: Final = 1000  # the attack: as many connections as the server's max_connections
FLOODER: Final = "127.0.0.1"
BYSTANDER: Final = "127.0.0.2"
ANSWER_WITHIN: Final = 3.0  # "a few seconds" for the bystander's answer
PER_SOURCE: Final = 64  # the server's default max_connections_per_source
LIST_JOBS: Final = "/trio_jobs.v1.JobService/ListJobs"
STREAM_OUTPUT: Final = "/trio_jobs.v1.JobService/StreamOutput"
PERMISSION_DENIED: Final = 7
# The flood must outlive the test: the handshake timeout (which also bounds the wait for
# the HTTP/2 preface) would otherwise drop it and free the slots by itself.
HOLD: Final = ("--handshake-timeout", "300s")


@pytest.fixture(autouse=True)
def enough_file_descriptors() -> Iterator[None]:
    """1,000 sockets here (and as many accepted by the server, which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * FLOOD
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def ctx_for(host: Host, identity: str) -> ssl.SSLContext:
    pki = host.home / "pki"
    return client_ssl_context(cert=pki / f"{identity}.crt", key=pki / f"{identity}.key", ca=pki / "ca.crt")


def port_of(host: Host) -> int:
    return int(host.address.rsplit(":", 1)[1])


def server_fds(host: Host) -> int:
    assert host.server is not None
    return len(os.listdir(f"/proc/{host.server.pid}/fd"))


async def tls_from(source: str, port: int, ctx: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    """TCP from ``source`` + a completed TLS handshake (BrokenResourceError if refused)."""
    tcp = await trio.open_tcp_stream(FLOODER, port, local_address=source)
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def bystander_lists_jobs(host: Host) -> float:
    """alice, from 127.0.0.2, lists her jobs through our rpc client; the seconds it took."""
    t0 = time.perf_counter()
    stream = await tls_from(BYSTANDER, port_of(host), ctx_for(host, "alice"))
    async with open_channel(stream) as channel:
        await channel.unary(LIST_JOBS, pb.ListJobsRequest(), pb.ListJobsResponse)
    return time.perf_counter() - t0


@contextlib.asynccontextmanager
async def closing_all(streams: list[trio.abc.Stream]) -> AsyncIterator[list[trio.abc.Stream]]:
    try:
        yield streams
    finally:
        for s in streams:
            await trio.aclose_forcefully(s)


async def test_a_thousand_silent_connections_do_not_lock_out_another_address(host: Host) -> None:
    host.start_server(*HOLD)
    port = port_of(host)
    fds_before = server_fds(host)
    with trio.fail_after(BOUND):
        async with closing_all([]) as flood:
            for _ in range(FLOOD):
                flood.append(await trio.open_tcp_stream(FLOODER, port, local_address=FLOODER))
            took = await bystander_lists_jobs(host)
            print(f"bystander answered in {took * 1000:.0f} ms during a flood of {FLOOD} silent connections")
            assert took < ANSWER_WITHIN
            # The server accepts in order, so it has seen the whole flood by now: it holds at
            # most its per-source share of it (closed the rest at accept, no TLS work).
            assert server_fds(host) <= fds_before + PER_SOURCE + 4
    assert "TLS handshakes in progress" in host.server_stderr()


async def test_a_thousand_idle_tls_connections_do_not_lock_out_another_address(host: Host) -> None:
    host.start_server(*HOLD)
    port = port_of(host)
    ctx = ctx_for(host, "alice")  # a real user of the policy: the connections are authenticated
    admitted = refused = 0
    with trio.fail_after(BOUND):
        async with closing_all([]) as held:
            for i in range(FLOOD):
                try:
                    stream = await tls_from(FLOODER, port, ctx)
                except trio.BrokenResourceError:
                    refused += 1
                    continue
                held.append(stream)
                admitted += 1
                if i % 2:  # half of them become HTTP/2 connections too, then idle
                    with contextlib.suppress(trio.BrokenResourceError):
                        await RawH2(stream).send_preface()
            took = await bystander_lists_jobs(host)
    print(f"{admitted} TLS connections admitted, {refused} refused; bystander answered in {took * 1000:.0f} ms")
    assert admitted <= PER_SOURCE
    assert refused >= FLOOD - PER_SOURCE
    assert took < ANSWER_WITHIN
    assert "max_connections_per_source" in host.server_stderr()


async def test_an_unknown_identity_is_refused_once_and_its_connection_closed(host: Host) -> None:
    host.start_server()
    issue_client(host.home / "pki", "mallory")  # signed by the server's own CA, not in the policy
    with trio.fail_after(BOUND):
        stream = await tls_from(FLOODER, port_of(host), ctx_for(host, "mallory"))
        async with RawH2(stream) as raw:
            await raw.send_preface()
            result = await raw.call(LIST_JOBS, [pb.ListJobsRequest().SerializeToString()])
            assert result.grpc_status == PERMISSION_DENIED
            assert "mallory" in dict(result.headers + result.trailers).get("grpc-message", "")
            t0 = time.perf_counter()
            rest = await raw.read_to_close(max_frames=100)  # returns once the server closed
            closed_after = time.perf_counter() - t0
    goaways = [r.frame for r in rest if isinstance(r.frame, GoAwayFrame)]
    assert [(g.error_code, g.last_stream_id) for g in goaways] == [(NO_ERROR, result.stream_id)]
    assert closed_after < 1.0, f"the connection stayed open {closed_after:.2f} s after the refusal"
    # The CLI sees the same refusal (exit 5, permission denied), in one line.
    cli = host.run("list", identity="mallory", check=False)
    assert cli.returncode == 5, cli
    assert b"mallory" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1


async def test_an_idle_connection_is_closed_at_the_idle_timeout(host: Host) -> None:
    idle = 1.0
    host.start_server("--idle-timeout", f"{idle}s")
    with trio.fail_after(BOUND):
        t0 = time.perf_counter()  # before the connection exists: closed_after >= idle
        stream = await tls_from(FLOODER, port_of(host), ctx_for(host, "alice"))
        async with RawH2(stream) as raw:
            await raw.send_preface()
            frames = []
            for _ in range(100):  # answer like a real client until the server closes
                got = await raw.next_frame()
                if got is None:
                    break
                frames.append(got.frame)
                if isinstance(got.frame, SettingsFrame) and "ACK" not in got.frame.flags:
                    await raw.send(SettingsFrame(0, flags=["ACK"]))
                elif isinstance(got.frame, PingFrame) and "ACK" not in got.frame.flags:
                    await raw.send(PingFrame(0, got.frame.opaque_data, flags=["ACK"]))
            closed_after = time.perf_counter() - t0
    goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert [(g.error_code, g.last_stream_id) for g in goaways] == [(NO_ERROR, 2**31 - 1), (NO_ERROR, 0)]
    assert idle <= closed_after < idle + 5.0
    # A `tail` that outlives the idle timeout is not idle: its one stream gets the whole
    # output on one connection, with no GOAWAY. (The CLI's `tail` would not show it: it
    # resumes on a new connection when the server closes one.)
    job = host.start("sh", "-c", "echo first; sleep 3; echo second", identity="alice")
    follow = pb.StreamOutputRequest(job_id=job, follow=True).SerializeToString()
    seen: list[Received] = []
    with trio.fail_after(BOUND):
        stream = await tls_from(FLOODER, port_of(host), ctx_for(host, "alice"))
        async with RawH2(stream) as raw:
            await raw.send_preface()
            t0 = time.perf_counter()
            result = await raw.call(STREAM_OUTPUT, [follow], seen=seen)
            followed = time.perf_counter() - t0
    output = b"".join(pb.OutputChunk.FromString(m).data for m in result.messages)
    assert (output, result.grpc_status) == (b"first\nsecond\n", 0), result
    assert followed > 2 * idle, f"the stream lasted only {followed:.2f} s: nothing was proven"
    assert [r.frame for r in seen if isinstance(r.frame, GoAwayFrame)] == []
