"""Run the rpc benchmark: ``python -m benchmarks.rpc [--quick] [--impls ours,grpcio] [--rounds N] [--status on|off|only]``.

For each peer the runner starts a server process, then a client process that measures the
three figures against it, then stops the server; the runner itself does no I/O-bound work.
The peers run in ``--rounds`` interleaved rounds (ours, grpcio, ..., then again) and each
figure is the median over the rounds: this machine's speed drifts by up to 2x within
minutes, which one run per peer mistakes for a difference between the peers.
Each round ends with the status phase (benchmarks/rpc/status.py): the whole trio-jobs
server's GetJobStatus of an ended job against grpcio's server's trivial unary call, with the
grpcio client (``--status off`` skips it, ``--status only`` runs nothing else).
A full run writes its tables into docs/benchmarks.md (between the rpc markers, and the
status phase's between its own); ``--quick`` is a smoke run of a few seconds that writes
nothing. Exit status 1 if any peer (or the status phase) failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from benchmarks.rpc.common import (
    IMPLS,
    Result,
    StatusResult,
    Workload,
    generate_code,
    make_pki,
    median_result,
    median_status,
    start_ready_server,
    stop_server,
)
from benchmarks.rpc.report import (
    STATUS_BEGIN,
    STATUS_END,
    render_doc_section,
    render_status_section,
    render_status_table,
    render_table,
    replace_doc_section,
)
from benchmarks.rpc.status import run_status

ROOT: Final = Path(__file__).resolve().parents[2]
DOC: Final = ROOT / "docs" / "benchmarks.md"


def _worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.rpc.worker", *args]


def _start_server(
    impl: str, pki: Path, gen: Path, profile: Path | None
) -> tuple[subprocess.Popen[bytes], int]:
    extra = ["--profile", str(profile)] if profile is not None else []
    return start_ready_server(
        _worker("server", impl, "--pki", str(pki), "--gen", str(gen), *extra), ROOT, impl
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_server(proc, timeout=15)


def run_peer(
    impl: str, pki: Path, gen: Path, work: Workload, timeout: float, profile: Path | None = None
) -> Result:
    server, port = _start_server(impl, pki, gen, profile)
    try:
        done = subprocess.run(
            _worker(
                "client",
                impl,
                "--port",
                str(port),
                "--pki",
                str(pki),
                "--gen",
                str(gen),
                "--work",
                work.to_json(),
            ),
            capture_output=True,
            timeout=timeout,
            cwd=ROOT,
            check=False,
        )
    finally:
        _stop(server)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{impl} client exited {done.returncode}: " + " | ".join(tail))
    return Result.from_json(done.stdout.decode().strip().splitlines()[-1])


def _print_profile(path: Path, limit: int) -> None:
    print(f"\ncProfile of our server (top {limit} by internal time; stats in {path}):")
    stats = pstats.Stats(str(path), stream=sys.stdout)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rpc", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    parser.add_argument("--no-doc", action="store_true", help=f"do not rewrite {DOC}")
    parser.add_argument("--profile", type=Path, help="cProfile our server into this file")
    parser.add_argument("--timeout", type=float, default=600.0, help="per client process")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, --quick 1)")
    parser.add_argument(
        "--status",
        choices=("on", "off", "only"),
        default="on",
        help="the status phase: GetJobStatus of an ended job against grpcio's trivial unary (default on)",
    )
    parser.add_argument(
        "--work",
        metavar="JSON",
        help='override workload fields, e.g. \'{"c64_calls": 64, "stream_count": 2}\' to profile '
        "mostly unary calls; implies --no-doc",
    )
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        parser.error("--rounds must be >= 1")
    impls = [i for i in args.impls.split(",") if i] if args.status != "only" else []
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {list(IMPLS)}")
    work = Workload.quick() if args.quick else Workload()
    if args.work is not None:
        try:
            work = dataclasses.replace(work, **json.loads(args.work))
        except (ValueError, TypeError) as exc:
            parser.error(f"--work: {exc}; fields: {', '.join(f.name for f in dataclasses.fields(Workload))}")
        args.no_doc = True
    runs: dict[str, list[Result]] = {impl: [] for impl in impls}
    failures: dict[str, str] = {}
    status_runs: list[StatusResult] = []
    status_failure: str | None = None
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="trio-jobs-bench-") as tmp:
        gen, pki = Path(tmp) / "gen", Path(tmp) / "pki"
        generate_code(gen)
        make_pki(pki)
        for n in range(rounds):
            for impl in impls:
                if impl in failures:
                    continue
                print(f"round {n + 1}/{rounds}: {impl} ...", file=sys.stderr, flush=True)
                profile = args.profile if impl == "ours" and n == 0 else None
                try:
                    runs[impl].append(run_peer(impl, pki, gen, work, args.timeout, profile))
                except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
                    failures[impl] = str(exc)
                    print(f"{impl} FAILED: {exc}", file=sys.stderr)
            if args.status != "off" and status_failure is None:
                print(f"round {n + 1}/{rounds}: status ...", file=sys.stderr, flush=True)
                try:
                    status_runs.append(run_status(pki, work, args.timeout, ROOT))
                except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
                    status_failure = str(exc)
                    print(f"status FAILED: {exc}", file=sys.stderr)
    results = {impl: median_result(r) for impl, r in runs.items() if r and impl not in failures}
    table = render_table(results, failures, rounds={i: r for i, r in runs.items() if i in results}) if impls else ""
    if impls:
        print(table)
    status_table = None
    if status_runs and status_failure is None:
        status_table = render_status_table(median_status(status_runs), status_runs)
        print("\nGetJobStatus of an ended job, against grpcio's server:\n" + status_table)
    elif status_failure is not None:
        print(f"\nstatus phase failed: {status_failure}")
    if args.profile is not None and args.profile.exists():
        _print_profile(args.profile, 25)
    # A profiled run is slower than it should be: it never goes into the docs.
    writes_doc = not args.quick and not args.no_doc and args.profile is None
    if writes_doc and status_table is not None:
        replace_doc_section(
            DOC,
            render_status_section(status_table, work=work, load_before=load_before, load_after=os.getloadavg(),
                                  command="python -m benchmarks.rpc" + (" --status only" if args.status == "only" else ""),
                                  rounds=rounds),
            begin=STATUS_BEGIN,
            end=STATUS_END,
        )
        print(f"wrote the status section of {DOC}", file=sys.stderr)
    if writes_doc and results:
        section = render_doc_section(
            table,
            work=work,
            load_before=load_before,
            load_after=os.getloadavg(),
            seconds=time.time() - started,
            command="python -m benchmarks.rpc",
            rounds=rounds,
        )
        replace_doc_section(DOC, section)
        print(f"wrote {DOC}", file=sys.stderr)
    return 1 if failures or status_failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
