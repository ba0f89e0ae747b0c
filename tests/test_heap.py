"""trio_jobs.heap: the server gives the C allocator's free memory back after a peak.

The policy runs on trio's MockClock with a scripted RSS; the real ``malloc_trim`` is checked
on this process (glibc): memory freed by Python but kept by malloc leaves the RSS.
"""

from __future__ import annotations

import ctypes
import sys
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from trio_jobs import heap

if TYPE_CHECKING:
    from collections.abc import Callable

MiB = 1 << 20


async def test_trims_only_after_growth_and_at_most_every_interval(autojump_clock: trio.testing.MockClock) -> None:
    level = [100 * MiB]
    trims: list[float] = []

    def trim() -> int:
        trims.append(trio.current_time())
        level[0] = 90 * MiB  # what the trim gave back
        return 1

    async def on_the_loop(fn: Callable[[], int]) -> int:
        # not in a thread: with the autojump clock, time would jump while the thread runs
        await trio.lowlevel.checkpoint()
        return fn()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: heap.release_free_memory(
                interval=10, min_growth=16 * MiB, trim=trim, rss=lambda: level[0], run_sync=on_the_loop
            )
        )
        await trio.sleep(35)
        assert trims == []  # no growth: nothing to give back
        level[0] = 110 * MiB
        await trio.sleep(10)
        assert trims == []  # 10 MiB above the low: under min_growth
        level[0] = 130 * MiB  # a peak: 30 MiB above the low
        start = trio.current_time()
        await trio.sleep(10)
        assert len(trims) == 1
        assert trims[0] - start <= 10
        await trio.sleep(30)
        assert len(trims) == 1  # back at 90 MiB: the new low
        level[0] = 106 * MiB  # 16 MiB above the new low
        await trio.sleep(10)
        assert len(trims) == 2
        nursery.cancel_scope.cancel()


async def test_without_malloc_trim_nothing_runs() -> None:
    with trio.fail_after(1):
        await heap.release_free_memory(interval=0.01, trim=None)


@pytest.mark.skipif(heap.malloc_trim is None or not sys.platform.startswith("linux"), reason="needs glibc")
async def test_the_real_trim_returns_freed_memory() -> None:
    # ~120 MB of 60 kB blocks from malloc's heap (below its mmap threshold), one in 50 kept
    # so the heap cannot simply shrink from the top: the free pages lie in between.
    before = heap.rss_bytes()
    blocks = [ctypes.create_string_buffer(60_000) for _ in range(2000)]
    for block in blocks:
        ctypes.memset(block, 1, 60_000)  # touch every page
    kept = blocks[::50]
    del blocks
    peak = heap.rss_bytes()
    assert heap.malloc_trim is not None
    await trio.to_thread.run_sync(heap.malloc_trim)
    after = heap.rss_bytes()
    assert peak - before > 60 * MiB, "the allocation did not raise the RSS: test is void"
    assert peak - after > 60 * MiB
    assert len(kept) == 40
