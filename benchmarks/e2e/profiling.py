"""Where the time goes on the hot paths: one ``tail`` of a big job (server and client
profiled) and sequential ``StartJob`` calls (server profiled).

The server runs under cProfile (``server_main --profile``); the client is ``trio-jobs tail``
run as ``python -m cProfile -o FILE -m trio_jobs.cli tail JOB``. Both write their stats at
exit; we print the functions with the most own time (tottime).
"""

from __future__ import annotations

import io
import os
import pstats
import subprocess
from typing import TYPE_CHECKING

from .harness import PYTHON, BenchServer

if TYPE_CHECKING:
    from pathlib import Path


def _top(path: Path, title: str, count: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:count]  # type: ignore[attr-defined]
    lines = [f"{title} (cProfile, {total:.1f} s of own time in all functions; top {count} by own time):", "",
             "| function | own s | share | calls |", "|---|---:|---:|---:|"]  # fmt: skip
    for (filename, line, func), (_cc, ncalls, tottime, _ct, _callers) in rows:
        short = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        lines.append(f"| `{short}:{line} {func}` | {tottime:.2f} | {tottime / total:.0%} | {ncalls:,} |")
    return "\n".join(lines)


async def profile_tail(workdir: Path, size: int, count: int = 12) -> str:
    """Profile one ``tail`` of ``head -c SIZE /dev/zero`` (no cgroups); markdown tables."""
    import trio

    server_prof = workdir / "server.prof"
    client_prof = workdir / "tail.prof"
    server = BenchServer(workdir, cgroups=False, profile=server_prof)
    try:
        async with server.client() as client:
            job = await client.start("head", ["-c", str(size), "/dev/zero"])

        def run_tail() -> None:
            # into a pipe that we drain, as in the streaming figure (`tail JOB | ...`)
            argv = [PYTHON, "-m", "cProfile", "-o", str(client_prof), "-m", "trio_jobs.cli", "tail", job.job_id]
            with subprocess.Popen(argv, env=server.cli_env(), stdout=subprocess.PIPE) as proc:
                assert proc.stdout is not None
                while os.read(proc.stdout.fileno(), 1 << 20):
                    pass
            if proc.returncode != 0:
                raise RuntimeError(f"the profiled tail exited {proc.returncode}")

        await trio.to_thread.run_sync(run_tail)
    finally:
        server.close()
    return "\n\n".join([
        _top(server_prof, f"Server, while streaming {size >> 20} MiB to one `tail`", count),
        _top(client_prof, "Client, `trio-jobs tail` of the same job", count),
    ])  # fmt: skip


async def profile_starts(workdir: Path, count: int, top: int = 12) -> str:
    """Profile the server (no cgroups) while one client starts ``count`` jobs one at a time."""
    server_prof = workdir / "server-starts.prof"
    server = BenchServer(workdir, cgroups=False, profile=server_prof)
    try:
        async with server.client() as client:
            for _ in range(count):
                await client.start("/bin/true")
    finally:
        server.close()
    return _top(server_prof, f"Server, {count} sequential `StartJob` of /bin/true (history grows to {count})", top)
