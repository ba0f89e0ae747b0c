"""The worker remembers the output size of recent ended jobs only; older ones come from disk.

Memory must not grow with the job history: ``EndedSizes`` keeps the last N sizes, and
``follow()`` of an older job reads its size from the job's spool file -- with exactly the
same output, also across a restart, and never for a name that could leave the output dir.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import pytest

from trio_jobs.worker import JobNotFound, open_worker
from trio_jobs.worker import worker as worker_module
from trio_jobs.worker.worker import EndedSizes

from .conftest import read_all, sh

if TYPE_CHECKING:
    from pathlib import Path


def test_ended_sizes_keeps_the_most_recent() -> None:
    sizes = EndedSizes(capacity=3)
    for i in range(5):
        sizes.add(f"job{i}", i * 10)
    assert len(sizes) == 3
    assert sizes.get("job0") is None
    assert sizes.get("job1") is None
    assert [sizes.get(f"job{i}") for i in (2, 3, 4)] == [20, 30, 40]
    sizes.add("job2", 21)  # re-adding refreshes: job3 is now the oldest
    sizes.add("job5", 50)
    assert sizes.get("job3") is None
    assert sizes.get("job2") == 21


async def test_jobs_beyond_the_cache_are_followed_from_their_spool_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker_module, "ENDED_SIZES_KEPT", 2)
    outputs = [f"job{i}:{'x' * i}\n".encode() for i in range(6)]
    async with open_worker(tmp_path / "data") as worker:
        ids = []
        for out in outputs:
            status = await worker.start(sh(f"printf '{out.decode().rstrip()}\\n'"))
            assert await read_all(worker, status.job_id) == out  # all of it: the job has ended
            await worker.stop(status.job_id)  # returns once the worker has recorded the end
            ids.append(status.job_id)
        assert len(worker._ended) == 2
        for job_id, out in zip(ids, outputs, strict=True):
            assert await read_all(worker, job_id) == out
            assert await read_all(worker, job_id, offset=3) == out[3:]
    async with open_worker(tmp_path / "data") as worker:  # after a restart: the same
        assert len(worker._ended) == 0  # a restart loads nothing of the history
        for job_id, out in zip(ids, outputs, strict=True):
            assert await read_all(worker, job_id, wait=False) == out


@pytest.mark.parametrize("job_id", [
    "nope", "", "../../etc/passwd", "/etc/passwd", str(uuid.uuid4()), str(uuid.uuid4()).upper(),
    "{" + str(uuid.uuid4()) + "}", str(uuid.uuid4())[:-1] + "/", 42, None,
])
async def test_follow_of_what_is_no_job_is_job_not_found(tmp_path: Path, job_id: object) -> None:
    async with open_worker(tmp_path / "data") as worker:
        (tmp_path / "data" / "output" / "x.out").write_bytes(b"not a job's")
        with pytest.raises(JobNotFound):
            worker.follow(job_id)  # type: ignore[arg-type]
