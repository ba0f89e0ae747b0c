"""Pre-created spool files (worker/launch.py): unnamed until a start links one to its name,
never overwriting a file, and nothing left on disk by the spares."""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

import pytest

from trio_jobs.worker import WorkerError, open_worker
from trio_jobs.worker.launch import SPARE_SPOOL_FILES, SpoolFiles

from .conftest import read_all, sh

if TYPE_CHECKING:
    from pathlib import Path


def test_a_spare_becomes_the_named_file(tmp_path: Path) -> None:
    spools = SpoolFiles(tmp_path)
    spools.refill()
    assert spools.spares == SPARE_SPOOL_FILES
    assert os.listdir(tmp_path) == []  # spares have no name
    fd = spools.take(tmp_path / "job.out")
    try:
        os.write(fd, b"hello")
        assert spools.spares == SPARE_SPOOL_FILES - 1
        assert spools.wanted
        st = os.stat(tmp_path / "job.out")
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (tmp_path / "job.out").read_bytes() == b"hello"
    finally:
        os.close(fd)
    spools.close()
    assert os.listdir(tmp_path) == ["job.out"]
    assert not spools.wanted
    spools.close()  # idempotent


@pytest.mark.parametrize("spares", [SPARE_SPOOL_FILES, 0])
def test_an_existing_name_is_never_overwritten(tmp_path: Path, spares: int) -> None:
    (tmp_path / "job.out").write_bytes(b"keep")
    spools = SpoolFiles(tmp_path, spares=spares)
    spools.refill()
    with pytest.raises(WorkerError, match="cannot create the output file"):
        spools.take(tmp_path / "job.out")
    assert (tmp_path / "job.out").read_bytes() == b"keep"
    fd = spools.take(tmp_path / "other.out")  # the pool still works (or creates directly)
    os.close(fd)
    spools.close()
    assert sorted(os.listdir(tmp_path)) == ["job.out", "other.out"]


def test_without_spares_a_start_creates_its_file(tmp_path: Path) -> None:
    spools = SpoolFiles(tmp_path, spares=0)
    spools.refill()
    assert spools.spares == 0
    fd = spools.take(tmp_path / "job.out")
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp_path / "job.out").st_mode) == 0o600


async def test_jobs_get_their_output_files_and_no_spare_remains(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with open_worker(data) as worker:
        ids = []
        for i in range(2 * SPARE_SPOOL_FILES + 1):  # more than one pool's worth
            job = await worker.start(sh(f"echo {i}"))
            ids.append(job.job_id)
            assert await read_all(worker, job.job_id) == f"{i}\n".encode()
    assert sorted(os.listdir(data / "output")) == sorted(f"{i}.out" for i in ids)
