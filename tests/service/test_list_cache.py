"""ListJobs answers from the cache of ended jobs' parts: the same answer as a list built from
every record, for running jobs (never cached), jobs that end meanwhile, LOST jobs after a
restart, and a cache too small for the history. A real worker (no cgroups) and real
processes; the handlers are called directly (tests/service/test_service.py covers the wire).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.rpc import RpcError, StatusCode
from trio_jobs.rpc._service import ServerContext
from trio_jobs.security.policy import Policy
from trio_jobs.service import LIST_CACHE_ENTRY_OVERHEAD, JobService, list_part, status_to_proto
from trio_jobs.v1 import jobs_pb2 as pb
from trio_jobs.worker import JobState, open_worker
from trio_jobs.worker.store import JobStore, utcnow
from trio_jobs.worker.worker import DB_NAME, OUTPUT_DIR

if TYPE_CHECKING:
    from pathlib import Path

    from trio_jobs.worker import JobStatus, Worker

POLICY = """
[defaults]
run_as = ""
max_running_jobs = 50
programs = ["*"]
[identities.admin]
admin = true
[identities.alice]
[identities.bob]
"""


def ctx(identity: str) -> ServerContext:
    return ServerContext(method="/trio_jobs.v1.JobService/ListJobs", peer_identity=identity,
                         peer_certificate=None, invocation_metadata=(), deadline=None)


async def start(service: JobService, identity: str, *argv: str) -> str:
    request = pb.StartJobRequest(command=argv[0], args=argv[1:])
    method = "/trio_jobs.v1.JobService/StartJob"
    context = ServerContext(method=method, peer_identity=identity, peer_certificate=None,
                            invocation_metadata=(), deadline=None)
    return (await service.StartJob(request, context)).job_id


async def listed(service: JobService, identity: str, *, all_users: bool = False) -> pb.ListJobsResponse:
    answer = await service.ListJobs(pb.ListJobsRequest(all_users=all_users), ctx(identity))
    return pb.ListJobsResponse.FromString(answer.encoded())


async def reference(worker: Worker, owner: str | None) -> pb.ListJobsResponse:
    """The answer as ListJobs built it before the cache: every record, sorted, converted."""
    jobs = sorted(await worker.list(owner=owner), key=lambda j: (j.created_at, j.job_id))
    return pb.ListJobsResponse(jobs=[status_to_proto(j) for j in jobs])


async def wait_ended(worker: Worker, job_id: str) -> JobStatus:
    reader = worker.follow(job_id)  # ends once the job has ended
    try:
        async for _chunk in reader:
            pass
    finally:
        await reader.aclose()
    return await worker.status(job_id)


async def test_list_matches_the_uncached_answer_as_jobs_run_and_end(tmp_path: Path) -> None:
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        done = [await start(service, who, "/bin/echo", who) for who in ("alice", "bob", "alice")]
        sleeper = await start(service, "alice", "sleep", "1000")
        for job_id in done:
            await wait_ended(worker, job_id)
        for _ in range(2):  # the second round is answered from the cache
            assert await listed(service, "alice") == await reference(worker, "alice")
            assert await listed(service, "bob") == await reference(worker, "bob")
            assert await listed(service, "admin", all_users=True) == await reference(worker, None)
        assert len(service.list_parts) == 3  # the ended jobs; the running one is read live
        assert service.list_parts.get(sleeper) is None
        running = (await listed(service, "alice")).jobs[-1]
        assert (running.job_id, running.state) == (sleeper, pb.JOB_STATE_RUNNING)

        # the job ends while the others are cached: the next list shows its final status
        await worker.stop(sleeper, grace=0)
        after = await listed(service, "alice")
        assert after == await reference(worker, "alice")
        assert after.jobs[-1].state == pb.JOB_STATE_KILLED
        assert after.jobs[-1].stopped_by_user
        assert service.list_parts.get(sleeper) is not None
        assert await listed(service, "alice") == after

        with pytest.raises(RpcError) as info:
            await listed(service, "bob", all_users=True)
        assert info.value.code is StatusCode.PERMISSION_DENIED


async def test_lost_jobs_after_a_restart_are_listed_and_cached_as_lost(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with open_worker(data) as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        ended = await start(service, "alice", "/bin/true")
        await wait_ended(worker, ended)
    # a record left RUNNING, as by a server that died while its job ran
    store = await JobStore.open(data / DB_NAME)
    crashed = (await store.list())[0]
    lost_id = "0b7f3f0e-6f55-4a43-9a4f-6a0d2b7c1e11"
    fields = {**crashed.__dict__, "job_id": lost_id, "state": JobState.RUNNING, "exit_code": None,
              "ended_at": None, "created_at": utcnow()}
    await store.insert(type(crashed)(**fields))
    await store.aclose()
    (data / OUTPUT_DIR / f"{lost_id}.out").write_bytes(b"partial")

    async with open_worker(data) as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        first = await listed(service, "alice")
        assert [(j.job_id, j.state) for j in first.jobs] == [
            (ended, pb.JOB_STATE_EXITED), (lost_id, pb.JOB_STATE_LOST)]
        assert first.jobs[1].output_bytes == len(b"partial")
        assert len(service.list_parts) == 2
        assert await listed(service, "alice") == first == await reference(worker, "alice")


async def test_a_full_cache_keeps_its_entries_and_the_answer_stays_complete(tmp_path: Path) -> None:
    async with open_worker(tmp_path / "data") as worker:
        probe = JobService(worker, Policy.from_toml(POLICY))
        job_ids = [await start(probe, "bob", "/bin/true") for _ in range(12)]
        statuses = [await wait_ended(worker, job_id) for job_id in job_ids]
        cost = max(len(list_part(s)) for s in statuses) + LIST_CACHE_ENTRY_OVERHEAD
        service = JobService(worker, Policy.from_toml(POLICY), list_cache_budget=5 * cost)
        expected = await reference(worker, "bob")
        assert await listed(service, "bob") == expected
        kept = {job_id for job_id in job_ids if service.list_parts.get(job_id) is not None}
        assert len(kept) == 5
        assert service.list_parts.used <= 5 * cost
        for _ in range(2):  # full: the same entries stay, the others are read every time
            assert await listed(service, "bob") == expected
            assert {j for j in job_ids if service.list_parts.get(j) is not None} == kept

        nothing = JobService(worker, Policy.from_toml(POLICY), list_cache_budget=0)
        assert await listed(nothing, "bob") == expected
        assert len(nothing.list_parts) == 0


async def test_many_misses_are_converted_off_the_loop_with_the_same_answer(tmp_path: Path) -> None:
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        job_ids = [await start(service, "alice", "/bin/true") for _ in range(70)]
        for job_id in job_ids:
            await wait_ended(worker, job_id)
        fresh = JobService(worker, Policy.from_toml(POLICY))  # all 70 miss (> 64: a thread)
        with trio.fail_after(60):
            answer = await listed(fresh, "alice")
        assert answer == await reference(worker, "alice")
        assert [j.job_id for j in answer.jobs] == job_ids


async def test_jobs_not_cached_are_converted_a_batch_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What one ListJobs holds at once is bounded: statuses of jobs whose part is not cached
    are read ``LIST_CONVERT_BATCH`` at a time (and the answer is the same)."""
    monkeypatch.setattr("trio_jobs.service.paging.LIST_CONVERT_BATCH", 2)
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.from_toml(POLICY), list_cache_budget=0)
        for job_id in [await start(service, "alice", "/bin/true") for _ in range(5)]:
            await wait_ended(worker, job_id)
        asked: list[int] = []
        real = worker.statuses

        async def counting(job_ids: list[str]) -> dict[str, JobStatus]:
            asked.append(len(job_ids))
            return await real(job_ids)

        monkeypatch.setattr(worker, "statuses", counting)
        assert await listed(service, "alice") == await reference(worker, "alice")
        assert asked == [2, 2, 1]


