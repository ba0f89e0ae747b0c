"""BlockingJobsClient against a real JobService (in-process server, loopback mTLS, real jobs).

The blocking client and the trio JobsClient run the same call plans (trio_jobs.calls), so
these tests check that the blocking one gives the same answers as the trio one for each
call, its errors, paging, and a call after the server closed the idle connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from trio_jobs.blocking import BlockingJobsClient
from trio_jobs.client import JobsError
from trio_jobs.rpc import ServerLimits, StatusCode
from trio_jobs.security.policy import Policy
from trio_jobs.server import NO_CGROUPS, ServerConfig, ServerInfo, serve

from .test_service import POLICY, client, client_ctx, server_ctx

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path



def _blocking(info: ServerInfo, pki: Path, name: str) -> BlockingJobsClient:
    host, port = info.addresses[0]
    return BlockingJobsClient.connect(f"{host}:{port}", ssl_context=client_ctx(pki, name))


async def _run(fn: Callable[[], Any]) -> Any:
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(fn)


async def test_calls_answer_as_the_trio_client_does(server: ServerInfo, pki: Path) -> None:
    def session() -> tuple[Any, ...]:
        with _blocking(server, pki, "alice") as jobs:
            started = jobs.start("/bin/sh", ["-c", "echo out; exit 4"], env={"A": "1"})
            listed = jobs.list()
            stopped = jobs.stop(started.job_id, grace=0.5)
            ended = jobs.status(started.job_id)
            with pytest.raises(JobsError) as missing:
                jobs.status("00000000-0000-4000-8000-000000000000")
            return started, listed, stopped, ended, missing.value

    started, listed, stopped, ended, missing = await _run(session)
    assert (started.command, started.owner) == ("/bin/sh", "alice")
    assert [j.job_id for j in listed] == [started.job_id]
    assert stopped.job.job_id == started.job_id
    assert missing.code == StatusCode.NOT_FOUND
    async with client(server, pki, "alice") as jobs:  # the trio client sees the same job
        with trio.fail_after(10):
            while (await jobs.status(started.job_id)).state == "running":
                await trio.sleep(0.02)
        def status() -> Any:
            with _blocking(server, pki, "alice") as again:
                return again.status(started.job_id)

        assert (await jobs.status(started.job_id)).proto == (await _run(status)).proto
    assert ended.job_id == started.job_id
    assert ended.state != "running"


async def test_list_reads_every_page(server: ServerInfo, pki: Path) -> None:
    def session() -> tuple[list[str], list[str]]:
        with _blocking(server, pki, "admin") as jobs:
            ids = [jobs.start("/bin/true").job_id for _ in range(5)]
            paged = jobs.list_proto(page_size=2)  # three calls
            return ids, [j.job_id for j in paged.jobs]

    ids, paged = await _run(session)
    assert paged == ids


async def test_refusals_keep_their_codes(server: ServerInfo, pki: Path) -> None:
    def session() -> tuple[JobsError, JobsError]:
        with _blocking(server, pki, "bob") as jobs, pytest.raises(JobsError) as denied:
            jobs.start("/bin/sh", ["-c", "id"])  # bob may run echo and /bin/true only
        with _blocking(server, pki, "mallory") as jobs, pytest.raises(JobsError) as unknown:
            jobs.list()
        return denied.value, unknown.value

    denied, unknown = await _run(session)
    assert denied.code == StatusCode.PERMISSION_DENIED
    assert unknown.code == StatusCode.PERMISSION_DENIED


async def test_call_after_the_server_closed_the_connection_goes_on_a_new_one(
    pki: Path, tmp_path: Path, nursery: trio.Nursery
) -> None:
    config = ServerConfig(
        host="127.0.0.1", port=0, data_dir=tmp_path / "data", ssl_context=server_ctx(pki),
        policy=Policy.from_toml(POLICY), cgroups=NO_CGROUPS, handle_signals=False, shutdown_timeout=10.0,
        rpc_limits=ServerLimits(idle_timeout=0.2),
    )
    info: ServerInfo = await nursery.start(serve, config)
    try:
        jobs = await _run(lambda: _blocking(info, pki, "alice"))
        try:
            first = await _run(lambda: jobs.start("/bin/true"))
            channel = jobs._channel
            assert channel is not None
            with trio.fail_after(10):  # idle: the server says GOAWAY and closes
                while await _run(lambda: channel.usable):
                    await trio.sleep(0.05)
            # Nothing of this call was sent on the closed connection: it goes on a new one.
            again = await _run(lambda: jobs.status(first.job_id))
            assert again.job_id == first.job_id
            assert jobs._channel is not channel
        finally:
            jobs.close()
    finally:
        info.handle.request_shutdown()
