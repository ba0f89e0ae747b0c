"""``python -m benchmarks.e2e.start_ab [--before COMMIT] [--rounds N] [--per-round K]``:
StartJob latency before and after a change, in one run.

Two benchmark servers run side by side: one from a git worktree of ``COMMIT`` (default: the
first parent of HEAD), one from this tree. ``/bin/true`` jobs are started back to back on
each, alternating in rounds (the order swapped every round), with and without cgroups, as
``admin`` (jobs as root) and ``alice`` (jobs as another user: setpriv, checks as her user).
Prints p50 of each side and the median of the per-round ratios, the figure that is robust
to the machine's drift, and writes them, stamped, into docs/benchmarks.md between the
markers of ``MARKERS`` (``--no-doc``: print only; ``--doc FILE``: another file). The
worktree is temporary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from benchmarks import docblock

from .harness import BenchServer

REPO: Final = Path(__file__).resolve().parents[2]
DOC: Final = REPO / "docs" / "benchmarks.md"
MARKERS: Final = docblock.Markers.of("start-ab", "benchmarks.e2e.start_ab")
WARMUP: Final = 10


@dataclass(frozen=True)
class Row:
    """One configuration: both sides' p50 over all their starts, and the per-round ratios."""

    cgroups: str
    identity: str
    p50_before_ms: float
    p50_after_ms: float
    ratios: list[float]

    def line(self) -> str:
        return (f"| {self.cgroups} | {self.identity} | {self.p50_before_ms:.2f} ms | {self.p50_after_ms:.2f} ms "
                f"| {statistics.median(self.ratios):.2f}x | {min(self.ratios):.2f}-{max(self.ratios):.2f}x |")


def table(rows: list[Row], before: str) -> str:
    return "\n".join([
        f"| cgroups | identity | p50 before ({before}) | p50 after (this tree) | ratio (median of the rounds') | ratio per round |",
        "|---|---|---:|---:|---:|---:|",
        *(row.line() for row in rows),
    ])


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
            for _ in range(WARMUP):  # the first starts load code
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


def workload(args: argparse.Namespace, before: str) -> str:
    return (f"two servers side by side, commit {before}'s (a git worktree) and this tree's; `/bin/true` "
            f"started back to back on each, {WARMUP} warm-up starts, then {args.rounds} rounds of "
            f"{args.per_round} per side, the order swapped every round; as admin (jobs as root) and alice "
            f"(setpriv, checks as her user), without and with cgroups. p50: over all of a side's starts; "
            f"ratio: after / before, the median of the rounds' ratios of p50s.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e.start_ab",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--before", default="HEAD^", help="the commit to compare with (default HEAD^)")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--per-round", type=int, default=40)
    docblock.add_doc_arguments(parser, DOC)
    args = parser.parse_args(argv)
    if not args.no_doc:
        docblock.require_block(args.doc, MARKERS)
    before = docblock.git(REPO, "rev-parse", "--short", f"{args.before}^{{commit}}") or args.before
    t0, load_before = time.monotonic(), docblock.load()
    rows: list[Row] = []
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
                    rows.append(Row(servers["after"].driver if cgroups else "no", identity, p50["before"], p50["after"], ratios))
                    print(f"cgroups={'yes' if cgroups else 'no ':3} {identity:5} {args.rounds}x{args.per_round}: "
                          f"p50 before {p50['before']:.2f} ms, after {p50['after']:.2f} ms; "
                          f"median per-round ratio {statistics.median(ratios):.2f}x", flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    load_after = docblock.load()
    body = table(rows, before)
    print(body)
    if not args.no_doc:
        docblock.write_results(args.doc, MARKERS, module="benchmarks.e2e.start_ab", argv=argv, seconds=time.monotonic() - t0,
                               load=(load_before, load_after), workload=workload(args, before), body=[body])
    return 0


if __name__ == "__main__":
    sys.exit(main())
