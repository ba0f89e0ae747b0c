"""Run the rpc benchmark: ``python -m benchmarks.rpc [--quick] [--impls ours,grpcio] [--rounds N]
[--modes all|default] [--ab CHECKOUT [--ab-client checkout|here]] [--status on|off|only]``.

For each row the runner starts a server process, then a client process that measures the
figures against it (the server's CPU time too, read from outside around the streaming calls),
then stops the server; the runner itself does no I/O-bound work. The rows run in
``--rounds`` interleaved rounds (ours, grpcio, ..., then again) and each figure is the median
over the rounds: this machine's speed drifts by up to 2x within minutes, which one run per
peer mistakes for a difference between the peers.
Our layer has a row per rpc mode (``--modes all``, the default: transport lean or
ssl-stream, fast paths on or off; ``--modes default`` only lean with fast paths, the row
named ``trio_jobs.rpc``), and with ``--ab CHECKOUT`` a row of the ``trio_jobs`` of another
checkout (``git worktree add /tmp/trio-jobs-before COMMIT``): benchmarks/rpc/variants.py.
Our rows rotate their order from round to round and are compared with the default row
round by round.
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
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

from benchmarks.rpc.common import (
    IMPLS,
    RanAs,
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
    render_ran,
    render_status_section,
    render_status_table,
    render_table,
    replace_doc_section,
)
from benchmarks.rpc.status import run_status
from benchmarks.rpc.variants import ROOT, Peer, build_peers, check_ran, make_shim, round_order

DOC: Final = ROOT / "docs" / "benchmarks.md"


def _worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.rpc.worker", *args]


def _start_server(
    peer: Peer, pki: Path, gen: Path, profile: Path | None
) -> tuple[subprocess.Popen[bytes], int, RanAs]:
    extra = ["--profile", str(profile.resolve())] if profile is not None else []
    env, cwd = peer.launch("server")
    proc, port, said = start_ready_server(
        _worker("server", peer.impl, "--pki", str(pki), "--gen", str(gen), *extra), cwd, peer.label, env
    )
    return proc, port, RanAs.from_json(said)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    stop_server(proc, timeout=15)


def run_peer(
    peer: Peer, pki: Path, gen: Path, work: Workload, timeout: float, profile: Path | None = None
) -> tuple[Result, RanAs, RanAs]:
    """One round of one row: its figures, and what its server and its client ran (checked)."""
    server, port, server_ran = _start_server(peer, pki, gen, profile)
    try:
        check_ran(peer, "server", server_ran)
        env, cwd = peer.launch("client")
        done = subprocess.run(
            _worker(
                "client",
                peer.impl,
                "--port",
                str(port),
                "--server-pid",
                str(server.pid),
                "--pki",
                str(pki),
                "--gen",
                str(gen),
                "--work",
                work.to_json(),
            ),
            capture_output=True,
            timeout=timeout,
            cwd=cwd,
            env=env,
            check=False,
        )
    finally:
        _stop(server)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"{peer.label} client exited {done.returncode}: " + " | ".join(tail))
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    client_ran = RanAs(**out["ran"])
    check_ran(peer, "client", client_ran)
    return Result(**out["result"]), server_ran, client_ran


def _print_profile(path: Path, limit: int) -> None:
    print(f"\ncProfile of our server (top {limit} by internal time; stats in {path}):")
    stats = pstats.Stats(str(path), stream=sys.stdout)
    stats.strip_dirs().sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rpc", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    parser.add_argument(
        "--modes",
        choices=("all", "default"),
        default="all",
        help="our layer in each rpc mode (transport x fast paths; default) or only the default one",
    )
    parser.add_argument(
        "--ab",
        type=Path,
        metavar="CHECKOUT",
        help="add a row of our layer with the trio_jobs of this checkout (git worktree add ... COMMIT)",
    )
    parser.add_argument(
        "--ab-client",
        choices=("checkout", "here"),
        default="checkout",
        help="--ab row: run its client from the checkout too (default: the whole layer then and now) "
        "or from here (only the server differs)",
    )
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
    if args.ab is not None:
        if not (args.ab / "trio_jobs" / "__init__.py").is_file():
            parser.error(f"--ab {args.ab}: no trio_jobs package there")
        if "ours" not in impls:
            parser.error("--ab compares with our layer: --impls must include ours")
    work = Workload.quick() if args.quick else Workload()
    if args.work is not None:
        try:
            work = dataclasses.replace(work, **json.loads(args.work))
        except (ValueError, TypeError) as exc:
            parser.error(f"--work: {exc}; fields: {', '.join(f.name for f in dataclasses.fields(Workload))}")
        args.no_doc = True
    failures: dict[str, str] = {}
    ran: dict[str, tuple[RanAs, RanAs]] = {}
    status_runs: list[StatusResult] = []
    status_failure: str | None = None
    started = time.time()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="trio-jobs-bench-") as tmp:
        gen, pki = Path(tmp) / "gen", Path(tmp) / "pki"
        generate_code(gen)
        make_pki(pki)
        shim = make_shim(args.ab, Path(tmp)) if args.ab is not None else None
        peers = build_peers(impls, all_modes=args.modes == "all", ab=args.ab,
                            ab_client=args.ab_client == "checkout", shim=shim)
        runs: dict[str, list[Result]] = {p.key: [] for p in peers}
        for n in range(rounds):
            for peer in round_order(peers, n):
                if peer.key in failures:
                    continue
                print(f"round {n + 1}/{rounds}: {peer.label} ...", file=sys.stderr, flush=True)
                profile = args.profile if peer.is_default and n == 0 else None
                try:
                    result, server_ran, client_ran = run_peer(peer, pki, gen, work, args.timeout, profile)
                except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError, TypeError) as exc:
                    failures[peer.key] = str(exc)
                    print(f"{peer.label} FAILED: {exc}", file=sys.stderr)
                else:
                    runs[peer.key].append(result)
                    if peer.is_ours:
                        ran.setdefault(peer.key, (server_ran, client_ran))
            if args.status != "off" and status_failure is None:
                print(f"round {n + 1}/{rounds}: status ...", file=sys.stderr, flush=True)
                try:
                    status_runs.append(run_status(pki, work, args.timeout, ROOT))
                except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
                    status_failure = str(exc)
                    print(f"status FAILED: {exc}", file=sys.stderr)
    results = {key: median_result(r) for key, r in runs.items() if r and key not in failures}
    table = render_table(peers, results, failures, rounds={k: r for k, r in runs.items() if k in results}) if impls else ""
    ran_table = render_ran(peers, ran) if ran else ""
    if impls:
        print(table)
    if ran_table:
        print("\nWhat the processes of our rows reported running:\n" + ran_table)
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
        from benchmarks.docblock import commit_stamp

        before = None
        if args.ab is not None:
            sides = "server and client" if args.ab_client == "checkout" else "server (the client is this checkout's)"
            before = f"the trio_jobs of {args.ab} ({commit_stamp(args.ab)}) in its {sides}"
        section = render_doc_section(
            table,
            work=work,
            load_before=load_before,
            load_after=os.getloadavg(),
            seconds=time.time() - started,
            command=" ".join(["python -m benchmarks.rpc", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]),
            rounds=rounds,
            stamp=commit_stamp(ROOT),
            ran=ran_table,
            before=before,
        )
        replace_doc_section(DOC, section)
        print(f"wrote {DOC}", file=sys.stderr)
    print(f"{time.time() - started:.0f} s", file=sys.stderr)
    return 1 if failures or status_failure is not None else 0


if __name__ == "__main__":
    sys.exit(main())
