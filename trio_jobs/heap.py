"""Giving the C allocator's free memory back to the system after a load peak.

Why: after a burst of work (200 clients streaming 64 KiB chunks, say) glibc's malloc keeps
the freed memory of the peak inside the process for reuse. It is not lost -- the next peak
reuses it -- but the server's RSS stays at its highest point, which to an operator looks like
a leak (the soak measured 50 -> 150 MiB of RSS with 83 MiB in use; docs/reliability.md).
glibc returns the free pages in the middle of its heap only when asked, with
``malloc_trim(0)``; this module asks, when the RSS has grown by ``min_growth`` since the last
time, at most every ``interval`` seconds, in a worker thread (it takes ~4 ms to give back
~165 MB here, and it holds malloc's lock meanwhile, not the event loop).

Not glibc (musl, macOS): :func:`malloc_trim` is None and nothing runs.
"""

from __future__ import annotations

import ctypes
import logging
import os
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

TRIM_INTERVAL: Final = 10.0
TRIM_MIN_GROWTH: Final = 16 << 20


def _load_malloc_trim() -> Callable[[], int] | None:
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int

    def trim() -> int:
        return int(fn(0))

    return trim


malloc_trim: Final = _load_malloc_trim()
"""``malloc_trim(0)`` of the C library, or None where there is none (not glibc)."""


def rss_bytes() -> int:
    """This process's resident set size, from ``/proc/self/statm``."""
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def release_free_memory(
    *,
    interval: float = TRIM_INTERVAL,
    min_growth: int = TRIM_MIN_GROWTH,
    trim: Callable[[], int] | None = malloc_trim,
    rss: Callable[[], int] = rss_bytes,
    run_sync: Callable[[Callable[[], int]], Awaitable[int]] = trio.to_thread.run_sync,
) -> None:
    """Run forever (until cancelled): every ``interval`` seconds, if the RSS is ``min_growth``
    bytes or more above its level after the last trim (or the lowest seen since), trim
    (with ``run_sync``: in a worker thread)."""
    if trim is None:
        return
    low = rss()
    while True:
        await trio.sleep(interval)
        now = rss()
        if now - low < min_growth:
            low = min(low, now)
            continue
        await run_sync(trim)
        low = rss()
        log.debug("gave free memory back: RSS %d -> %d MiB", now >> 20, low >> 20)
