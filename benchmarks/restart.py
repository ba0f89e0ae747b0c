"""Restart cost with a long history (issue 17): a real ``trio-jobs serve`` on an empty data
directory and on one holding 100,000 ended jobs, side by side.

``python -m benchmarks.restart [--jobs 100000] [--runs 5]`` (or ``./dev bench restart``).

The history is written straight through the store (``JobStore.insert_many_blocking``, one
transaction per 10,000 records) with an output file per job, not by running 100,000 jobs:
what a restart meets is the database and the output directory, not how they were filled.
Besides the ordinary jobs (``/bin/echo`` with a few short arguments), ``--big-jobs`` jobs
carry ``--big-arg-bytes`` of arguments each -- the operator's report of issue 17 was 40
jobs with large argument lists, a 36 MiB database and a 120 MB restart peak.

Figures, per data directory, the median of ``--runs`` restarts of a real server process
(``python -m trio_jobs.cli serve --port 0``, cgroups as the host offers them):

- *listening*: from the process's spawn to its ``trio-jobs listening on`` line;
- *VmHWM*: the peak resident set of the process (``/proc/PID/status``) at that moment and
  again ``--settle`` seconds later (after the first retention pass, which runs in the
  background once the server listens).

Goal: with history, listening < 1 s and the peak < +20 MiB over the empty directory.
``--server-tree DIR`` runs the server from another checkout (e.g. ``git archive HEAD``
unpacked) for a before/after comparison on the same data.

Writes the table, stamped, into docs/benchmarks.md between the markers of ``MARKERS``
(``--no-doc``: print only, as a ``--server-tree`` run does; ``--doc FILE``: another file).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import trio

from benchmarks import docblock
from benchmarks.e2e.harness import read_line, remove_cgroup_dirs, status_bytes
from trio_jobs.security.pki import init_dev_pki
from trio_jobs.worker import JobState, JobStatus, Limits, Usage
from trio_jobs.worker.store import JobStore
from trio_jobs.worker.worker import DB_NAME, OUTPUT_DIR

MiB: Final = 1 << 20
CHUNK: Final = 10_000
STARTUP_TIMEOUT: Final = 120.0
DOC: Final = docblock.ROOT / "docs" / "benchmarks.md"
MARKERS: Final = docblock.Markers.of("restart-bench", "benchmarks.restart")


def _status(i: int, ended_at: datetime, args: tuple[str, ...], output: int) -> JobStatus:
    return JobStatus(
        job_id=str(uuid.uuid4()), owner="admin" if i % 3 else "alice", command="/bin/echo", args=args,
        state=JobState.EXITED, exit_code=0, signal=None, stopped_by_user=False, oom_killed=False,
        stopped_by_shutdown=False, created_at=ended_at - timedelta(milliseconds=5), ended_at=ended_at,
        limits=Limits(cpu_millis=2000, memory_bytes=1_048_576_000, pids_max=4096),
        usage=Usage(cpu_usec=1200, memory_peak_bytes=2_000_000), output_bytes=output, output_truncated=False,
    )


async def write_history(data: Path, jobs: int, big_jobs: int, big_arg_bytes: int) -> float:
    """``jobs`` ended jobs (``big_jobs`` of them with big argument lists), ended over the last
    10 days: inside every default limit, so retention deletes none; seconds taken."""
    t0 = time.perf_counter()
    out_dir = data / OUTPUT_DIR
    out_dir.mkdir(parents=True, mode=0o700)
    store = await JobStore.open(data / DB_NAME)
    now = datetime.now(UTC)
    total = jobs
    big_every = total // big_jobs if big_jobs else 0
    output = b"hello from a job of the history\n"
    try:
        for start in range(0, total, CHUNK):
            batch = []
            for i in range(start, min(start + CHUNK, total)):
                ended_at = now - timedelta(days=10) + timedelta(seconds=i * 8.6)
                if big_every and i % big_every == 0:
                    args: tuple[str, ...] = tuple("a" * 1000 for _ in range(big_arg_bytes // 1000))
                else:
                    args = ("hello", f"job-{i}", "--flag=value")
                batch.append(_status(i, ended_at, args, len(output)))

            def write(batch: list[JobStatus] = batch) -> None:
                store.insert_many_blocking(batch)
                for status in batch:
                    fd = os.open(out_dir / f"{status.job_id}.out", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    os.write(fd, output)
                    os.close(fd)

            await trio.to_thread.run_sync(write)
    finally:
        await store.aclose()
    return time.perf_counter() - t0


def one_restart(home: Path, settle: float, server_tree: Path | None, pycache: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_JOBS_")}
    env["TRIO_JOBS_HOME"] = str(home)
    # Compiled modules, as an installed package has them (outside the source tree): without
    # them every start compiles ~180 modules, ~0.5 s that has nothing to do with history.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    cwd = None
    if server_tree is not None:
        env["PYTHONPATH"] = str(server_tree)
        cwd = str(server_tree)
    parent = f"trio-jobs-bench-{uuid.uuid4().hex[:12]}"
    argv = [sys.executable, "-m", "trio_jobs.cli", "serve", "--port", "0", "--cgroup-parent", parent]
    err_path = home / "serve.stderr"
    with err_path.open("wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd, start_new_session=True)
    try:
        assert proc.stdout is not None
        line = read_line(proc.stdout, STARTUP_TIMEOUT)
        listening = time.perf_counter() - t0
        if b"listening on" not in line:
            raise SystemExit(f"server did not start: {line!r}: {err_path.read_text()[-2000:]}")
        hwm_listening = status_bytes(proc.pid, "VmHWM")
        time.sleep(settle)
        hwm_settled = status_bytes(proc.pid, "VmHWM")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        remove_cgroup_dirs(parent)  # what a server that had to be killed left
    return {"listening_s": listening, "hwm_listening_mib": hwm_listening / MiB, "hwm_settled_mib": hwm_settled / MiB}


def measure(home: Path, runs: int, settle: float, server_tree: Path | None, pycache: Path) -> dict[str, float]:
    one_restart(home, 0.0, server_tree, pycache)  # warm the page cache, compile the modules
    samples = [one_restart(home, settle, server_tree, pycache) for _ in range(runs)]
    return {key: statistics.median(s[key] for s in samples) for key in samples[0]}


def table(empty: dict[str, float], history: dict[str, float], settle: float) -> str:
    lines = ["| median of the restarts | empty data directory | with the history | history - empty |", "|---|---:|---:|---:|"]
    for key, label, unit in (("listening_s", "spawn -> listening", "s"),
                             ("hwm_listening_mib", "VmHWM at listening", "MiB"),
                             ("hwm_settled_mib", f"VmHWM {settle:g} s later", "MiB")):
        lines.append(f"| {label} | {empty[key]:.2f} {unit} | {history[key]:.2f} {unit} | {history[key] - empty[key]:+.2f} {unit} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.restart", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=100_000, help="ended jobs of history (the default --retain-jobs)")
    parser.add_argument("--big-jobs", type=int, default=40, help="how many of them have big argument lists")
    parser.add_argument("--big-arg-bytes", type=int, default=900_000, help="argument bytes of each big job")
    parser.add_argument("--runs", type=int, default=5, help="restarts measured per data directory")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before the second VmHWM reading")
    parser.add_argument("--dir", type=Path, help="work directory to keep (default: a temporary one)")
    parser.add_argument("--server-tree", type=Path, help="run the server from this source tree (implies --no-doc)")
    docblock.add_doc_arguments(parser, DOC)
    args = parser.parse_args(argv)
    writes_doc = not (args.no_doc or args.server_tree)
    if writes_doc:
        docblock.require_block(args.doc, MARKERS)
    t0, load_before = time.monotonic(), docblock.load()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        work = Path(tmp)
        homes = {"empty": work / "empty", "history": work / "history"}
        for home in homes.values():
            home.mkdir(mode=0o700)
            init_dev_pki(home / "pki")
        took = trio.run(write_history, homes["history"], args.jobs, args.big_jobs, args.big_arg_bytes)
        db_mib = sum(p.stat().st_size for p in homes["history"].glob(f"{DB_NAME}*")) / MiB
        print(f"history: {args.jobs} ended jobs ({args.big_jobs} with {args.big_arg_bytes} bytes of arguments) "
              f"written in {took:.1f} s "
              f"(database {db_mib:.1f} MiB)", file=sys.stderr)
        figures = {name: measure(home, args.runs, args.settle, args.server_tree, work / "pycache")
                   for name, home in homes.items()}
    load_after = docblock.load()
    empty, history = figures["empty"], figures["history"]
    body = table(empty, history, args.settle)
    print(body)
    ok = history["listening_s"] < 1.0 and history["hwm_settled_mib"] - empty["hwm_settled_mib"] < 20
    goal = f"Goal (with history: listening < 1 s, peak < +20 MiB over the empty directory): {'met' if ok else 'missed'}."
    print(goal)
    print(json.dumps({"jobs": args.jobs, "big_jobs": args.big_jobs, "db_mib": round(db_mib, 1),
                      "empty": empty, "history": history, "goal_met": ok}))
    if writes_doc:
        workload = (f"a real `trio-jobs serve --port 0` (cgroups as the host has them), restarted {args.runs} times "
                    f"(after one warm-up start) on an empty data directory and on one holding {args.jobs:,} ended jobs, "
                    f"{args.big_jobs} of them with {args.big_arg_bytes:,} bytes of arguments (database "
                    f"{db_mib:.1f} MiB, written through the store); medians of the restarts.")
        docblock.write_results(args.doc, MARKERS, module="benchmarks.restart", argv=argv, seconds=time.monotonic() - t0,
                               load=(load_before, load_after), workload=workload, body=[body, "", goal])


if __name__ == "__main__":
    main()
