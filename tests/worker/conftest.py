"""Fixtures for the worker tests: a Worker on a fresh data dir (no cgroups: NoCgroupDriver)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from trio_jobs.worker import JobSpec, open_worker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from trio_jobs.worker import Worker


def sh(script: str, **kwargs: object) -> JobSpec:
    """A JobSpec running ``/bin/sh -c script`` (the shell is just a program here)."""
    return JobSpec(command="/bin/sh", args=("-c", script), owner="tester", **kwargs)  # type: ignore[arg-type]


async def read_all(worker: Worker, job_id: str, offset: int = 0, *, wait: bool = True) -> bytes:
    out = bytearray()
    reader = worker.follow(job_id, offset, wait=wait)
    try:
        async for chunk in reader:
            assert chunk.offset == offset + len(out)
            out += chunk.data
    finally:
        await reader.aclose()
    return bytes(out)


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[Worker]:
    async with open_worker(tmp_path / "data") as w:
        yield w
