"""``python -m benchmarks.soak``: load a real ``trio-jobs serve`` and print a one-page report.

    python -m benchmarks.soak                      # 200 clients, 3 rounds of 60 s (docs/reliability.md)
    python -m benchmarks.soak --seconds 600 --clients 500
    python -m benchmarks.soak --quick              # a few seconds (the test suite's smoke run)
    python -m benchmarks.soak --heap tracemalloc   # and what grew in the server's Python heap
    python -m benchmarks.soak --fuzz-minutes 10    # then the input fuzzer for 10 minutes
    python -m benchmarks.soak --no-doc             # print the report only

A run writes its report into docs/reliability.md between the markers of ``MARKERS``,
stamped (when, commit, command line, machine, load before and after, duration), unless
``--no-doc``, ``--quick`` (a smoke run) or ``--heap tracemalloc`` (a profiled server is
slower than it should be, as the rpc benchmark's ``--profile``); ``--doc FILE`` writes into
another file (the smoke test's copy).

The load runs ``--rounds`` times (default 3) against the same server, which settles after
each round (no job running, file descriptors, processes and threads back where they were).
The server's memory is probed before the load and after each round (``_traced_serve``: RSS,
and RSS after ``malloc_trim(0)``, i.e. memory still in use). Exit status: 0 when there was no
unexpected error and nothing grew (file descriptors, threads, processes, job cgroups; RSS
within ``RSS_SLACK`` of the start, and -- the leak check -- the memory in use within
``LEAK_SLACK`` plus ``HISTORY_BYTES_PER_JOB`` per new job from the end of the first round to
the end of the last: the first round sets the working set, a leak keeps growing); 1
otherwise; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from benchmarks import docblock
from trio_jobs.client import JobsClient

from ._load import Stats, run_load
from ._server import HeapProbe, Snapshot, SoakServer, identity_name, job_cgroups, snapshot

if TYPE_CHECKING:
    from collections.abc import Sequence

MiB: Final = 1024 * 1024
RSS_SLACK: Final = 64 * MiB  # allocator high-water marks are not a leak; more than this is
LEAK_SLACK: Final = 16 * MiB  # RSS growth from the first round's end to the last's
HISTORY_BYTES_PER_JOB: Final = 1024  # what one more job of history may take (docs/reliability.md)
FD_SLACK: Final = 2
SETTLE_TIMEOUT: Final = 60.0  # after the load: running jobs end, connections close
CLIENTS_PER_IDENTITY: Final = 10
REPO: Final = Path(__file__).resolve().parents[2]
FUZZ_EXAMPLES_PER_RUN: Final = 500
DOC: Final = REPO / "docs" / "reliability.md"
MARKERS: Final = docblock.Markers.of("soak", "benchmarks.soak")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=200, help="concurrent clients (default 200)")
    p.add_argument("--seconds", type=float, default=60.0, help="load duration (default 60)")
    p.add_argument("--minutes", type=float, help="load duration in minutes (instead of --seconds)")
    p.add_argument("--think", type=float, default=0.05, help="max pause between a client's iterations, s")
    p.add_argument("--rounds", type=int, default=3, help="load rounds against one server (default 3)")
    p.add_argument("--quick", action="store_true", help="20 clients for 3 s, one round: a smoke run")
    p.add_argument("--heap", choices=("rss", "tracemalloc", "none"), default="rss",
                   help="probe the server's memory before the load and after each round: 'rss' (default) "
                   "RSS before/after malloc_trim(0); 'tracemalloc' also the Python heap (the server runs "
                   "much slower) and what grew in it; 'none' runs plain 'trio-jobs serve'")
    p.add_argument("--fuzz-minutes", type=float, default=0.0, help="then run the input fuzzer this long")
    docblock.add_doc_arguments(p, DOC)
    args = p.parse_args(argv)
    if args.minutes is not None:
        args.seconds = args.minutes * 60
    if args.quick:
        args.clients, args.seconds, args.rounds = 20, 3.0, 1
    if args.clients < 1 or args.seconds <= 0 or args.think < 0 or args.fuzz_minutes < 0 or args.rounds < 1:
        p.error("--clients and --rounds must be >= 1, --seconds > 0, --think and --fuzz-minutes >= 0")
    return args


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def merge(rounds: Sequence[Stats]) -> Stats:
    """The statistics of several load rounds as one."""
    out = Stats()
    for s in rounds:
        out.requests.update(s.requests)
        out.expected.update(s.expected)
        for rpc, samples in s.latencies.items():
            out.latencies.setdefault(rpc, []).extend(samples)
        out.unexpected.extend(s.unexpected[: max(0, 20 - len(out.unexpected))])
        out.unexpected_count += s.unexpected_count
        out.jobs_started += s.jobs_started
    return out


def report(
    args: argparse.Namespace, rounds: Sequence[Stats], before: Snapshot, ends: Sequence[Snapshot],
    heaps: Sequence[HeapProbe], driver: str,
) -> tuple[str, list[str]]:
    """The one-page report and the list of failures (empty = pass). ``ends``: a snapshot
    after each round (settled), the last one being "after"; ``heaps``: the memory probes
    before the load and after each round (empty with ``--heap none``)."""
    stats = merge(rounds)
    after = ends[-1]
    total = sum(stats.requests.values())
    seconds = args.seconds * len(ends)
    lines = [
        f"trio-jobs soak: {args.clients} clients x {args.seconds:g} s x {len(ends)} round(s) "
        f"against trio-jobs serve ({driver})",
        f"requests: {total} ({total / seconds:.0f}/s); jobs started: {stats.jobs_started}",
        f"unexpected errors: {stats.unexpected_count}",
        "expected refusals: " + (", ".join(f"{k} {v}" for k, v in stats.expected.items()) or "none"),
        "",
        f"{'latency (ms)':<14}{'count':>8}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}",
    ]
    for rpc in sorted(stats.latencies):
        s = stats.latencies[rpc]
        lines.append(
            f"{rpc:<14}{stats.requests[rpc]:>8}"
            + "".join(f"{_pct(s, q) * 1000:>9.1f}" for q in (0.5, 0.9, 0.99))
            + f"{max(s) * 1000:>9.1f}"
        )
    lines += ["", f"{'server':<16}{'before':>10}{'after':>10}"]
    rows = [
        ("RSS (MiB)", before.rss_bytes / MiB, after.rss_bytes / MiB),
        ("open fds", before.fds, after.fds),
        ("threads", before.threads, after.threads),
        ("processes", before.processes, after.processes),
        ("job cgroups", before.cgroups, after.cgroups),
    ]
    lines += [f"{name:<16}{b:>10.0f}{a:>10.0f}" for name, b, a in rows]
    lines.append("RSS after each round (MiB): " + ", ".join(f"{e.rss_bytes / MiB:.0f}" for e in ends))
    if heaps:
        lines.append(heap_report(heaps))
    failures = []
    failures += _memory_failures(rounds, before, ends, heaps)
    if stats.unexpected_count:
        failures.append(f"{stats.unexpected_count} unexpected errors, e.g. " + "; ".join(stats.unexpected[:5]))
    if after.fds > before.fds + FD_SLACK:
        failures.append(f"file descriptors grew {before.fds} -> {after.fds}")
    if after.threads > before.threads:
        failures.append(f"threads grew {before.threads} -> {after.threads}")
    if after.processes > before.processes:
        failures.append(f"processes left: {after.processes} (before {before.processes})")
    if after.cgroups > before.cgroups:
        failures.append(f"job cgroups left: {after.cgroups} (before {before.cgroups})")
    if not total:
        failures.append("no request completed")
    return "\n".join(lines), failures


def _memory_failures(
    rounds: Sequence[Stats], before: Snapshot, ends: Sequence[Snapshot], heaps: Sequence[HeapProbe]
) -> list[str]:
    """RSS may rise once, to the working set of the load (the allocator keeps what it used at
    the peak); it must not keep rising from round to round beyond what the job history itself
    takes (``HISTORY_BYTES_PER_JOB`` for each job started after the first round). With the
    heap probe the round-to-round check uses the RSS after ``malloc_trim(0)``: memory still
    in use, without the free memory the C allocator happens to hold."""
    failures = []
    start, end = (heaps[0].trimmed, heaps[-1].trimmed) if heaps else (before.rss_bytes, ends[-1].rss_bytes)
    if end > start + RSS_SLACK:
        what = "RSS after malloc_trim" if heaps else "RSS"
        failures.append(f"{what} grew {start // MiB} -> {end // MiB} MiB")
    if len(ends) > 1:
        later_jobs = sum(r.jobs_started for r in rounds[1:])
        allowance = LEAK_SLACK + later_jobs * HISTORY_BYTES_PER_JOB
        first, last = (heaps[1].trimmed, heaps[-1].trimmed) if heaps else (ends[0].rss_bytes, ends[-1].rss_bytes)
        what = "RSS after malloc_trim" if heaps else "RSS"
        if last > first + allowance:
            failures.append(
                f"{what} kept growing after the first round: {first / MiB:.0f} -> {last / MiB:.0f} MiB "
                f"(allowed: {allowance / MiB:.0f} MiB for {later_jobs} more jobs of history)"
            )
    return failures


def heap_report(heaps: Sequence[HeapProbe], top: int = 12) -> str:
    """The server's memory before the load and after each round, and what grew most in the
    Python heap from the first round's end to the last's."""
    import tracemalloc

    def row(name: str, values: list[int]) -> str:
        return f"{name:<32}" + "".join(f"{v / MiB:>8.1f}" for v in values)

    lines = ["", f"{'memory (MiB)':<32}{'before':>8}" + "".join(f"{f'round {i}':>8}" for i in range(1, len(heaps))),
             row("RSS", [h.rss for h in heaps]),
             row("RSS after malloc_trim(0)", [h.trimmed for h in heaps])]
    if heaps[0].snapshot is not None:
        lines.append(row("Python objects (tracemalloc)", [h.traced for h in heaps]))
    # Where it is: the C allocator's own books and the RSS of each kind of mapping. Shown
    # when they moved by more than 1 MiB between the probes.
    for name in sorted({k for h in heaps for k in h.allocator}):
        values = [h.allocator.get(name, 0) for h in heaps]
        if name.startswith(("malloc.", "rss.", "pymalloc.Total", "pymalloc.bytes")) and max(values) - min(values) > MiB:
            lines.append(row(f"  {name}", values))
        elif name.startswith("pymalloc.arenas") and max(values) != min(values):
            lines.append(f"{'  ' + name:<32}" + "".join(f"{v:>8}" for v in values))
    if len(heaps) > 2 and heaps[1].snapshot is not None and heaps[-1].snapshot is not None:
        first = tracemalloc.Snapshot.load(str(heaps[1].snapshot))
        last = tracemalloc.Snapshot.load(str(heaps[-1].snapshot))
        lines.append(f"Python heap growth, first round's end -> last round's end (top {top}):")
        for stat in last.compare_to(first, "lineno")[:top]:
            frame = stat.traceback[0]
            lines.append(f"  {stat.size_diff / 1024:>+9.1f} KiB {stat.count_diff:>+7} blocks  "
                         f"{frame.filename.split('site-packages/')[-1]}:{frame.lineno}")
    return "\n".join(lines)


async def _settle(server: SoakServer, before: Snapshot | None) -> Snapshot:
    """Wait (bounded) until no job runs and the server's fds are back; return a snapshot."""
    async with JobsClient.connect(server.address, ssl_context=server.ssl_context("admin")) as admin:
        with trio.move_on_after(SETTLE_TIMEOUT):
            while any(j.state == "running" for j in await admin.list(all_users=True)):  # noqa: ASYNC110
                await trio.sleep(0.2)  # polling a remote server: there is no event to wait on
    snap = snapshot(server.pid, server.cgroup_parent)
    with trio.move_on_after(SETTLE_TIMEOUT):
        while before is not None and (
            snap.fds > before.fds + FD_SLACK or snap.processes > before.processes or snap.threads > before.threads
        ):
            await trio.sleep(0.2)
            snap = snapshot(server.pid, server.cgroup_parent)
    return snap


