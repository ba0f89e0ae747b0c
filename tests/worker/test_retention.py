"""Retention (DESIGN §7, worker/retention.py): ended jobs beyond a count, a total output size
or an age are deleted oldest first -- record and output file; running jobs never; a deleted
job is JobNotFound everywhere. And a restart reads only the RUNNING records.

No cgroups (NoCgroupDriver); real processes, a real SQLite store. Clocks: ``max_age`` is
measured against an injected clock, so "31 days later" is one assignment.
"""

from __future__ import annotations

import contextlib
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.worker import JobNotFound, JobState, JobStatus, Limits, Usage, open_worker
from trio_jobs.worker import store as store_module
from trio_jobs.worker.retention import BATCH, KEEP_EVERYTHING, Retention
from trio_jobs.worker.store import JobStore, utcnow
from trio_jobs.worker.worker import DB_NAME, OUTPUT_DIR

from .conftest import read_all, sh

if TYPE_CHECKING:
    from pathlib import Path

    from trio_jobs.worker import Worker

ONLY_BY = {"max_jobs": None, "max_output_bytes": None, "max_age": None, "min_interval": 0.0}


def limits(**kw: object) -> Retention:
    return Retention(**{**ONLY_BY, **kw})  # type: ignore[arg-type]


async def ended_job(worker: Worker, script: str = "echo hi") -> str:
    status = await worker.start(sh(script))
    await read_all(worker, status.job_id)  # ends once the job has ended and its record is final
    return status.job_id


async def wait_deleted(worker: Worker, count: int) -> None:
    """Until the background task has deleted ``count`` jobs (event driven, bounded)."""
    with trio.fail_after(10):
        while worker.retention.deleted < count:
            await worker.retention.next_pass()


def output_file(data: Path, job_id: str) -> Path:
    return data / OUTPUT_DIR / f"{job_id}.out"


async def assert_deleted(worker: Worker, data: Path, job_id: str) -> None:
    with pytest.raises(JobNotFound):
        await worker.status(job_id)
    with pytest.raises(JobNotFound):
        worker.follow(job_id)
    with pytest.raises(JobNotFound):
        await worker.stop(job_id)
    assert job_id not in await worker.statuses([job_id])
    assert job_id not in [i for _, i in await worker.job_page(limit=1000)]
    assert not output_file(data, job_id).exists()


