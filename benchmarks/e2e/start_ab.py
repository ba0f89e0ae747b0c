"""``python -m benchmarks.e2e.start_ab [--before COMMIT] [--rounds N] [--per-round K]``:
StartJob latency before and after a change, in one run.

Two benchmark servers run side by side: one from a git worktree of ``COMMIT`` (default: the
first parent of HEAD), one from this tree. ``/bin/true`` jobs are started back to back on
each, alternating in rounds (the order swapped every round), with and without cgroups, as
``admin`` (jobs as root) and ``alice`` (jobs as another user: setpriv, checks as her user).
Prints p50 of each side and the median of the per-round ratios, the figure that is robust
to the machine's drift. Writes nothing in the repository (the worktree is temporary).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from .harness import BenchServer

REPO = Path(__file__).resolve().parents[2]


def _server(tree: Path, workdir: Path, cgroups: bool) -> BenchServer:
    """A benchmark server whose code comes from ``tree`` (its cwd and PYTHONPATH)."""
    here, path = os.getcwd(), os.environ.get("PYTHONPATH")
    os.chdir(tree)
    os.environ["PYTHONPATH"] = str(tree)
    try:
        return BenchServer(workdir, cgroups=cgroups)
    finally:
        os.chdir(here)
        if path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = path


async def _measure(servers: dict[str, BenchServer], identity: str, rounds: int, per_round: int
                   ) -> tuple[dict[str, list[float]], list[float]]:
    latencies: dict[str, list[float]] = {name: [] for name in servers}
    ratios = []
    async with servers["before"].client(identity) as before, servers["after"].client(identity) as after:
        clients = {"before": before, "after": after}
        for client in clients.values():
            for _ in range(10):  # warm-up: the first starts load code
                await client.start("/bin/true")
        for r in range(rounds):
            medians = {}
            for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
                samples = []
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    await clients[name].start("/bin/true")
                    samples.append(time.perf_counter() - t0)
                latencies[name] += samples
                medians[name] = statistics.median(samples)
            ratios.append(medians["after"] / medians["before"])
            await trio.sleep(0.3)  # let the jobs of the round end
    return latencies, ratios


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--before", default="HEAD^", help="the commit to compare with (default HEAD^)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=40)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trio-jobs-start-ab-") as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(tree), args.before],
                       check=True)
        try:
            for cgroups in (False, True):
                for identity in ("admin", "alice"):
                    work = Path(tmp) / f"run-{cgroups}-{identity}"
                    work.mkdir()
                    servers = {"before": _server(tree, work, cgroups), "after": _server(REPO, work, cgroups)}
                    try:
                        latencies, ratios = trio.run(_measure, servers, identity, args.rounds, args.per_round)
                    finally:
                        for server in servers.values():
                            server.close()
                    p50 = {name: statistics.median(xs) * 1e3 for name, xs in latencies.items()}
                    print(f"cgroups={'yes' if cgroups else 'no ':3} {identity:5} {args.rounds}x{args.per_round}: "
                          f"p50 before {p50['before']:.2f} ms, after {p50['after']:.2f} ms; "
                          f"median per-round ratio {statistics.median(ratios):.2f}x", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
