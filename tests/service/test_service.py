"""JobService + JobsClient in one process: a real server (rpc over loopback mTLS, a real
worker without cgroups) and the typed client. Error mapping, policy, ownership, lifecycle."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.client import JobLimits, JobsClient, JobsError
from trio_jobs.rpc import RpcError, StatusCode
from trio_jobs.security.pki import issue_client
from trio_jobs.security.policy import Policy
from trio_jobs.security.tls import client_ssl_context, server_ssl_context
from trio_jobs.server import NO_CGROUPS, ServerConfig, ServerInfo, serve
from trio_jobs.v1 import jobs_pb2 as pb

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

def server_ctx(pki: Path) -> ssl.SSLContext:
    return server_ssl_context(cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt")


def client_ctx(pki: Path, name: str) -> ssl.SSLContext:
    return client_ssl_context(cert=pki / f"{name}.crt", key=pki / f"{name}.key", ca=pki / "ca.crt")


POLICY = """
[defaults]
run_as = ""
max_running_jobs = 2
programs = ["*"]
[defaults.max_limits]
memory_bytes = 536870912
[identities.admin]
admin = true
max_running_jobs = 10
[identities.alice]
[identities.bob]
programs = ["echo", "/bin/true"]
"""


@pytest.fixture
def pki(dev_pki: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "pki"
    shutil.copytree(dev_pki, copy)
    issue_client(copy, "mallory")  # signed by the CA but not in the policy
    return copy


@pytest.fixture
async def server(pki: Path, tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[ServerInfo]:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        data_dir=tmp_path / "data",
        ssl_context=server_ctx(pki),
        policy=Policy.from_toml(POLICY),
        cgroups=NO_CGROUPS,
        handle_signals=False,
        shutdown_timeout=10.0,
    )
    info: ServerInfo = await nursery.start(serve, config)
    yield info
    info.handle.request_shutdown()


def client(info: ServerInfo, pki: Path, name: str) -> AbstractAsyncContextManager[JobsClient]:
    host, port = info.addresses[0]
    return JobsClient.connect(f"{host}:{port}", ssl_context=client_ctx(pki, name))


async def collect(jobs: JobsClient, job_id: str, **kw: object) -> tuple[bytes, object]:
    out = bytearray()

    async def sink(data: bytes) -> None:
        out.extend(data)

    final = await jobs.tail(job_id, sink, **kw)  # type: ignore[arg-type]
    return bytes(out), final


async def expect(code: StatusCode, call: object) -> str:
    with pytest.raises(JobsError) as info:
        await call  # type: ignore[misc]
    assert info.value.code == code, info.value.message
    return info.value.message


async def test_start_tail_status_list_stop(server: ServerInfo, pki: Path) -> None:
    async with client(server, pki, "alice") as jobs:
        job = await jobs.start("sh", ["-c", "echo out; echo err >&2; exit 5"], env={"X": "1"}, working_dir="/tmp")
        assert job.owner == "alice"
        assert job.command == "/usr/bin/sh"
        assert job.limits.memory_bytes == 536870912  # the 1000 MiB default, lowered to the cap
        assert job.limits.cpu_millis == 2000
        data, final = await collect(jobs, job.job_id)
        assert data == b"out\nerr\n"
        assert final.exit_status == 5  # type: ignore[attr-defined]
        assert (await jobs.status(job.job_id)).exit_code == 5
        data, _ = await collect(jobs, job.job_id, offset=4, follow=False)
        assert data == b"err\n"
        data, _ = await collect(jobs, job.job_id, offset=1000, follow=False)
        assert data == b""  # beyond the end: nothing
        sleeper = await jobs.start("sleep", ["600"], limits=JobLimits(cpu_millis=500))
        assert sleeper.state == "running"
        outcome = await jobs.stop(sleeper.job_id, grace=0)
        assert outcome.force_ended
        assert outcome.job.state == "killed"
        assert outcome.job.stopped_by_user
        again = await jobs.stop(sleeper.job_id)
        assert not again.force_ended
        assert [j.job_id for j in await jobs.list()] == [job.job_id, sleeper.job_id]


async def test_ownership_and_admin(server: ServerInfo, pki: Path) -> None:
    async with client(server, pki, "alice") as alice, client(server, pki, "bob") as bob, client(server, pki, "admin") as admin:
        job = await alice.start("echo", ["secret"])
        missing = "00000000-0000-4000-8000-000000000000"
        m1 = await expect(StatusCode.NOT_FOUND, bob.status(job.job_id))
        m2 = await expect(StatusCode.NOT_FOUND, bob.status(missing))
        assert m1.replace(job.job_id, "J") == m2.replace(missing, "J")
        await expect(StatusCode.NOT_FOUND, bob.stop(job.job_id))
        await expect(StatusCode.NOT_FOUND, collect(bob, job.job_id))
        assert await bob.list() == []
        await expect(StatusCode.PERMISSION_DENIED, bob.list(all_users=True))
        assert [j.job_id for j in await admin.list(all_users=True)] == [job.job_id]
        data, _ = await collect(admin, job.job_id)
        assert data == b"secret\n"


async def test_policy_and_validation_errors(server: ServerInfo, pki: Path) -> None:
    async with client(server, pki, "bob") as bob, client(server, pki, "alice") as alice:
        assert (await bob.start("echo", ["ok"])).state in ("running", "exited")
        msg = await expect(StatusCode.PERMISSION_DENIED, bob.start("sh", ["-c", "echo no"]))
        assert "may not run" in msg
        await expect(StatusCode.INVALID_ARGUMENT, alice.start("no-such-program-xyz"))
        await expect(StatusCode.INVALID_ARGUMENT, alice.start("/etc/passwd"))
        await expect(StatusCode.INVALID_ARGUMENT, alice.start(""))
        await expect(StatusCode.INVALID_ARGUMENT, alice.start("true", working_dir="relative"))
        await expect(StatusCode.INVALID_ARGUMENT, alice.start("true", env={"A=B": "x"}))
        msg = await expect(StatusCode.INVALID_ARGUMENT, alice.start("true", limits=JobLimits(memory_bytes=1 << 40)))
        assert "cap" in msg
        await expect(StatusCode.INVALID_ARGUMENT, alice.start("true", limits=JobLimits(pids_max=-1)))
        await expect(StatusCode.INVALID_ARGUMENT, alice.status("not-a-uuid"))
        with pytest.raises(ValueError, match="grace"):
            await alice.stop("00000000-0000-4000-8000-000000000000", grace=-1)


async def test_raw_requests_the_client_would_not_send(server: ServerInfo, pki: Path) -> None:
    from google.protobuf.duration_pb2 import Duration

    async with client(server, pki, "alice") as alice:
        job = await alice.start("sleep", ["600"])
        channel = alice._connected()
        for grace in (Duration(seconds=-1), Duration(seconds=0, nanos=-5), Duration(seconds=10**6)):
            with pytest.raises(RpcError, match="grace_period") as info:
                await channel.unary("/trio_jobs.v1.JobService/StopJob", pb.StopJobRequest(job_id=job.job_id, grace_period=grace), pb.StopJobResponse)
            assert info.value.code == StatusCode.INVALID_ARGUMENT

        async def read_negative_offset() -> None:
            request = pb.StreamOutputRequest(job_id=job.job_id, offset=-1)
            async with channel.server_stream("/trio_jobs.v1.JobService/StreamOutput", request, pb.OutputChunk) as stream:
                async for _ in stream:
                    pass

        with pytest.raises(RpcError, match="negative") as neg:
            await read_negative_offset()
        assert neg.value.code == StatusCode.INVALID_ARGUMENT
        await alice.stop(job.job_id, grace=0)


async def test_quota_and_unknown_identity(server: ServerInfo, pki: Path) -> None:
    async with client(server, pki, "alice") as alice:
        first = await alice.start("sleep", ["600"])
        second = await alice.start("sleep", ["600"])
        msg = await expect(StatusCode.RESOURCE_EXHAUSTED, alice.start("true"))
        assert "stop one" in msg
        await alice.stop(first.job_id, grace=0)
        third = await alice.start("sleep", ["600"])
        for j in (second, third):
            await alice.stop(j.job_id, grace=0)
    async with client(server, pki, "mallory") as mallory:
        msg = await expect(StatusCode.PERMISSION_DENIED, mallory.list())
        assert "mallory" in msg


async def test_health_and_shutdown(pki: Path, tmp_path: Path) -> None:
    from trio_jobs.rpc import health_pb2

    config = ServerConfig(
        port=0, data_dir=tmp_path / "data", ssl_context=server_ctx(pki), policy=Policy.from_toml(POLICY),
        cgroups=NO_CGROUPS, handle_signals=False,
    )
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            info: ServerInfo = await nursery.start(serve, config)
            async with client(info, pki, "alice") as alice:
                check = await alice._connected().unary(
                    "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(), health_pb2.HealthCheckResponse
                )
                assert check.status == health_pb2.HealthCheckResponse.SERVING
                job = await alice.start("sh", ["-c", "echo ready; exec sleep 600"])
                out = bytearray()
                ready = trio.Event()

                async def sink(data: bytes) -> None:
                    out.extend(data)
                    ready.set()

                async def follow() -> None:
                    final = await alice.tail(job.job_id, sink)
                    assert final.state == "killed"
                    assert final.stopped_by_shutdown
                    assert final.exit_status == 128 + 15

                async with trio.open_nursery() as inner:
                    inner.start_soon(follow)
                    await ready.wait()
                    info.handle.request_shutdown()
        # serve returned: the record says why the job ended
        async with trio.open_nursery() as nursery:
            info = await nursery.start(serve, config)
            async with client(info, pki, "alice") as alice:
                status = await alice.status(job.job_id)
                assert status.stopped_by_shutdown
            info.handle.request_shutdown()
