"""Retention and the service: a deleted job is NOT_FOUND for every call, and leaves the
ListJobs cache (a full cache of deleted jobs would otherwise never take a new entry).
A real worker (no cgroups) and real processes; the handlers are called directly."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.rpc import RpcError, StatusCode
from trio_jobs.rpc._service import ServerContext
from trio_jobs.security.policy import Policy
from trio_jobs.service import LIST_CACHE_ENTRY_OVERHEAD, JobService, ListParts
from trio_jobs.v1 import jobs_pb2 as pb
from trio_jobs.worker import open_worker
from trio_jobs.worker.retention import Retention

from .test_list_cache import POLICY, listed, start, wait_ended

if TYPE_CHECKING:
    from pathlib import Path


def context(method: str) -> ServerContext:
    return ServerContext(method=f"/trio_jobs.v1.JobService/{method}", peer_identity="alice",
                         peer_certificate=None, invocation_metadata=(), deadline=None)


def test_discard_frees_the_budget() -> None:
    parts = ListParts(budget=3 * (100 + LIST_CACHE_ENTRY_OVERHEAD))
    for name in "abc":
        parts.add(name, b"x" * 100)
    parts.add("d", b"x" * 100)  # full
    assert parts.get("d") is None
    parts.discard(["a", "nope"])
    assert parts.used == 2 * (100 + LIST_CACHE_ENTRY_OVERHEAD)
    parts.add("d", b"x" * 100)
    assert parts.get("d") is not None
    assert parts.get("a") is None


async def test_deleted_jobs_are_not_found_and_leave_the_cache(tmp_path: Path) -> None:
    retention = Retention(max_jobs=2, max_output_bytes=None, max_age=None, min_interval=0.0)
    async with open_worker(tmp_path / "data", retention=retention) as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        first = await start(service, "alice", "/bin/echo", "one")
        await wait_ended(worker, first)
        assert [j.job_id for j in (await listed(service, "alice")).jobs] == [first]
        assert service.list_parts.get(first) is not None  # cached
        later = []
        for word in ("two", "three"):
            later.append(await start(service, "alice", "/bin/echo", word))
            await wait_ended(worker, later[-1])
        with trio.fail_after(10):
            while worker.retention.deleted < 1:
                await worker.retention.next_pass()
        assert service.list_parts.get(first) is None
        assert [j.job_id for j in (await listed(service, "alice")).jobs] == later

        for method, request in [
            ("GetJobStatus", pb.GetJobStatusRequest(job_id=first)),
            ("StopJob", pb.StopJobRequest(job_id=first)),
        ]:
            with pytest.raises(RpcError) as info:
                await getattr(service, method)(request, context(method))
            assert info.value.code == StatusCode.NOT_FOUND

        async def send(_chunk: object) -> None:
            raise AssertionError("a deleted job has no output to send")

        with pytest.raises(RpcError) as info:
            await service.StreamOutput(pb.StreamOutputRequest(job_id=first), context("StreamOutput"), send)
        assert info.value.code == StatusCode.NOT_FOUND
