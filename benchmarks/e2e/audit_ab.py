"""What the audit log costs: the same calls on servers without it, with it, and with reads.

    .venv/bin/python -m benchmarks.e2e.audit_ab [--rounds 6] [--starts 300] [--calls 12800]

Three server processes (``server_main``, no cgroups so that a start is as cheap as it gets
and the log's share of it is the largest), measured in turn, the order rotated each round:

- ``off``: no audit log;
- ``on``: the log, as ``trio-jobs serve`` has it (every StartJob written, successful
  GetJobStatus not);
- ``reads``: the log with ``--audit-reads`` (every call written).

Figures per round: StartJob of ``/bin/true`` one at a time, p50 in µs (after a warm-up);
GetJobStatus by 64 tasks on one connection, calls per second, and the server's CPU time per
call (user + system, from ``/proc``: steadier than wall time on a busy machine). Medians
over the rounds, and the median of each round's ratio to ``off`` (paired: on a shared
machine the load changes between rounds more than within one). Prints a table and writes
it, stamped, into docs/benchmarks.md between the markers of ``MARKERS`` (``--no-doc``: print
only; ``--doc FILE``: another file).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

import trio

from benchmarks import docblock

from .harness import BenchServer, percentile

DOC: Final = docblock.ROOT / "docs" / "benchmarks.md"
MARKERS: Final = docblock.Markers.of("audit-ab", "benchmarks.e2e.audit_ab")
VARIANTS: Final = ("off", "on", "reads")
WARMUP: Final = 30
CONCURRENCY: Final = 64


def _server_args(variant: str, workdir: Path) -> list[str]:
    if variant == "off":
        return []
    args = ["--audit-log", str(workdir / f"audit-{variant}.jsonl")]
    return [*args, "--audit-reads"] if variant == "reads" else args


async def start_p50(server: BenchServer, count: int) -> float:
    async with server.client() as client:
        samples = []
        for n in range(WARMUP + count):
            t0 = time.perf_counter()
            await client.start("/bin/true", [])
            if n >= WARMUP:
                samples.append(time.perf_counter() - t0)
    return percentile(samples, 50) * 1e6


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def status_qps(server: BenchServer, calls: int) -> tuple[float, float]:
    """(calls per second, server CPU µs per call)."""
    async with server.client() as client:
        job = await client.start("/bin/true", [])
        for _ in range(WARMUP):
            await client.status(job.job_id)
        per_task = calls // CONCURRENCY

        async def caller() -> None:
            for _ in range(per_task):
                await client.status(job.job_id)

        cpu0, t0 = cpu_seconds(server.pid), time.perf_counter()
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for _ in range(CONCURRENCY):
                    nursery.start_soon(caller)
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(server.pid) - cpu0
        done = per_task * CONCURRENCY
        return done / elapsed, cpu / done * 1e6


async def run(servers: dict[str, BenchServer], rounds: int, starts: int, calls: int) -> dict[str, dict[str, list[float]]]:
    figures: dict[str, dict[str, list[float]]] = {
        v: {"start_p50_us": [], "status_c64_qps": [], "status_cpu_us": []} for v in servers
    }
    for r in range(rounds):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for variant in order:
            figures[variant]["start_p50_us"].append(await start_p50(servers[variant], starts))
        for variant in reversed(order):
            qps, cpu = await status_qps(servers[variant], calls)
            figures[variant]["status_c64_qps"].append(qps)
            figures[variant]["status_cpu_us"].append(cpu)
        print(f"round {r + 1}: " + "; ".join(
            f"{v} {figures[v]['start_p50_us'][-1]:.0f} µs {figures[v]['status_c64_qps'][-1]:,.0f}/s" for v in VARIANTS
        ), flush=True)  # fmt: skip
    return figures


def table(figures: dict[str, dict[str, list[float]]]) -> str:
    lines = ["| variant | StartJob p50 (µs) | vs off | GetJobStatus c=64 QPS | vs off | server CPU/call (µs) | vs off |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for variant in VARIANTS:
        cells = []
        for key, fmt in (("start_p50_us", "{:.0f}"), ("status_c64_qps", "{:,.0f}"), ("status_cpu_us", "{:.1f}")):
            # (a tiny run can measure 0 CPU time: /proc counts in ticks; such rounds have no ratio)
            pairs = [v / o for v, o in zip(figures[variant][key], figures["off"][key], strict=True) if o]
            ratio = f"{statistics.median(pairs):.3f}x" if pairs else "n/a"
            cells += [fmt.format(statistics.median(figures[variant][key])), ratio]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    ratios = [v / o for v, o in zip(figures["on"]["start_p50_us"], figures["off"]["start_p50_us"], strict=True) if o]
    lines += ["", f"(medians of {len(figures['off']['start_p50_us'])} rounds; 'vs off': the median of the rounds' "
              f"ratios; StartJob on / off ranged {min(ratios):.2f}-{max(ratios):.2f}x over the rounds)"]
    return "\n".join(lines)


def workload(args: argparse.Namespace) -> str:
    return (f"three `server_main` processes without cgroups (off: no audit log; on: `--audit-log`, as "
            f"`trio-jobs serve` has it; reads: with `--audit-reads`), measured in turn, the order rotated "
            f"each round, {args.rounds} rounds; per round and server: {args.starts} StartJob of `/bin/true` one "
            f"at a time after {WARMUP}, then {args.calls // CONCURRENCY * CONCURRENCY:,} GetJobStatus by "
            f"{CONCURRENCY} tasks on one connection (server CPU from /proc).")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e.audit_ab")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--starts", type=int, default=300)
    parser.add_argument("--calls", type=int, default=12800)
    docblock.add_doc_arguments(parser, DOC)
    args = parser.parse_args(argv)
    if not args.no_doc:
        docblock.require_block(args.doc, MARKERS)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="audit-ab-") as tmp:
        workdir = Path(tmp)
        servers: dict[str, BenchServer] = {}
        try:
            for variant in VARIANTS:
                servers[variant] = BenchServer(workdir, cgroups=False, server_args=_server_args(variant, workdir))
            load_before = docblock.load()
            figures = trio.run(run, servers, args.rounds, args.starts, args.calls)
            load_after = docblock.load()
        finally:
            for server in servers.values():
                server.close()
        lines = {v: sum(1 for _ in (workdir / f"audit-{v}.jsonl").open()) for v in ("on", "reads")}
    written = f"Audit lines written: on {lines['on']:,}, reads {lines['reads']:,}."
    body = table(figures)
    print(f"\nload average before {load_before}, after {load_after}; {written}")
    print(body)
    if not args.no_doc:
        docblock.write_results(args.doc, MARKERS, module="benchmarks.e2e.audit_ab", argv=argv, seconds=time.monotonic() - t0,
                               load=(load_before, load_after), workload=f"{workload(args)} {written}", body=[body])
    return 0


if __name__ == "__main__":
    sys.exit(main())