async def test_by_count_oldest_first_in_the_background(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with open_worker(data, retention=limits(max_jobs=3)) as worker:
        forgotten: list[str] = []
        worker.add_deletion_listener(forgotten.extend)
        ids = [await ended_job(worker, f"echo {i}") for i in range(6)]
        await wait_deleted(worker, 3)  # triggered by the jobs' ends, no call of ours
        for job_id in ids[:3]:
            await assert_deleted(worker, data, job_id)
        assert sorted(forgotten) == sorted(ids[:3])
        for i, job_id in enumerate(ids[3:], 3):
            assert (await worker.status(job_id)).state is JobState.EXITED
            assert await read_all(worker, job_id) == f"{i}\n".encode()
        assert [i for _, i in await worker.job_page(limit=100)] == ids[3:]
        assert await worker.retention.enforce() == 0  # within the limit now: nothing more


async def test_by_output_bytes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with open_worker(data, retention=limits(max_output_bytes=2500)) as worker:
        ids = [await ended_job(worker, "head -c 1000 /dev/zero") for _ in range(5)]
        await wait_deleted(worker, 3)
        for job_id in ids[:3]:
            await assert_deleted(worker, data, job_id)
        for job_id in ids[3:]:  # 2000 bytes: within 2500
            assert len(await read_all(worker, job_id)) == 1000
        assert worker.retention.deleted == 3


async def test_by_age_with_an_injected_clock_and_running_jobs_untouched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    now = [utcnow()]
    retention = limits(max_age=30 * 86400.0)
    async with open_worker(data, retention=retention, clock=lambda: now[0]) as worker:
        deleted = worker.retention.deleted  # counted from before each move of the clock: a
        # background pass (after a job's end) may do the deleting instead of enforce()

        async def at(moved: timedelta | None = None) -> int:
            before = worker.retention.deleted
            now[0] = utcnow() if moved is None else now[0] + moved
            await worker.retention.enforce()  # afterwards, all beyond the limit at now[0] are gone
            return worker.retention.deleted - before

        old = [await ended_job(worker) for _ in range(2)]
        sleeper = (await worker.start(sh("exec sleep 600"))).job_id
        assert await at(timedelta(days=29)) == 0
        assert await at(timedelta(days=2)) == 2  # 31 days after they ended
        for job_id in old:
            await assert_deleted(worker, data, job_id)
        # started "31 days ago" and still running: kept, whatever its age
        assert (await worker.status(sleeper)).state is JobState.RUNNING
        assert output_file(data, sleeper).exists()
        assert (await worker.stop(sleeper, grace=0)).status.state is JobState.KILLED
        assert await at() == 0  # it ended just now (end times come from the real clock): young
        assert await at(timedelta(days=31)) == 1
        await assert_deleted(worker, data, sleeper)
        assert worker.retention.deleted - deleted == 3


async def test_running_jobs_are_never_deleted_by_count_or_bytes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with open_worker(data, retention=limits(max_jobs=1, max_output_bytes=1)) as worker:
        running = [(await worker.start(sh("head -c 5000 /dev/zero; exec sleep 600"))).job_id for _ in range(3)]
        for job_id in running:  # 5000 bytes of output each
            reader = worker.follow(job_id)
            with trio.fail_after(10):
                async for chunk in reader:
                    if chunk.offset + len(chunk.data) >= 5000:
                        break
            await reader.aclose()
        ended = [await ended_job(worker) for _ in range(3)]
        await worker.retention.enforce()
        for job_id in ended:  # one ended job of 3 bytes is still over max_output_bytes=1
            await assert_deleted(worker, data, job_id)
        for job_id in running:
            status = await worker.status(job_id)
            assert (status.state, status.output_bytes) == (JobState.RUNNING, 5000)
            assert output_file(data, job_id).exists()
        assert worker.running_count() == 3


async def test_a_follower_that_exists_reads_to_the_end_after_deletion(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with open_worker(data, retention=limits(max_jobs=1)) as worker:
        big = await ended_job(worker, "head -c 300000 /dev/urandom")
        expected = output_file(data, big).read_bytes()
        reader = worker.follow(big, max_chunk=4096)  # holds the file from here on
        first = await reader.__anext__()
        await ended_job(worker)
        await wait_deleted(worker, 1)
        await assert_deleted(worker, data, big)
        rest = b"".join([chunk.data async for chunk in reader])  # ends normally
        assert first.data + rest == expected


async def test_batches_and_totals_stay_exact(tmp_path: Path) -> None:
    """More than one batch to delete at once (a limit lowered on a long history), and the
    triggers' totals equal a recount after every kind of change."""
    data = tmp_path / "data"
    data.mkdir()
    store = await JobStore.open(data / DB_NAME)
    base = utcnow() - timedelta(days=1)
    history = [ended_record(base + timedelta(seconds=i), output_bytes=i) for i in range(BATCH * 2 + 10)]
    store.insert_many_blocking(history)
    await store.aclose()
    async with open_worker(data, retention=limits(max_jobs=5)) as worker:
        await wait_deleted(worker, len(history) - 5)  # the first pass, at start
        kept = [i for _, i in await worker.job_page(limit=1000)]
        assert kept == [s.job_id for s in history[-5:]]
        await ended_job(worker, "head -c 7 /dev/zero")
        await wait_deleted(worker, len(history) - 4)
    with contextlib.closing(sqlite3.connect(data / DB_NAME)) as db:
        totals = db.execute("SELECT jobs, bytes FROM ended_totals").fetchone()
        recount = db.execute("SELECT COUNT(*), SUM(output_bytes) FROM jobs WHERE state != 'RUNNING'").fetchone()
    assert totals == recount == (5, sum(s.output_bytes for s in history[-4:]) + 7)


def ended_record(ended_at: datetime, *, output_bytes: int = 0, state: JobState = JobState.EXITED,
                 owner: str = "tester") -> JobStatus:
    return JobStatus(
        job_id=str(uuid.uuid4()), owner=owner, command="/bin/echo", args=("x" * 100,), state=state,
        exit_code=0 if state is JobState.EXITED else None, signal=None, stopped_by_user=False,
        oom_killed=False, stopped_by_shutdown=False, created_at=ended_at - timedelta(seconds=1),
        ended_at=None if state is JobState.RUNNING else ended_at, limits=Limits(), usage=Usage(),
        output_bytes=output_bytes, output_truncated=False,
    )


async def test_restart_reads_only_the_running_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5,000 ended jobs of history and 2 left RUNNING by a dead server: opening converts
    exactly the 2 records (counted at the one place rows become statuses), keeps no status of
    the history in memory, and still answers for any old job from the store."""
    data = tmp_path / "data"
    data.mkdir()
    store = await JobStore.open(data / DB_NAME)
    base = datetime(2024, 1, 1, tzinfo=UTC)
    history = [ended_record(base + timedelta(seconds=i), output_bytes=3) for i in range(5000)]
    crashed = [ended_record(base, state=JobState.RUNNING) for _ in range(2)]
    store.insert_many_blocking([*history[:2500], crashed[0], *history[2500:], crashed[1]])
    await store.aclose()

    converted: list[str] = []
    real_from_row = store_module._from_row

    def counting(row: sqlite3.Row) -> JobStatus:
        converted.append(row["job_id"])
        return real_from_row(row)

    monkeypatch.setattr(store_module, "_from_row", counting)
    async with open_worker(data, retention=KEEP_EVERYTHING) as worker:
        assert sorted(converted) == sorted(s.job_id for s in crashed)
        assert worker._jobs == {}
        assert len(worker._ended) == 0
        assert worker._unsaved == {}
        for lost in crashed:
            assert (await worker.status(lost.job_id)).state is JobState.LOST
        old = await worker.status(history[1234].job_id)  # read from the store when asked
        assert old == history[1234]


def test_the_restart_query_uses_the_partial_index(tmp_path: Path) -> None:
    async def make() -> None:
        store = await JobStore.open(tmp_path / DB_NAME)
        await store.aclose()

    trio.run(make)
    with contextlib.closing(sqlite3.connect(tmp_path / DB_NAME)) as db:
        plan = db.execute("EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE state = 'RUNNING' ORDER BY seq").fetchall()
        oldest = db.execute("EXPLAIN QUERY PLAN SELECT seq, job_id, ended_at, output_bytes FROM jobs "
                            "WHERE state != 'RUNNING' ORDER BY ended_at, seq LIMIT 5").fetchall()
    assert "USING INDEX jobs_running" in plan[0][3], plan
    assert "USING INDEX jobs_ended" in oldest[0][3], oldest
    assert len(oldest) == 1, oldest  # no "USE TEMP B-TREE FOR ORDER BY" step


# The schema of the first releases, verbatim (store.py before schema version 1; the very
# first had no pid columns).
V0_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    command TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    signal INTEGER,
    stopped_by_user INTEGER NOT NULL,
    oom_killed INTEGER NOT NULL,
    stopped_by_shutdown INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    ended_at TEXT,
    limits TEXT NOT NULL,
    usage TEXT NOT NULL,
    output_bytes INTEGER NOT NULL,
    output_truncated INTEGER NOT NULL{pid}
);
CREATE INDEX IF NOT EXISTS jobs_seq_id ON jobs (seq, job_id);
CREATE INDEX IF NOT EXISTS jobs_owner_id ON jobs (owner, seq, job_id);
"""


@pytest.mark.parametrize("pid_columns", [True, False], ids=["with-pids", "first-release"])
async def test_an_old_schema_database_opens_and_upgrades(tmp_path: Path, pid_columns: bool) -> None:
    data = tmp_path / "data"
    data.mkdir()
    base = utcnow() - timedelta(hours=1)
    history = [ended_record(base + timedelta(seconds=i), output_bytes=10 * i) for i in range(6)]
    crashed = ended_record(base, state=JobState.RUNNING)
    with contextlib.closing(sqlite3.connect(data / DB_NAME)) as db:
        db.executescript(V0_SCHEMA.format(pid=",\n    pid INTEGER,\n    pid_start INTEGER" if pid_columns else ""))
        for status in [*history, crashed]:
            row = store_module._to_row(status)
            db.execute(f"INSERT INTO jobs ({', '.join(store_module.COLUMNS)}) VALUES ({', '.join('?' * len(row))})", row)
        db.commit()
    async with open_worker(data, retention=limits(max_jobs=4)) as worker:
        assert (await worker.status(crashed.job_id)).state is JobState.LOST
        await wait_deleted(worker, 3)  # 7 ended (LOST included), 4 kept: the 3 oldest ends go
        kept = {i for _, i in await worker.job_page(limit=100)}
        assert kept == {s.job_id for s in history[3:]} | {crashed.job_id}
        assert await worker.status(history[5].job_id) == history[5]
    with contextlib.closing(sqlite3.connect(data / DB_NAME)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (store_module.SCHEMA_VERSION,)
        assert db.execute("SELECT jobs, bytes FROM ended_totals").fetchone() == (4, 30 + 40 + 50 + 0)
    async with open_worker(data) as worker:  # and it opens again as it is
        assert len(await worker.job_page(limit=100)) == 4


@pytest.mark.parametrize("bad", [
    {"max_jobs": 0}, {"max_jobs": -1}, {"max_jobs": 1.5}, {"max_output_bytes": 0}, {"max_age": 0},
    {"max_age": -1.0}, {"max_age": float("nan")}, {"max_age": float("inf")}, {"check_interval": 0},
    {"min_interval": -1},
])
def test_bad_limits_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        Retention(**bad)  # type: ignore[arg-type]