async def _warm_up(server: SoakServer) -> None:
    """Each kind of call once, so lazily made things (threads, caches) count as 'before'."""
    stats = await run_load(server.address, lambda _i: server.ssl_context(identity_name(0)), clients=4, seconds=1.0, think=0)
    if stats.unexpected_count:
        raise RuntimeError("warm-up failed: " + "; ".join(stats.unexpected[:5]))


def _identities(clients: int) -> int:
    return max(1, -(-clients // CLIENTS_PER_IDENTITY))


async def soak(args: argparse.Namespace, home: Path) -> tuple[int, str]:
    """Run the load; (exit status, the report with its verdict line)."""
    identities = _identities(args.clients)
    # Every client connects from 127.0.0.1, all at once: lift the per-source caps (a real
    # deployment's clients come from many addresses; tests/hostile/test_lockout.py).
    per_source = str(args.clients + 8)
    server = SoakServer(home, identities=identities, max_running_jobs=CLIENTS_PER_IDENTITY + 2,
                        heap=args.heap, extra_args=("--max-connections-per-source", per_source,
                                                    "--max-handshakes-per-source", per_source))
    heaps: list[HeapProbe] = []
    async with trio.open_nursery() as nursery:
        try:
            await server.start(nursery)
            await _warm_up(server)
            before = await _settle(server, None)
            if args.heap != "none":
                heaps.append(await server.heap_probe())
            contexts = {i: server.ssl_context(identity_name(i)) for i in range(identities)}
            rounds: list[Stats] = []
            ends: list[Snapshot] = []
            for _ in range(args.rounds):
                rounds.append(
                    await run_load(
                        server.address,
                        lambda i: contexts[i // CLIENTS_PER_IDENTITY],
                        clients=args.clients,
                        seconds=args.seconds,
                        think=args.think,
                    )
                )
                ends.append(await _settle(server, before))
                if args.heap != "none":
                    heaps.append(await server.heap_probe())
        finally:
            code = await server.stop()
        text, failures = report(args, rounds, before, ends, heaps, server.cgroup_driver())
        if code != 0:
            failures.append(f"the server exited {code}: {server.stderr_text()[-2000:]}")
        if "Traceback" in server.stderr_text():
            failures.append("a traceback in the server's stderr: " + server.stderr_text()[-2000:])
        left = job_cgroups(server.cgroup_parent)
        if left:
            failures.append(f"{left} job cgroups left after the server stopped")
        text += "\nverdict: " + ("OK" if not failures else "FAIL\n  " + "\n  ".join(failures))
        print(text, flush=True)
        nursery.cancel_scope.cancel()
    return (0 if not failures else 1), text


def writes_doc(args: argparse.Namespace) -> bool:
    """A smoke run and a run whose server is slowed by tracemalloc stay out of the docs."""
    return not (args.no_doc or args.quick or args.heap == "tracemalloc")


def soak_workload(args: argparse.Namespace) -> str:
    return (f"{args.clients} clients ({_identities(args.clients)} identities) x {args.seconds:g} s x {args.rounds} "
            f"round(s) against one `trio-jobs serve`, pauses of up to {args.think * 1000:g} ms, heap probe `{args.heap}`")


def fuzz(minutes: float) -> int:
    """The test suite's input fuzzer, run again and again (fresh random seeds) for ``minutes``."""
    env = {**os.environ, "TRIO_JOBS_FUZZ_EXAMPLES": str(FUZZ_EXAMPLES_PER_RUN)}
    test = REPO / "tests" / "reliability" / "test_fuzz_input.py"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)]
    deadline = time.monotonic() + minutes * 60
    runs = 0
    while True:
        runs += 1
        print(f"fuzz run {runs}: {FUZZ_EXAMPLES_PER_RUN} examples per property", flush=True)
        code = subprocess.run(cmd, env=env, cwd=REPO, check=False).returncode
        if code != 0 or time.monotonic() >= deadline:
            print(f"fuzz: {runs} runs, {'FAIL' if code else 'OK'}", flush=True)
            return code


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if writes_doc(args):
        docblock.require_block(args.doc, MARKERS)
    t0, load_before = time.monotonic(), docblock.load()
    with tempfile.TemporaryDirectory(prefix="trio-jobs-soak-") as tmp:
        code, text = trio.run(soak, args, Path(tmp) / "home")
    if writes_doc(args):
        docblock.write_results(args.doc, MARKERS, module="benchmarks.soak", argv=argv, seconds=time.monotonic() - t0,
                               load=(load_before, docblock.load()), workload=soak_workload(args),
                               body=["```", text, "```"])
    if args.fuzz_minutes and code == 0:
        code = fuzz(args.fuzz_minutes)
    return code


if __name__ == "__main__":
    sys.exit(main())