async def test_pages_are_built_a_few_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most ``list_concurrency`` ListJobs build their pages at once server-wide, and one per
    identity (what they hold meanwhile is bounded however many clients list, and one user's
    burst takes one slot); the others wait their turn, get the same answer, and a waiting
    call is still cancellable."""
    users = ("alice", "bob", "admin")
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.from_toml(POLICY), list_concurrency=2)
        for job_id in [await start(service, who, "/bin/true") for who in users for _ in range(2)]:
            await wait_ended(worker, job_id)
        expected = {who: await reference(worker, who) for who in users}
        building: list[str | None] = []
        peak = 0
        release = trio.Event()
        real = worker.job_page

        async def slow_page(*, owner: str | None, after: int, limit: int) -> list[tuple[int, str]]:
            nonlocal peak
            building.append(owner)
            peak = max(peak, len(building))
            try:
                await release.wait()
                return await real(owner=owner, after=after, limit=limit)
            finally:
                building.remove(owner)

        monkeypatch.setattr(worker, "job_page", slow_page)
        answers: list[tuple[str, pb.ListJobsResponse]] = []

        async def one(who: str) -> None:
            answers.append((who, await listed(service, who)))

        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one, "alice")  # alice's burst first: she gets one slot
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(one, "bob")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(one, "admin")
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(map(str, building)) == ["alice", "bob"]  # admin waits for a free slot
            with trio.move_on_after(0.01) as waiting:
                await listed(service, "bob")
            assert waiting.cancelled_caught
            release.set()
        assert peak == 2
        assert sorted(who for who, _ in answers) == ["admin", "alice", "alice", "alice", "alice", "bob"]
        assert all(answer == expected[who] for who, answer in answers)


def test_list_concurrency_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="list_concurrency must be at least 1"):
        JobService(None, Policy.from_toml(POLICY), list_concurrency=0)  # type: ignore[arg-type]
