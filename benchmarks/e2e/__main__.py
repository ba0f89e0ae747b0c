"""``python -m benchmarks.e2e [--quick] [--no-doc] [--no-profile] [--only NAMES]``: the end-to-end benchmark.

Starts real servers (each in its own process, with and without cgroups), drives them over
mutual TLS on 127.0.0.1 with the client library and the ``trio-jobs`` CLI, measures every
figure next to its ceiling in the same run, prints a table, and (full run only) rewrites the
"End to end" results in docs/benchmarks.md and its charts in docs/img/. ``--quick`` is a
smoke run of a few seconds that writes nothing; ``--only start,history`` runs just those
scenarios (with their ceilings) and writes nothing either. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from benchmarks import docblock
from trio_jobs.security.pki import init_dev_pki

from . import ceilings, report, scenarios
from .harness import BenchServer
from .profiling import profile_starts, profile_tail

if TYPE_CHECKING:
    from collections.abc import Callable

MiB = 1 << 20


@dataclass(frozen=True, kw_only=True)
class Sizes:
    start_seq: int = 300
    start_burst: int = 500
    start_rounds: int = 5
    stream: int = 1024 * MiB
    stream_rounds: int = 5
    fanout: int = 32 * MiB
    fanout_counts: tuple[int, ...] = (1, 10, 100)
    running: int = 1000
    history: int = 10_000
    calls: int = 50
    history_rounds: int = 5
    flood: int = 1024 * MiB
    profile: int = 256 * MiB

    @classmethod
    def quick(cls) -> Sizes:
        return cls(start_seq=30, start_burst=64, start_rounds=2, stream=32 * MiB, stream_rounds=1, fanout=4 * MiB,
                   fanout_counts=(1, 10), running=50, history=200, calls=10, history_rounds=2, flood=32 * MiB,
                   profile=0)  # fmt: skip


Figures = dict[str, dict[str, float]]


SCENARIOS: Final = ("start", "stream", "fanout", "isolation", "running", "history")
"""What ``--only`` can name; a full run measures all of them (and only a full run writes the doc)."""


async def measure(sizes: Sizes, workdir: Path, log: Callable[[str], None],
                  only: frozenset[str] = frozenset(SCENARIOS)) -> Figures:
    figs: Figures = {"ceiling": {}}
    if "start" in only:
        log("job start without cgroups, the ceiling in the same rounds")
        with BenchServer(workdir, cgroups=False) as server, ceilings.StartCeiling(cgroups=False) as ceiling:
            figs["start_none"] = await scenarios.job_start(
                server, ceiling, sequential=sizes.start_seq, burst=sizes.start_burst, concurrency=8,
                rounds=sizes.start_rounds,
            )  # fmt: skip
    if only & {"start", "stream", "fanout", "isolation"}:
        with BenchServer(workdir, cgroups=True) as server:
            figs["driver"] = {"cgroups": float(server.driver != "none")}
            if "start" in only and server.driver != "none":
                log(f"job start with the {server.driver!r} cgroup driver, the ceiling in the same rounds")
                with ceilings.StartCeiling(cgroups=True) as ceiling:
                    figs["start_cg"] = await scenarios.job_start(
                        server, ceiling, sequential=sizes.start_seq, burst=sizes.start_burst, concurrency=8,
                        rounds=sizes.start_rounds,
                    )  # fmt: skip
            if "stream" in only:
                log(f"streaming {sizes.stream >> 20} MiB to one trio-jobs tail; bare TLS and the ideal chain in each round")
                pki = workdir / "bare-tls-pki"  # the same kind of development PKI the servers use
                init_dev_pki(pki)
                chain: dict[str, list[float]] = {"mbps": [], "job_followed_s": [], "job_alone_s": []}
                tls: list[float] = []

                async def chain_round() -> None:  # interleaved with the tail's rounds
                    tls.append(await ceilings.bare_tls_receive(pki, sizes.stream))
                    spool = workdir / "ideal-chain.spool"
                    await scenarios.settle_disk()
                    chain["job_alone_s"].append(await trio.to_thread.run_sync(ceilings.job_alone, sizes.stream, spool))
                    await scenarios.settle_disk()
                    for key, value in (await ceilings.ideal_live_chain(pki, sizes.stream, spool)).items():
                        chain[key].append(value)

                figs["stream"] = await scenarios.streaming(server, sizes.stream, sizes.stream_rounds, chain_round)
                figs["ceiling"].update({f"chain_{k}": statistics.median(v) for k, v in chain.items()})
                figs["ceiling"]["tls_mbps"] = statistics.median(tls)
            for n in sizes.fanout_counts if "fanout" in only else ():
                log(f"fan-out: {n} followers of a {sizes.fanout >> 20} MiB job, live (all attached first), then replay")
                figs[f"fanout-{n}"] = await scenarios.fanout(server, workdir, sizes.fanout, n)
            if "isolation" in only:
                log(f"isolation: alice floods {sizes.flood >> 20} MiB; bob's status and follower")
                figs["isolation"] = await scenarios.isolation(server, sizes.flood, sizes.calls)
    if "running" in only:
        with BenchServer(workdir, cgroups=True) as server:
            log(f"scale: {sizes.running} sleeping jobs at once")
            figs["running"] = await scenarios.scale_running(server, sizes.running, 16)
    if "history" in only:
        log(f"history: writing {sizes.history} jobs with the worker in-process")
        home = workdir / "history"
        fill_rate = await scenarios.prefill_history(home, sizes.history, 16)
        with BenchServer(workdir, cgroups=False, home=home) as many, BenchServer(workdir, cgroups=False) as few:
            log("history: list, status and StartJob latency against a 10-job server, same rounds (no cgroups)")
            figs["history"] = await scenarios.history(many, few, sizes.calls, sizes.history_rounds)
        figs["history"]["fill_jobs_s"] = fill_rate
    return figs


def _start_rows(label: str, start: dict[str, float]) -> list[report.Row]:
    R = report.Row
    h = int(start["hierarchies"])
    dirs = f"{h} cgroup dirs + limit writes + " if h else ""
    return [
        R(figure=f"job start p50, {label} (to exec)", value=start["p50_ms"], unit="ms", ceiling=start["ceiling_p50_ms"],
          ceiling_name=f"{dirs}posix_spawn of /bin/true, to exec", target="<= 3x",
          ok=start["p50_ms"] <= 3 * start["ceiling_p50_ms"]),
        R(figure=f"job start p99, {label} (to exec)", value=start["p99_ms"], unit="ms", ceiling=start["ceiling_p99_ms"],
          ceiling_name="same, p99" + (" of the per-start sums" if h else "")),
        R(figure=f"job start to its end, p50, {label} (to exit)", value=start["end_p50_ms"], unit="ms",
          ceiling=start["ceiling_exit_p50_ms"], ceiling_name=f"{dirs}posix_spawn + waitpid" + (" + rmdir" if h else "")),
        R(figure=f"jobs started/s, {label} (8 callers)", value=start["jobs_s"], unit="/s",
          ceiling=start["ceiling_jobs_s"], ceiling_name="the same spawns back to back, one loop"),
    ]  # fmt: skip


def rows(figs: Figures, sizes: Sizes) -> list[report.Row]:
    """The table's rows, in a fixed order; a figure that was not measured (``--only``) has none."""
    R = report.Row
    c = figs["ceiling"]
    out: list[report.Row] = []
    if "start_none" in figs:
        out += _start_rows("no cgroups", figs["start_none"])
    if "start_cg" in figs:
        out += _start_rows("cgroups", figs["start_cg"])
    if "stream" in figs:
        st = figs["stream"]
        out += [
            R(figure=f"tail of {sizes.stream >> 20} MiB over mTLS", value=st["mbps"], unit="MB/s",
              ceiling=c["tls_mbps"], ceiling_name="bare trio.SSLStream", target=">= 0.7x", ok=st["mbps"] >= 0.7 * c["tls_mbps"]),
            R(figure="  the same tail, against the ideal chain", value=st["mbps"], unit="MB/s",
              ceiling=c["chain_mbps"], ceiling_name="bare TLS parts, cat as the pump"),
            R(figure="  the same tail, against the job's own output rate", value=st["mbps"], unit="MB/s",
              ceiling=sizes.stream / st["job_followed_s"] / 1e6, ceiling_name="job's bytes / its wall time"),
            R(figure="live tail of the ideal chain (no HTTP/2, gRPC, protobuf)", value=c["chain_mbps"], unit="MB/s",
              ceiling=c["tls_mbps"], ceiling_name="bare trio.SSLStream"),
            R(figure=f"tail of the ended {sizes.stream >> 20} MiB job over mTLS", value=st["ended_mbps"], unit="MB/s",
              ceiling=c["tls_mbps"], ceiling_name="bare trio.SSLStream", target=">= 0.7x",
              ok=st["ended_mbps"] >= 0.7 * c["tls_mbps"]),
            R(figure="job wall time with one follower", value=st["job_followed_s"], unit="s",
              ceiling=st["job_alone_s"], ceiling_name="no follower", target="not slowed (<= 1.2x)",
              ok=st["job_followed_s"] <= 1.2 * st["job_alone_s"]),
            R(figure="job wall time with a stalled follower", value=st["job_stalled_s"], unit="s",
              ceiling=st["job_alone_s"], ceiling_name="no follower", target="not slowed (<= 1.2x)",
              ok=st["job_stalled_s"] <= 1.2 * st["job_alone_s"]),
            R(figure="job wall time beside one spinning process, no follower", value=st["job_spinner_s"], unit="s",
              ceiling=st["job_alone_s"], ceiling_name="nothing beside"),
            R(figure="job wall time in the ideal chain, followed", value=c["chain_job_followed_s"], unit="s",
              ceiling=c["chain_job_alone_s"], ceiling_name="no follower"),
        ]  # fmt: skip
    if f"fanout-{sizes.fanout_counts[0]}" in figs:
        one = figs[f"fanout-{sizes.fanout_counts[0]}"]
        for n in sizes.fanout_counts:
            f = figs[f"fanout-{n}"]
            big = n == 100
            out += [
                R(figure=f"fan-out {n} followers, live, aggregate", value=f["live_mbps"], unit="MB/s",
                  ceiling=one["live_mbps"], ceiling_name="1 live follower", target=">= 0.8x" if big else "",
                  ok=f["live_mbps"] >= 0.8 * one["live_mbps"] if big else None),
                R(figure=f"fan-out {n} followers, replay of the ended job, aggregate", value=f["replay_mbps"],
                  unit="MB/s", ceiling=one["replay_mbps"], ceiling_name="1 follower, replay"),
            ]  # fmt: skip
        n = sizes.fanout_counts[-1]
        last = figs[f"fanout-{n}"]
        out += [
            R(figure=f"server RSS growth, {n} followers, live", value=last["live_rss_growth_mib"], unit="MiB",
              target="< 100 MiB", ok=last["live_rss_growth_mib"] < 100),
            R(figure=f"server RSS growth, {n} followers, replay", value=last["replay_rss_growth_mib"], unit="MiB",
              target="< 100 MiB", ok=last["replay_rss_growth_mib"] < 100),
        ]  # fmt: skip
    if "running" in figs:
        run = figs["running"]
        out.append(
            R(figure=f"server RSS per running job ({int(run['running'])} sleeping)", value=run["rss_per_job_kib"],
              unit="KiB", target="< 150 KiB", ok=run["rss_per_job_kib"] < 150),
        )  # fmt: skip
    if "history" in figs:
        hist = figs["history"]
        out += [
            R(figure=f"list p99, {int(hist['jobs'])} jobs in history", value=hist["list_p99_ms"], unit="ms",
              ceiling=hist["list_few_p99_ms"], ceiling_name="list of 10 jobs", target="< 50 ms", ok=hist["list_p99_ms"] < 50),
            R(figure=f"job start p50, {int(hist['jobs'])} jobs in history", value=hist["start_p50_ms"], unit="ms",
              ceiling=hist["start_few_p50_ms"], ceiling_name="10 jobs"),
            R(figure=f"status p99, {int(hist['jobs'])} jobs in history", value=hist["status_p99_ms"], unit="ms",
              ceiling=hist["status_few_p99_ms"], ceiling_name="10 jobs", target="< 50 ms", ok=hist["status_p99_ms"] < 50),
        ]  # fmt: skip
    if "isolation" in figs:
        iso = figs["isolation"]
        out += [
            R(figure="bob's status p99 while alice floods", value=iso["status_flood_p99_ms"], unit="ms",
              ceiling=iso["status_idle_p99_ms"], ceiling_name="no flood", target="< 50 ms", ok=iso["status_flood_p99_ms"] < 50),
            R(figure="bob's follower: line delay p99 during the flood", value=iso["bob_p99_delay_ms"], unit="ms",
              ceiling=iso["bob_idle_max_delay_ms"], ceiling_name="max before the flood",
              target="keeps streaming (< 50 ms)", ok=iso["bob_p99_delay_ms"] < 50),
            R(figure="bob's follower: line delay max during the flood", value=iso["bob_max_delay_ms"], unit="ms",
              ceiling=iso["bob_idle_max_delay_ms"], ceiling_name="max before the flood"),
        ]  # fmt: skip
    return out


