"""GetJobStatus of an ended job is answered from memory (FinalStatuses), with the very bytes
the store's record converts to, and authorization exactly as before.

What is attacked: that no store query is made (``JobStore.get`` is counted: the one read
path of ``Worker.status`` for a job that left memory), that a restart (empty cache) answers
from the store, that the bound holds (least recently used out, evicted jobs read again),
and that a job retention deleted is NOT_FOUND -- also when the deletion happens while a
status is being read from the store, or while the job is ending. A real worker (no cgroups)
and real processes; the handlers are called directly (tests/service/test_service.py and the
interop tests cover the wire).
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from trio_jobs.rpc import RpcError, Serialized, StatusCode
from trio_jobs.rpc._service import ServerContext
from trio_jobs.security.policy import Policy
from trio_jobs.service import (
    LIST_CACHE_MAX_PART,
    STATUS_CACHE_ENTRY_OVERHEAD,
    FinalStatuses,
    JobService,
    final_entry,
    status_to_proto,
)
from trio_jobs.v1 import jobs_pb2 as pb
from trio_jobs.worker import open_worker
from trio_jobs.worker.retention import KEEP_EVERYTHING, Retention
from trio_jobs.worker.store import JobStore, utcnow

from .test_list_cache import POLICY, start, wait_ended

if TYPE_CHECKING:
    from pathlib import Path

    from trio_jobs.worker import JobStatus, Worker

NEVER_EXISTED = "5f0c2a7e-1d1b-4c3a-9a55-3b8f2f6d9e01"
TIMEOUT = 20


def ctx(identity: str) -> ServerContext:
    return ServerContext(method="/trio_jobs.v1.JobService/GetJobStatus", peer_identity=identity,
                         peer_certificate=None, invocation_metadata=(), deadline=None)


async def get_status(service: JobService, identity: str, job_id: str) -> pb.JobStatus:
    answer = await service.GetJobStatus(pb.GetJobStatusRequest(job_id=job_id), ctx(identity))
    if isinstance(answer, Serialized):
        return pb.JobStatus.FromString(answer.encoded())
    return answer


async def refusal(service: JobService, identity: str, job_id: str) -> tuple[StatusCode, str]:
    with pytest.raises(RpcError) as info:
        await service.GetJobStatus(pb.GetJobStatusRequest(job_id=job_id), ctx(identity))
    return info.value.code, info.value.message


async def ended_and_gone(worker: Worker, job_id: str) -> JobStatus:
    """Once the job has ended and its task is over (it left the worker's memory): the
    status the store holds."""
    status = await wait_ended(worker, job_id)
    await trio.testing.wait_all_tasks_blocked()
    return status


@pytest.fixture
def store_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``JobStore.get`` from here on, by job id."""
    reads: list[str] = []
    real = JobStore.get

    async def get(self: JobStore, job_id: str) -> JobStatus | None:
        reads.append(job_id)
        return await real(self, job_id)

    monkeypatch.setattr(JobStore, "get", get)
    return reads


# -- the cache alone ------------------------------------------------------------------------


def test_least_recently_used_goes_first_within_the_budget() -> None:
    cost = 100 + STATUS_CACHE_ENTRY_OVERHEAD
    cache = FinalStatuses(budget=3 * cost)
    for name in "abc":
        cache.add(name, ("alice", name.encode() * 100))
    assert cache.used == 3 * cost
    assert cache.get("a") == ("alice", b"a" * 100)  # a is now the most recent: b goes first
    cache.add("d", ("bob", b"d" * 100))
    assert ("b" in cache, "a" in cache, "c" in cache, "d" in cache) == (False, True, True, True)
    cache.add("e", ("bob", b"e" * 250))  # needs two entries' room: c and then a go
    assert sorted(name for name in "abcde" if name in cache) == ["d", "e"]
    assert cache.used == cost + 250 + STATUS_CACHE_ENTRY_OVERHEAD <= 3 * cost
    cache.add("f", ("bob", b"f" * (LIST_CACHE_MAX_PART + 1)))  # never kept, evicts nothing
    assert "f" not in cache
    assert len(cache) == 2
    cache.discard(["d", "nope"])
    assert cache.used == 250 + STATUS_CACHE_ENTRY_OVERHEAD
    assert cache.get("d") is None


def test_a_deletion_since_the_read_keeps_the_entry_out() -> None:
    cache = FinalStatuses()
    seen = cache.deletions
    cache.discard(["someone-else"])  # retention ran while the status was being read
    cache.add("a", ("alice", b"x"), deletions=seen)
    assert "a" not in cache
    cache.add("a", ("alice", b"x"), deletions=cache.deletions)
    assert "a" in cache


# -- the service ---------------------------------------------------------------------------


async def test_an_ended_jobs_status_comes_from_memory_and_equals_the_store(
    tmp_path: Path, store_reads: list[str]
) -> None:
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        job = await start(service, "alice", "/bin/echo", "hi")
        with trio.fail_after(TIMEOUT):
            await ended_and_gone(worker, job)
        assert job in service.final_statuses  # its end put it there
        store_reads.clear()
        answers = []
        for identity in ("alice", "alice", "admin"):
            answer = await service.GetJobStatus(pb.GetJobStatusRequest(job_id=job), ctx(identity))
            assert isinstance(answer, Serialized)
            answers.append(answer.encoded())
        assert store_reads == []
        # ...while the worker itself does read the store for it: what GetJobStatus answered before
        stored = await worker.status(job)
        assert store_reads == [job]
        expected = status_to_proto(stored)
        assert all(data == expected.SerializeToString() for data in answers)
        assert pb.JobStatus.FromString(answers[0]) == expected
        assert (expected.state, expected.exit_code, expected.output_bytes) == (pb.JOB_STATE_EXITED, 0, 3)


async def test_after_a_restart_the_store_answers_once_then_memory(tmp_path: Path, store_reads: list[str]) -> None:
    data = tmp_path / "data"
    async with open_worker(data) as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        job = await start(service, "alice", "/bin/sh", "-c", "echo out; exit 3")
        with trio.fail_after(TIMEOUT):
            before = status_to_proto(await ended_and_gone(worker, job))
    async with open_worker(data) as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        assert len(service.final_statuses) == 0
        store_reads.clear()
        first = await get_status(service, "alice", job)
        assert store_reads == [job]
        assert job in service.final_statuses
        assert await get_status(service, "alice", job) == first
        assert await get_status(service, "admin", job) == first
        assert store_reads == [job]
        assert first == before
        assert (first.state, first.exit_code) == (pb.JOB_STATE_EXITED, 3)
        # another spelling of the id is the same job (canonicalized, then the store)
        assert await get_status(service, "alice", job.upper()) == first


async def test_authorization_is_unchanged_cold_and_cached(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with open_worker(data) as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        job = await start(service, "alice", "/bin/true")
        with trio.fail_after(TIMEOUT):
            await ended_and_gone(worker, job)
    async with open_worker(data) as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        absent = await refusal(service, "bob", NEVER_EXISTED)
        assert absent[0] is StatusCode.NOT_FOUND
        hidden = (StatusCode.NOT_FOUND, absent[1].replace(NEVER_EXISTED, job))
        denied = await refusal(service, "mallory", job)
        assert denied[0] is StatusCode.PERMISSION_DENIED
        bad_id = await refusal(service, "bob", "not-a-uuid")
        assert bad_id[0] is StatusCode.INVALID_ARGUMENT
        assert await refusal(service, "bob", job) == hidden  # cold: from the store
        assert job not in service.final_statuses
        seen = await get_status(service, "alice", job)
        assert job in service.final_statuses
        # cached: the same answers, for another user exactly as for a job that never existed
        assert await refusal(service, "bob", job) == hidden
        assert await refusal(service, "bob", job.upper()) == hidden
        assert await refusal(service, "mallory", job) == denied
        assert await get_status(service, "admin", job) == seen
        assert await get_status(service, "alice", job) == seen


async def test_the_cache_is_bounded_and_evicted_jobs_come_from_the_store(
    tmp_path: Path, store_reads: list[str]
) -> None:
    async with open_worker(tmp_path / "data") as worker:
        probe = JobService(worker, Policy.from_toml(POLICY))
        first = await start(probe, "alice", "/bin/true")
        with trio.fail_after(TIMEOUT):
            cost = len(final_entry(await ended_and_gone(worker, first))[1]) + STATUS_CACHE_ENTRY_OVERHEAD
        budget = 2 * cost + cost // 2  # two entries fit, never three (sizes vary by a byte)
        service = JobService(worker, Policy.from_toml(POLICY), status_cache_budget=budget)
        jobs = []
        for _ in range(3):
            jobs.append(await start(service, "alice", "/bin/true"))
            with trio.fail_after(TIMEOUT):
                await ended_and_gone(worker, jobs[-1])
        a, b, c = jobs
        cache = service.final_statuses
        assert (a in cache, b in cache, c in cache) == (False, True, True)
        assert len(cache) == 2
        assert cache.used <= budget
        store_reads.clear()
        assert await get_status(service, "alice", a) == status_to_proto(await worker.status(a))
        assert store_reads == [a, a]  # GetJobStatus read it (evicted), then the reference
        assert (a in cache, b in cache, c in cache) == (True, False, True)  # b was least recent
        await get_status(service, "alice", c)  # cached: c is now the most recent
        await get_status(service, "alice", b)
        assert store_reads == [a, a, b]
        assert (a in cache, b in cache, c in cache) == (False, True, True)
        assert cache.used <= budget


async def test_a_running_job_is_read_live_and_never_kept(tmp_path: Path) -> None:
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        job = await start(service, "alice", "sleep", "1000")
        answer = await service.GetJobStatus(pb.GetJobStatusRequest(job_id=job), ctx("alice"))
        assert isinstance(answer, pb.JobStatus)
        assert answer.state == pb.JOB_STATE_RUNNING
        assert job not in service.final_statuses
        await worker.stop(job, grace=0)
        with trio.fail_after(TIMEOUT):
            await ended_and_gone(worker, job)
        final = await get_status(service, "alice", job)
        assert (final.state, final.stopped_by_user) == (pb.JOB_STATE_KILLED, True)
        assert final == status_to_proto(await worker.status(job))


async def test_a_deleted_job_leaves_the_cache_and_is_not_found(tmp_path: Path) -> None:
    retention = Retention(max_jobs=1, max_output_bytes=None, max_age=None, min_interval=0.0)
    async with open_worker(tmp_path / "data", retention=retention) as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        old = await start(service, "alice", "/bin/true")
        with trio.fail_after(TIMEOUT):
            await ended_and_gone(worker, old)
        assert (await get_status(service, "alice", old)).job_id == old
        assert old in service.final_statuses
        new = await start(service, "alice", "/bin/true")
        with trio.fail_after(TIMEOUT):
            await ended_and_gone(worker, new)
            await worker.retention.enforce()
        assert worker.retention.deleted == 1
        assert old not in service.final_statuses
        assert (await refusal(service, "alice", old))[0] is StatusCode.NOT_FOUND
        assert (await get_status(service, "alice", new)).job_id == new


async def test_a_deletion_while_the_store_is_read_keeps_the_job_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    async with open_worker(data, retention=KEEP_EVERYTHING) as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        old = await start(service, "alice", "/bin/true")
        with trio.fail_after(TIMEOUT):
            await ended_and_gone(worker, old)
    retention = Retention(max_jobs=1, max_output_bytes=None, max_age=None, min_interval=0.0)
    async with open_worker(data, retention=retention) as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        real = JobStore.get
        raced = False

        async def get(self: JobStore, job_id: str) -> JobStatus | None:
            """Read ``old``, then -- before the caller has it -- a second job ends and
            retention deletes ``old`` (one ended job is all it keeps)."""
            nonlocal raced
            record = await real(self, job_id)
            if job_id == old and not raced:
                raced = True
                new = await start(service, "alice", "/bin/true")
                await ended_and_gone(worker, new)
                await worker.retention.enforce()
                assert worker.retention.deleted == 1
            return record

        monkeypatch.setattr(JobStore, "get", get)
        with trio.fail_after(TIMEOUT):
            # answered as read (the call overlapped the deletion), but not kept
            assert (await get_status(service, "alice", old)).job_id == old
        assert raced
        assert old not in service.final_statuses
        assert (await refusal(service, "alice", old))[0] is StatusCode.NOT_FOUND


async def test_a_job_deleted_while_it_ends_is_never_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every ended job is past max_age at once (the clock is a day ahead).
    retention = Retention(max_jobs=None, max_output_bytes=None, max_age=60.0, min_interval=0.0)
    async with open_worker(tmp_path / "data", retention=retention,
                           clock=lambda: utcnow() + timedelta(days=1)) as worker:
        real = JobStore.finalize_blocking
        deleted_while_ending: list[int] = []

        def finalize_blocking(self: JobStore, status: JobStatus) -> bool:
            """The final record is stored; before the job's task learns so, retention
            (a pass on the loop) deletes it."""
            saved = real(self, status)
            trio.from_thread.run(worker.retention.enforce)
            deleted_while_ending.append(worker.retention.deleted)
            return saved

        monkeypatch.setattr(JobStore, "finalize_blocking", finalize_blocking)
        service = JobService(worker, Policy.from_toml(POLICY))
        job = await start(service, "alice", "/bin/true")
        reader = worker.follow(job)  # ends once the job has ended
        with trio.fail_after(TIMEOUT):
            async for _chunk in reader:
                pass
            await reader.aclose()
            await trio.testing.wait_all_tasks_blocked()
        assert deleted_while_ending == [1]
        assert job not in service.final_statuses
        assert (await refusal(service, "alice", job))[0] is StatusCode.NOT_FOUND
