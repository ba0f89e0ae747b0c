"""The pump on its own: a pipe we write into, copied into an OutputLog by pump_pipe."""

from __future__ import annotations

import fcntl
import os
import random
import threading
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.worker import pump
from trio_jobs.worker.output import OutputLog

if TYPE_CHECKING:
    from pathlib import Path

KiB = 1024
MiB = 1024 * KiB


def _writer(fd: int, data: bytes, block: int) -> threading.Thread:
    """A thread writing ``data`` into the pipe ``fd`` in ``block``-sized writes, then closing it."""

    def run() -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view[:block]) :]
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("tail_size", [1, 4 * KiB, 256 * KiB])
async def test_a_bulk_writer_is_copied_exactly_through_the_reused_buffer(
    tmp_path: Path, tail_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that keeps the pipe full: reads grow to ``read_size`` and then go into one
    reused buffer; the file, the size, the in-memory tail and a live follower all get
    exactly the bytes written."""
    data = random.Random(7).randbytes(12 * MiB + 12345)  # odd length: a short last read
    readv_calls = 0
    real_readv = os.readv

    def counting_readv(fd: int, buffers: list[bytearray]) -> int:
        nonlocal readv_calls
        readv_calls += 1
        return real_readv(fd, buffers)

    monkeypatch.setattr(os, "readv", counting_readv)
    log = await OutputLog.create(tmp_path / "out", cap=1 << 40, tail_size=tail_size)
    r, w = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 * MiB)
    os.write(w, data[: 1 * MiB])  # a full pipe before the pump starts: its first reads are full
    writer = _writer(w, data[1 * MiB :], 1 * MiB)
    followed = bytearray()

    async def follow() -> None:
        async for chunk in log.follow(0):
            assert chunk.offset == len(followed)
            followed.extend(chunk.data)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            await pump.pump_pipe(r, log, read_size=256 * KiB, name="test")
            assert log.tail_read(log.size - tail_size, tail_size) == data[-tail_size:]
            log.finish()
    writer.join()
    assert readv_calls > 0  # the bulk path ran
    assert log.size == len(data)
    assert not log.truncated
    assert (tmp_path / "out").read_bytes() == data
    assert followed == data


async def test_a_bulk_writer_over_the_cap_keeps_a_prefix(tmp_path: Path) -> None:
    data = random.Random(8).randbytes(6 * MiB)
    cap = 3 * MiB + 777  # reached in the middle of a bulk read
    log = await OutputLog.create(tmp_path / "out", cap=cap, tail_size=64 * KiB)
    r, w = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 * MiB)
    os.write(w, data[: 1 * MiB])
    writer = _writer(w, data[1 * MiB :], 1 * MiB)
    with trio.fail_after(60):
        await pump.pump_pipe(r, log, read_size=256 * KiB, name="test")
    writer.join()  # the pump drained the pipe to EOF: the writer was never blocked
    assert log.size == cap
    assert log.truncated
    assert log.tail_read(cap - 64 * KiB, 64 * KiB) == data[cap - 64 * KiB : cap]
    assert (tmp_path / "out").read_bytes() == data[:cap]


async def test_a_quiet_job_is_read_in_small_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines now and then never reach the bulk buffer: every read is os.read of its own."""
    monkeypatch.setattr(os, "readv", None)  # would raise TypeError if called
    log = await OutputLog.create(tmp_path / "out", cap=1 << 20)
    r, w = os.pipe2(os.O_CLOEXEC)

    async def write_lines() -> None:
        for i in range(20):
            os.write(w, b"line %d\n" % i)
            await trio.sleep(0.001)
        os.close(w)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_lines)
            await pump.pump_pipe(r, log, read_size=1 * MiB, name="test")
    assert (tmp_path / "out").read_bytes() == b"".join(b"line %d\n" % i for i in range(20))
