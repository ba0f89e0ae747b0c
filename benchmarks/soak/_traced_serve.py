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
import tempfile
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
        from trio_jobs import heap  # imported by the server long before the first signal

        rss = heap.rss_bytes()
        if heap.malloc_trim is not None:
            heap.malloc_trim()
        (home / f"heap-{count}.alloc").write_text(_allocator_stats())
        partial = home / f"heap-{count}.partial"
        partial.write_text(f"{traced} {rss} {heap.rss_bytes()}\n")
        partial.replace(home / f"heap-{count}.done")  # atomically: the soak polls for it
        count += 1

    signal.signal(signal.SIGUSR2, dump)


_MALLINFO2: Final = (
    "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
    "fordblks", "keepcost",
)  # fmt: skip


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2]


def _allocator_stats() -> str:
    """Where the memory is, one ``name value`` per line: glibc's main-arena and mmap
    figures (``mallinfo2``: ``arena`` obtained from the system, ``uordblks`` in use,
    ``fordblks`` free; all arenas together), every mapping's RSS by kind
    (``/proc/self/smaps``), and pymalloc's arenas (``sys._debugmallocstats``)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    lines = [f"malloc.{name} {getattr(info, name)}" for name in _MALLINFO2]
    kinds: dict[str, int] = {}
    kind = "?"
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if not first.endswith(":"):  # a mapping's header: address range, perms, ..., path
                parts = line.split()
                path = parts[5] if len(parts) > 5 else "[anon]"
                kind = path if path.startswith("[") else path.rsplit("/", 1)[-1]
            elif first == "Rss:":
                kinds[kind] = kinds.get(kind, 0) + int(line.split()[1]) * 1024
    lines += [f"rss.{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:12]]
    with tempfile.TemporaryFile("w+") as out:
        saved = os.dup(2)
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        wanted = {
            "# arenas allocated current": "arenas allocated current",
            "# arenas reclaimed": "arenas reclaimed",
            "# arenas highwater mark": "arenas highwater mark",
            "# bytes in allocated blocks": "bytes in use",  # live objects: what a leak grows
            "Total": "Total",  # the arenas' size (the first Total; the second is the arena map)
        }
        for line in out:
            name, _, value = line.rpartition("=")
            key = wanted.pop(name.strip(), None)
            if key is not None:
                lines.append(f"pymalloc.{key} {value.strip().replace(',', '')}")
    return "\n".join(lines) + "\n"


def main() -> int:
    if os.environ.get("SOAK_TRACEMALLOC") == "1":
        tracemalloc.start(FRAMES)
    _dump_on_signal(Path(os.environ["TRIO_JOBS_HOME"]))
    from trio_jobs.cli.main import main as cli_main  # after tracemalloc.start: traced too

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
