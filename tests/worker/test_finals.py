"""A full disk never loses the final record of a job that ended (worker/finals.py).

When the database refuses a final record, it goes to slots reserved (written full of zeros)
when the worker opened; the next open replays them before marking anything LOST. The last
test fills a real tmpfs to the last byte and kills the worker process with SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import trio
from e2e.conftest import read_line

from trio_jobs.worker import JobState, open_worker
from trio_jobs.worker import finals as finals_module
from trio_jobs.worker.finals import SLOT_SIZE, SLOTS, FinalJournal, decode, encode
from trio_jobs.worker.retention import KEEP_EVERYTHING
from trio_jobs.worker.store import JobStore
from trio_jobs.worker.worker import DB_NAME

from .conftest import read_all, sh
from .test_retention import ended_record

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from trio_jobs.worker import Worker


def refuse_writes(worker_or_store: Worker | JobStore, on: bool = True) -> None:
    """Make the database refuse every write, as a full disk does (SQLITE_READONLY here)."""
    store = worker_or_store if isinstance(worker_or_store, JobStore) else worker_or_store._store
    with store._lock:
        store._conn.execute(f"PRAGMA query_only = {'ON' if on else 'OFF'}")


def test_a_slot_round_trips_and_a_torn_one_is_skipped() -> None:
    status = ended_record(datetime.now(UTC), output_bytes=(1 << 62))
    slot = encode(status)
    assert slot is not None
    assert len(slot) == SLOT_SIZE
    job_id, row = decode(slot) or ("", ())
    assert job_id == status.job_id
    assert row == finals_module.end_row(status)
    torn = bytearray(slot)
    torn[20] ^= 0xFF
    assert decode(bytes(torn)) is None
    assert decode(bytes(SLOT_SIZE)) is None


def test_the_journal_reserves_its_space_and_keeps_what_it_was_given(tmp_path: Path) -> None:
    path = tmp_path / finals_module.FILE_NAME
    journal, records = FinalJournal.open_blocking(path)
    assert records == []
    assert path.stat().st_size == SLOT_SIZE * SLOTS
    assert path.stat().st_blocks * 512 >= SLOT_SIZE * SLOTS  # really allocated, not sparse
    assert (path.stat().st_mode & 0o777) == 0o600
    statuses = [ended_record(datetime.now(UTC), output_bytes=i) for i in range(3)]
    assert all(journal.append_blocking(s) for s in statuses)
    journal.close()
    journal, records = FinalJournal.open_blocking(path)
    assert [job_id for job_id, _ in records] == [s.job_id for s in statuses]
    assert journal.used == 3
    journal.clear_blocking()
    journal.close()
    journal, records = FinalJournal.open_blocking(path)
    assert (records, journal.used) == ([], 0)
    for _ in range(SLOTS):
        assert journal.append_blocking(statuses[0])
    assert not journal.append_blocking(statuses[0])  # full: the caller keeps it in memory
    journal.close()


def test_a_symlink_in_place_of_the_journal_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x")
    (tmp_path / finals_module.FILE_NAME).symlink_to(target)
    with pytest.raises(Exception, match="final-records"):
        FinalJournal.open_blocking(tmp_path / finals_module.FILE_NAME)
    assert target.read_bytes() == b"x"


async def test_a_refused_final_record_is_replayed_at_the_next_open(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with open_worker(data, retention=KEEP_EVERYTHING) as worker:
        job = await worker.start(sh("exec sleep 600"))
        refuse_writes(worker)
        await worker.stop(job.job_id, grace=0)
        assert (await worker.status(job.job_id)).state is JobState.KILLED  # from memory
        assert job.job_id in worker._unsaved
        assert worker._store.finals_pending == 1
        # the worker closes with the database still refusing: the record is not in it
    async with open_worker(data, retention=KEEP_EVERYTHING) as worker:
        status = await worker.status(job.job_id)
        assert (status.state, status.stopped_by_user) == (JobState.KILLED, True)  # not LOST
        assert worker._store.finals_pending == 0  # replayed and cleared


async def test_once_writes_work_again_a_retention_pass_stores_and_clears(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with open_worker(data, retention=KEEP_EVERYTHING) as worker:
        started = await worker.start(sh("exec sleep 600"))
        refuse_writes(worker)
        with trio.fail_after(10):
            await worker.stop(started.job_id, grace=0)
        assert worker._store.finals_pending == 1
        refuse_writes(worker, on=False)
        await worker.retention.enforce()  # the pass retries what the disk refused
        assert worker._unsaved == {}
        assert worker._store.finals_pending == 0
        assert (await worker.status(started.job_id)).state is JobState.KILLED


async def test_the_store_replays_only_onto_running_rows(tmp_path: Path) -> None:
    """A record stored later (or replayed twice) is not overwritten by an older journal copy."""
    store = await JobStore.open(tmp_path / DB_NAME)
    running = ended_record(datetime.now(UTC), state=JobState.RUNNING)
    store.insert_many_blocking([running])
    final = ended_record(datetime.now(UTC), output_bytes=5)
    final = type(final)(**{**final.__dict__, "job_id": running.job_id})
    refuse_writes(store)
    assert store.finalize_blocking(final) is False
    refuse_writes(store, on=False)
    newer = type(final)(**{**final.__dict__, "output_bytes": 9, "ended_at": final.ended_at + timedelta(seconds=1)})  # type: ignore[operator]
    store.update_blocking(newer)  # what a retry would write
    await store.aclose()
    store = await JobStore.open(tmp_path / DB_NAME)
    assert await store.get(running.job_id) == newer
    await store.aclose()


# -- a real full disk and a real crash ----------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs on a directory of this test (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "data"
    mnt.mkdir(mode=0o700)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
                            capture_output=True, timeout=30, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30, check=False)


CHILD = textwrap.dedent("""
    import sys, trio
    from trio_jobs.worker import JobSpec, open_worker

    async def main(data):
        async with open_worker(data) as worker:
            job = await worker.start(JobSpec(command="/bin/sh", args=("-c", "exec sleep 600"), owner="t"))
            print(job.job_id, flush=True)
            await trio.to_thread.run_sync(sys.stdin.readline)  # the disk is full now
            result = await worker.stop(job.job_id, grace=0)
            print(result.status.state.value, job.job_id in worker._unsaved,
                  worker._store.finals_pending, flush=True)
            await trio.sleep_forever()  # killed here with SIGKILL

    trio.run(main, sys.argv[1])