def workload(sizes: Sizes) -> str:
    return (
        f"{sizes.start_rounds} rounds of {sizes.start_seq // sizes.start_rounds} sequential StartJob of /bin/true "
        f"and {sizes.start_burst // sizes.start_rounds} by 8 callers, beside the same of the ceiling; "
        f"{sizes.stream_rounds} rounds of: bare TLS, one tail of {sizes.stream >> 20} MiB, the job alone, beside a "
        f"spinning process and with a stalled follower, the ideal chain; {', '.join(map(str, sizes.fanout_counts))} "
        f"followers of {sizes.fanout >> 20} MiB, live then replay; {sizes.running} sleeping jobs; {sizes.history} "
        f"jobs of history against 10 in {sizes.history_rounds} rounds of {sizes.calls // sizes.history_rounds} list, "
        f"{sizes.calls // sizes.history_rounds * 5} status and {sizes.calls // sizes.history_rounds} start calls; "
        f"a {sizes.flood >> 20} MiB flood."
    )


def _scenario_names(text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(names - set(SCENARIOS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown) or '(none given)'}; choose from {', '.join(SCENARIOS)}"
        )
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run; writes nothing")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md and charts")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled tail run")
    parser.add_argument("--only", metavar="NAMES", type=_scenario_names,
                        help=f"run only these scenarios (comma-separated: {','.join(SCENARIOS)}); "
                        "implies --no-doc and --no-profile")
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    only = args.only if args.only is not None else frozenset(SCENARIOS)
    partial = args.only is not None

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    t0 = time.monotonic()
    load_before = docblock.load()
    with tempfile.TemporaryDirectory(prefix="trio-jobs-bench-e2e-") as tmp:
        figs = trio.run(measure, sizes, Path(tmp), log, only)
        load_after = docblock.load()
        profile = ""
        if not (args.quick or args.no_profile or partial):
            log(f"profiling one tail of {sizes.profile >> 20} MiB (server and client under cProfile)")
            profile = trio.run(profile_tail, Path(tmp), sizes.profile)
            log("profiling 300 sequential StartJob (server under cProfile)")
            profile += "\n\n" + trio.run(profile_starts, Path(tmp), 300)
    elapsed = time.monotonic() - t0
    table_rows = rows(figs, sizes)
    print(f"load average before: {load_before}, after: {load_after}; {elapsed:.0f} s")
    print(report.table(table_rows))
    print(report.targets(table_rows))
    if profile:
        print()
        print(profile)
    if args.quick or args.no_doc or partial:  # the doc is written only from a full run
        return 0
    drew = report.charts(figs, sizes.fanout_counts)
    if not drew:
        print("charts skipped: matplotlib is not installed (./dev bench e2e installs it)", file=sys.stderr)
    stamp = docblock.stamp(command="python -m benchmarks.e2e", seconds=elapsed, load=(load_before, load_after),
                           workload=workload(sizes))
    block = report.results_block(stamp=stamp, rows=table_rows, charts=drew, profile=profile)
    report.write_doc(block, report.DEFAULT_SECTION)
    print(f"wrote {report.DOC}" + (f" and charts in {report.IMG}" if drew else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
