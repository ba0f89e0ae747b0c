"""``python -m benchmarks.soak._traced_serve ARGS``: ``trio-jobs ARGS``, with a heap probe.

The soak's ``--heap`` runs the server through this module. On SIGUSR2 it writes
``$TRIO_JOBS_HOME/heap-<n>.done`` (``n`` counts from 0) with three numbers: the bytes of
live Python objects (``tracemalloc``, when ``SOAK_TRACEMALLOC=1`` started it before anything
was imported; then also ``heap-<n>.snap``, a snapshot the soak compares between rounds), the
RSS, and the RSS after ``malloc_trim(0)`` -- what the C allocator holds free but has not
returned to the system. The product itself has no such hook: this is a measuring
instrument, like py-spy.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from typing import Final

FRAMES: Final = 12


def _dump_on_signal(home: Path) -> None:
    count = 0

    def dump(_signum: int, _frame: object) -> None:
        nonlocal count
        traced = 0
        if tracemalloc.is_tracing():
            tracemalloc.take_snapshot().dump(str(home / f"heap-{count}.snap"))
            traced = tracemalloc.get_traced_memory()[0]
        rss = _rss()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        partial = home / f"heap-{count}.partial"
        partial.write_text(f"{traced} {rss} {_rss()}\n")
        partial.replace(home / f"heap-{count}.done")  # atomically: the soak polls for it
        count += 1

    signal.signal(signal.SIGUSR2, dump)


def _rss() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def main() -> int:
    if os.environ.get("SOAK_TRACEMALLOC") == "1":
        tracemalloc.start(FRAMES)
    _dump_on_signal(Path(os.environ["TRIO_JOBS_HOME"]))
    from trio_jobs.cli.main import main as cli_main  # after tracemalloc.start: traced too

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
