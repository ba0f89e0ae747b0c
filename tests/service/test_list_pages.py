"""ListJobs in pages: a history of any length is listed, never refused for its size.

The handler is called directly on a real worker (no cgroups) for the paging rules; the last
test drives ``JobsClient.list`` over mTLS, which follows next_page_token to the end.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING

import pytest

from trio_jobs.client import JobsClient
from trio_jobs.rpc import RpcError, StatusCode
from trio_jobs.security.policy import Policy
from trio_jobs.server import NO_CGROUPS, ServerConfig, serve
from trio_jobs.service import JobService, paging
from trio_jobs.v1 import jobs_pb2 as pb
from trio_jobs.worker import open_worker

from .test_list_cache import POLICY, ctx, reference, start, wait_ended
from .test_service import client_ctx, server_ctx

if TYPE_CHECKING:
    from pathlib import Path

    import trio


async def page(service: JobService, who: str, size: int = 0, token: str = "", *, all_users: bool = False
               ) -> pb.ListJobsResponse:
    request = pb.ListJobsRequest(all_users=all_users, page_size=size, page_token=token)
    return pb.ListJobsResponse.FromString((await service.ListJobs(request, ctx(who))).encoded())


async def all_pages(service: JobService, who: str, size: int = 0, *, all_users: bool = False
                    ) -> list[pb.ListJobsResponse]:
    pages = [await page(service, who, size, all_users=all_users)]
    while pages[-1].next_page_token:
        pages.append(await page(service, who, size, pages[-1].next_page_token, all_users=all_users))
        assert len(pages) < 100
    return pages


async def test_pages_of_any_size_add_up_to_the_whole_list(tmp_path: Path) -> None:
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        ids = [await start(service, "alice", "/bin/echo", str(i)) for i in range(7)]
        await start(service, "bob", "/bin/true")
        for job_id in ids:
            await wait_ended(worker, job_id)
        whole = await reference(worker, "alice")
        assert len(whole.jobs) == 7
        assert await page(service, "alice") == whole  # unpaged: all of them, no token
        for size in range(1, 9):
            pages = await all_pages(service, "alice", size)
            assert [len(p.jobs) for p in pages] == [min(size, 7 - i) for i in range(0, 7, size)]
            assert [j for p in pages for j in p.jobs] == list(whole.jobs)
            assert not pages[-1].next_page_token
        everyone = await all_pages(service, "admin", 3, all_users=True)
        assert [j for p in everyone for j in p.jobs] == list((await reference(worker, None)).jobs)

        # a job started between two pages shows up on a later page, nothing is repeated
        first = await page(service, "alice", 4)
        late = await start(service, "alice", "/bin/true")
        rest = await all_pages_from(service, "alice", 4, first.next_page_token)
        assert [j.job_id for j in [*first.jobs, *rest]] == [*ids, late]


async def all_pages_from(service: JobService, who: str, size: int, token: str) -> list[pb.JobStatus]:
    jobs: list[pb.JobStatus] = []
    while token:
        answer = await page(service, who, size, token)
        jobs.extend(answer.jobs)
        token = answer.next_page_token
    return jobs


async def test_an_answer_never_exceeds_the_page_byte_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        ids = [await start(service, "alice", "/bin/echo", "x" * 100 * (i + 1)) for i in range(6)]
        for job_id in ids:
            await wait_ended(worker, job_id)
        whole = await reference(worker, "alice")
        biggest = max(len(pb.ListJobsResponse(jobs=[j]).SerializeToString()) for j in whole.jobs)
        limit = 2 * biggest
        monkeypatch.setattr(paging, "LIST_PAGE_BYTES", limit)
        pages = await all_pages(service, "alice")
        assert len(pages) > 2
        assert all(p.ByteSize() <= limit for p in pages)
        assert [j for p in pages for j in p.jobs] == list(whole.jobs)
        # one job bigger than the limit still comes, alone on its page
        monkeypatch.setattr(paging, "LIST_PAGE_BYTES", 10)
        pages = await all_pages(service, "alice")
        assert [len(p.jobs) for p in pages] == [1] * 6


@pytest.mark.parametrize("token", [
    "garbage", "p1:1:x",  # not base64 of our format / not base64 at all
    base64.urlsafe_b64encode(b"p0:1:abc").decode(),  # an unknown version
    base64.urlsafe_b64encode(b"p1:notanumber:abc").decode(),
    base64.urlsafe_b64encode(b"p1:1").decode(),
    base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    "\u00e9t\u00e9",
])
async def test_bad_page_arguments_are_invalid_argument(tmp_path: Path, token: str) -> None:
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        await start(service, "alice", "/bin/true")
        with pytest.raises(RpcError) as info:
            await page(service, "alice", 0, token)
        assert info.value.code is StatusCode.INVALID_ARGUMENT
        assert "page_token" in info.value.message
        with pytest.raises(RpcError) as info:
            await page(service, "alice", -1)
        assert info.value.code is StatusCode.INVALID_ARGUMENT


async def test_client_list_follows_the_pages(
    dev_pki: Path, tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, data_dir=tmp_path / "data", ssl_context=server_ctx(dev_pki),
                          policy=Policy.from_toml(POLICY), cgroups=NO_CGROUPS, handle_signals=False,
                          shutdown_timeout=10.0)
    info = await nursery.start(serve, config)
    host, port = info.addresses[0]
    monkeypatch.setattr(paging, "LIST_PAGE_BYTES", 1)  # one job per page
    async with JobsClient.connect(f"{host}:{port}", ssl_context=client_ctx(dev_pki, "alice")) as jobs:
        started = [(await jobs.start("/bin/echo", [str(i)])).job_id for i in range(5)]
        assert [j.job_id for j in await jobs.list()] == started
        assert [j.job_id for j in (await jobs.list_proto(page_size=2)).jobs] == started
    info.handle.request_shutdown()


async def test_a_page_reads_only_its_own_slice_of_the_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        ids = [await start(service, "alice", "/bin/true") for _ in range(20)]
        for job_id in ids:
            await wait_ended(worker, job_id)
        monkeypatch.setattr(paging, "LIST_SLICE", 3)
        read: list[int] = []
        real = worker.job_page

        async def counting(**kw: object) -> list[tuple[int, str]]:
            rows = await real(**kw)  # type: ignore[arg-type]
            read.append(len(rows))
            return rows

        monkeypatch.setattr(worker, "job_page", counting)
        first = await page(service, "alice", 2)
        assert [j.job_id for j in first.jobs] == ids[:2]
        assert sum(read) <= 3  # two jobs and the one that says there are more
        read.clear()
        assert [j.job_id for j in (await page(service, "alice", 0)).jobs] == ids  # slices of 3
        assert max(read) <= 4
        assert [j.job_id for j in (await page(service, "alice", 5, first.next_page_token)).jobs] == ids[2:7]
        beyond = base64.urlsafe_b64encode(f"{paging.PAGE_TOKEN_VERSION}:999999".encode()).decode()
        assert await page(service, "alice", 0, beyond) == pb.ListJobsResponse()