""")


def _fill(directory: Path) -> Path:
    """Write a file until the file system has not one byte left."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as f:
        block = b"\0" * 65536
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0")
    return filler


@pytest.mark.root
def test_full_disk_then_sigkill_keeps_the_final_record(tiny_tmpfs: Path, tmp_path: Path) -> None:
    err = tmp_path / "child.err"
    with err.open("wb") as stderr, subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_tmpfs)],
                                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                    stderr=stderr) as child:
        try:
            assert child.stdout is not None
            assert child.stdin is not None
            job_id = read_line(child.stdout, 60).decode().strip()  # bounded: never hangs
            assert len(job_id) == 36, err.read_text()
            filler = _fill(tiny_tmpfs)
            assert os.statvfs(tiny_tmpfs).f_bavail == 0
            child.stdin.write(b"go\n")
            child.stdin.flush()
            line = read_line(child.stdout, 60).decode().split()
            # the database really refused it (else this test would prove nothing), and the
            # record went to the reserved slots
            assert line == ["KILLED", "True", "1"], (line, err.read_text())
            assert "cannot store the final status" in err.read_text()
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
    filler.unlink()

    async def reopen() -> None:
        async with open_worker(tiny_tmpfs, retention=KEEP_EVERYTHING) as worker:
            status = await worker.status(job_id)
            assert (status.state, status.stopped_by_user) == (JobState.KILLED, True)  # not LOST
            assert await read_all(worker, job_id) == b""

    trio.run(reopen)
