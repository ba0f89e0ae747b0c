"""One-shot CLI commands as whole processes against the smallest grpcio scripts (issue 19).

``./dev bench cli [--rounds N] [--quick] [--no-doc]`` (or ``python -m benchmarks.cli``).

A user meets the CLI as a process: its wall time from spawn to exit is the figure, whatever
happens inside (interpreter start, imports, TLS, the call, printing). So this benchmark
knows nothing of the CLI's internals; it starts its own ``trio-jobs serve --port 0`` in a
temporary ``TRIO_JOBS_HOME`` (the server creates the development PKI there) and runs, in
one run, alternated round-robin:

- ``trio-jobs status JOB`` (JOB: a ``/bin/true`` job that has ended), ``trio-jobs start --
  /bin/true`` and ``trio-jobs list``, the console script of this virtualenv;
- the same three calls made by the smallest grpcio scripts, ``benchmarks/grpc_status.py``,
  ``grpc_start.py`` and ``grpc_list.py`` (python, ``import grpc``, one secure channel with
  the admin certificate of ``TRIO_JOBS_HOME/pki``, one call, print the answer), with the
  same interpreter;
- two floors: ``python -c pass`` (the interpreter and this virtualenv's ``.pth`` files,
  which every process above pays) and ``trio-jobs --version`` (the CLI with no network).

The order of the processes rotates by one every round, so each sits in each position
equally often. Figures: median and p90 wall time of each, our median over grpcio's (goal
<= 0.6x, never above 1.0x) with the range of that ratio over the rounds, the median CPU
time of each process (user + system, from ``getrusage(RUSAGE_CHILDREN)``), and what its
imports cost, from separate runs (a profiler slows what it measures):

- *modules* and *importtime*: each process run once more per ``--import-runs`` with
  ``PYTHONPROFILEIMPORTTIME=1`` (``-X importtime``): how many modules it loaded, whatever
  triggered them (a lazy import during the call counts), and the sum of the profiler's
  ``self`` column, the interpreter's own startup imports included. That sum is wall-clock
  time taken inside the import machinery, so a loaded machine stretches it (it then
  exceeds the whole process's CPU time) and it misses part of the finders' work.
- *imports*, the figure to read: the same modules imported without the profiler. The
  top-level imports of the profiled run, in their order, are replayed as ``python -c
  "import M1, M2, ..."``; its CPU time minus that of ``python -c pass`` (both alternated in
  the same rounds) is what the modules the command loads cost on top of the interpreter's
  start. CPU time, because a difference of two wall times drowns in a loaded machine's
  noise (imports are CPU-bound: on a quiet machine the two agree; the JSON line has both).
  Only processes: no knowledge of which module a command needs.

Every process gets the same environment: ``TRIO_JOBS_HOME``, ``TRIO_JOBS_SERVER``,
``TRIO_JOBS_IDENTITY=admin``, and compiled modules in a cache of the run
(``PYTHONPYCACHEPREFIX``, written by the warm-up runs), as an installed package has them;
coverage's subprocess hooks are removed. Each process's output is checked (exit code 0, the
job id where one is expected), so a broken command cannot look fast.

``--tree DIR`` runs every process (server, CLI, the scripts' ``trio_jobs.v1`` messages) on
the ``trio_jobs`` of another checkout (``PYTHONPATH=DIR``, ahead of the editable install),
e.g. ``git clone --shared . /tmp/before`` for a before/after on the same machine, through a
console script written as pip writes it for the entry point that checkout's pyproject
declares; the docs stamp then names that checkout's commit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from benchmarks import docblock
from benchmarks.e2e.harness import percentile, read_line, remove_cgroup_dirs

ROOT: Final = Path(__file__).resolve().parents[1]
DOC: Final = ROOT / "docs" / "benchmarks.md"
PYTHON: Final = sys.executable
BENCH: Final = Path(__file__).resolve().parent
STARTUP_TIMEOUT: Final = 120.0
RUN_TIMEOUT: Final = 60.0
COMMANDS: Final = ("status", "start", "list")
GOAL: Final = 0.6
BEGIN: Final = "<!-- cli-bench:begin -->"
END: Final = "<!-- cli-bench:end -->"
RESULTS_BEGIN: Final = "<!-- cli-bench:results:begin (written by python -m benchmarks.cli) -->"
RESULTS_END: Final = "<!-- cli-bench:results:end -->"
_LISTEN_RE: Final = re.compile(rb"listening on (\S+):(\d+)")
_IMPORT_RE: Final = re.compile(r"^import time:\s+(\d+) \|\s+\d+ \| ( *)(\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Proc:
    """One process the rounds run. ``expect``: a regular expression its stdout must match."""

    key: str
    label: str
    argv: tuple[str, ...]
    expect: str = ""


@dataclass
class Samples:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    importtime: list[float] = field(default_factory=list)
    modules: list[int] = field(default_factory=list)
    replay_wall: list[float] = field(default_factory=list)
    replay_cpu: list[float] = field(default_factory=list)
    top_level: list[str] = field(default_factory=list)


def trio_jobs_bin(tree: Path | None = None, work: Path | None = None) -> str:
    """The console script of this interpreter's environment: what a user types. With
    ``tree``, the one that checkout's pyproject declares, written into ``work`` as pip
    writes it (the installed script names this checkout's entry point, which an older tree
    may not have)."""
    if tree is not None and work is not None:
        entry = tomllib.loads((tree / "pyproject.toml").read_text())["project"]["scripts"]["trio-jobs"]
        module, _, function = entry.partition(":")
        script = work / "trio-jobs"
        script.write_text(f"#!{PYTHON}\nimport sys\nfrom {module} import {function}\n"
                          f"if __name__ == '__main__':\n    sys.exit({function}())\n")
        script.chmod(0o755)
        return str(script)
    script = Path(PYTHON).with_name("trio-jobs")
    if not script.exists():
        raise SystemExit(f"no {script}: install trio-jobs into this environment (./dev setup)")
    return str(script)


def child_env(home: Path, pycache: Path, tree: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRIO_JOBS_", "COV_CORE_", "COVERAGE_PROCESS_"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPROFILEIMPORTTIME", None)
    env.update(TRIO_JOBS_HOME=str(home), TRIO_JOBS_IDENTITY="admin", PYTHONPYCACHEPREFIX=str(pycache))
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


class Server:
    """``trio-jobs serve --port 0`` in its own session and cgroup parent; SIGTERM at the end."""

    def __init__(self, env: dict[str, str], log: Path, script: str) -> None:
        self.cgroup_parent = f"trio-jobs-bench-cli-{uuid.uuid4().hex[:12]}"
        self.log = log
        argv = [script, "serve", "--port", "0", "--cgroup-parent", self.cgroup_parent]
        with log.open("wb") as err:
            self.proc = subprocess.Popen(argv, env=env, cwd=env["TRIO_JOBS_HOME"], stdout=subprocess.PIPE, stderr=err,
                                         start_new_session=True)
        assert self.proc.stdout is not None
        try:
            line = read_line(self.proc.stdout, STARTUP_TIMEOUT)
            m = _LISTEN_RE.search(line)
            if m is None:
                raise RuntimeError(f"trio-jobs serve did not start: {line!r} {log.read_text(errors='replace')[-2000:]}")
        except BaseException:
            self.close()
            raise
        self.address = f"{m.group(1).decode()}:{m.group(2).decode()}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=60)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        remove_cgroup_dirs(self.cgroup_parent)


def run(proc: Proc, env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Wall and CPU seconds of one process, from spawn to reaped; refuses a failed run.

    The working directory is the run's home, not the checkout: ``python -c`` puts it first
    on ``sys.path``, where it would shadow ``--tree`` and the installed package."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(proc.argv, env=env, cwd=env["TRIO_JOBS_HOME"], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if done.returncode != 0 or not re.search(proc.expect, done.stdout, re.MULTILINE):
        raise SystemExit(f"{proc.label}: exit {done.returncode}, expected {proc.expect!r} in its output\n"
                         f"stdout: {done.stdout[-1000:]}\nstderr: {done.stderr[-2000:]}")
    return wall, cpu, done


def import_figures(stderr: str) -> tuple[float, int, list[str]]:
    """From ``-X importtime`` output: seconds (the sum of its self column), modules imported,
    and the top-level imports in their order (what importing them again reproduces)."""
    rows = _IMPORT_RE.findall(stderr)
    top = list(dict.fromkeys(name for _, indent, name in rows if not indent))
    return sum(int(us) for us, _, _ in rows) / 1e6, len(rows), top


def processes(tj: str, job: str) -> list[Proc]:
    grpc_script = {cmd: str(BENCH / f"grpc_{cmd}.py") for cmd in COMMANDS}
    return [
        Proc("status/ours", "trio-jobs status JOB", (tj, "status", job), job),
        Proc("status/grpcio", "grpc_status.py JOB", (PYTHON, grpc_script["status"], job), job),
        Proc("start/ours", "trio-jobs start -- /bin/true", (tj, "start", "--", "/bin/true"), "^[0-9a-f-]{36}$"),
        Proc("start/grpcio", "grpc_start.py /bin/true", (PYTHON, grpc_script["start"], "/bin/true"), "job_id"),
        Proc("list/ours", "trio-jobs list", (tj, "list"), job),
        Proc("list/grpcio", "grpc_list.py", (PYTHON, grpc_script["list"]), job),
        Proc("floor/python", "python -c pass", (PYTHON, "-c", "pass")),
        Proc("floor/version", "trio-jobs --version", (tj, "--version"), "trio-jobs"),
    ]


def measure(
    rounds: int, warmup: int, import_runs: int, work: Path, tree: Path | None
) -> tuple[list[Proc], dict[str, Samples], list[list[float]]]:
    """Start a server, then warm-up, timed rounds and import runs; per-round ratios too."""
    env = child_env(work / "home", work / "pycache", tree)
    (work / "home").mkdir(mode=0o700)
    tj = trio_jobs_bin(tree, work)
    server = Server(env, work / "serve.stderr", tj)
    try:
        env["TRIO_JOBS_SERVER"] = server.address
        _, _, started = run(Proc("setup", "trio-jobs start -- /bin/true", (tj, "start", "--", "/bin/true")), env)
        job = started.stdout.strip().splitlines()[-1].strip() if started.stdout.strip() else ""
        try:
            uuid.UUID(job)
        except ValueError:
            raise SystemExit(f"trio-jobs start printed no job id: {started.stdout!r}") from None
        procs = processes(tj, job)
        for _ in range(warmup):  # also writes the compiled modules of every process
            for p in procs:
                run(p, env)
        # the status figure is the status of an ended job (the common case)
        _, _, shown = run(procs[1], env)
        if "JOB_STATE_EXITED" not in shown.stdout:
            raise SystemExit(f"job {job} has not ended: {shown.stdout}")
        samples = {p.key: Samples() for p in procs}
        ratios: list[list[float]] = [[] for _ in COMMANDS]
        for r in range(rounds):
            order = procs[r % len(procs):] + procs[: r % len(procs)]
            this: dict[str, float] = {}
            for p in order:
                wall, cpu, _ = run(p, env)
                samples[p.key].wall.append(wall)
                samples[p.key].cpu.append(cpu)
                this[p.key] = wall
            for i, cmd in enumerate(COMMANDS):
                ratios[i].append(this[f"{cmd}/ours"] / this[f"{cmd}/grpcio"])
            print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v * 1e3:.0f}" for k, v in this.items()) + " ms",
                  file=sys.stderr, flush=True)
        ienv = dict(env, PYTHONPROFILEIMPORTTIME="1")
        for r in range(import_runs):
            for p in procs[r % len(procs):] + procs[: r % len(procs)]:
                _, _, done = run(p, ienv)
                seconds, count, top = import_figures(done.stderr)
                if count == 0:
                    raise SystemExit(f"{p.label}: no -X importtime output")
                samples[p.key].importtime.append(seconds)
                samples[p.key].modules.append(count)
                samples[p.key].top_level = top
        replays = [Proc(p.key, f"replay of {p.label}", (PYTHON, "-c", "import " + ", ".join(samples[p.key].top_level)))
                   for p in procs]
        replays.append(Proc("base", "python -c pass", (PYTHON, "-c", "pass")))
        samples["base"] = Samples()
        for r in range(import_runs):
            for p in replays[r % len(replays):] + replays[: r % len(replays)]:
                wall, cpu, _ = run(p, env)
                samples[p.key].replay_wall.append(wall)
                samples[p.key].replay_cpu.append(cpu)
    finally:
        server.close()
    return procs, samples, ratios


@dataclass(frozen=True)
class Figures:
    """The medians (and p90) of one process, in milliseconds."""

    label: str
    p50: float
    p90: float
    cpu: float
    imports: float
    imports_wall: float
    importtime: float
    modules: int

    @classmethod
    def of(cls, label: str, s: Samples, base: Samples) -> Figures:
        def ms(xs: list[float]) -> float:
            return statistics.median(xs) * 1e3

        return cls(label, ms(s.wall), percentile(s.wall, 90) * 1e3, ms(s.cpu), ms(s.replay_cpu) - ms(base.replay_cpu),
                   ms(s.replay_wall) - ms(base.replay_wall), ms(s.importtime), round(statistics.median(s.modules)))


def verdict(ratio: float) -> str:
    if ratio <= GOAL:
        return f"≤ {GOAL} (meets)"
    return f"≤ {GOAL} (misses" + (", above 1.0x)" if ratio > 1.0 else ")")


def tables(figs: dict[str, Figures], ratios: list[list[float]]) -> str:
    lines = [
        "| command | trio-jobs p50 | p90 | grpcio script p50 | p90 | ratio of p50s | ratio per round | goal |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, cmd in enumerate(COMMANDS):
        ours, theirs = figs[f"{cmd}/ours"], figs[f"{cmd}/grpcio"]
        ratio = ours.p50 / theirs.p50
        lines.append(f"| `{ours.label}` | {ours.p50:.0f} ms | {ours.p90:.0f} ms | {theirs.p50:.0f} ms | {theirs.p90:.0f} ms "
                     f"| {ratio:.2f}x | {min(ratios[i]):.2f}-{max(ratios[i]):.2f}x | {verdict(ratio)} |")
    for key in ("floor/python", "floor/version"):
        f = figs[key]
        lines.append(f"| `{f.label}` (floor) | {f.p50:.0f} ms | {f.p90:.0f} ms | | | | | |")
    lines += [
        "",
        "| process | wall p50 | CPU p50 | imports (CPU) | modules | -X importtime Σ self |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for f in figs.values():
        lines.append(f"| `{f.label}` | {f.p50:.0f} ms | {f.cpu:.0f} ms | {round(f.imports)} ms | {f.modules:,} "
                     f"| {f.importtime:.0f} ms |")
    return "\n".join(lines)


RESULTS: Final = docblock.Markers(RESULTS_BEGIN, RESULTS_END)
DISTS: Final = ("trio", "grpcio", "protobuf")


def write_doc(block: str, doc: Path = DOC) -> None:
    """Replace our results block in docs/benchmarks.md; append a bare section if there is none."""
    docblock.replace_block(doc, block, RESULTS, new_section=f"{BEGIN}\n## One-shot CLI commands (`benchmarks/cli.py`)\n\n{{results}}\n{END}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cli", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of every process (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--import-runs", type=int, default=5, help="-X importtime runs of every process (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, no warm-up, 1 import run; writes nothing")
    parser.add_argument("--no-doc", action="store_true", help="do not write docs/benchmarks.md")
    parser.add_argument("--tree", type=Path, help="run trio_jobs from this checkout (PYTHONPATH) instead of the installed one")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.import_runs = 2, 0, 1
    if min(args.rounds, args.warmup + 1, args.import_runs) < 1:
        parser.error("--rounds and --import-runs must be at least 1, --warmup at least 0")
    tree = args.tree.resolve() if args.tree is not None else None
    if tree is not None and not (tree / "trio_jobs" / "__init__.py").is_file():
        parser.error(f"--tree {args.tree}: no trio_jobs package there")
    t0 = time.monotonic()
    load_before = docblock.load()
    with tempfile.TemporaryDirectory(prefix="trio-jobs-bench-cli-") as tmp:
        procs, samples, ratios = measure(args.rounds, args.warmup, args.import_runs, Path(tmp), tree)
    load_after = docblock.load()
    elapsed = time.monotonic() - t0
    figs = {p.key: Figures.of(p.label, samples[p.key], samples["base"]) for p in procs}
    body = tables(figs, ratios)
    print(f"load average before: {load_before}, after: {load_after}; {elapsed:.0f} s")
    print(body)
    summary = {
        "processes": {key: {k: round(v, 2) if isinstance(v, float) else v for k, v in vars(f).items()}
                      | {"wall_ms": [round(w * 1e3, 1) for w in samples[key].wall]} for key, f in figs.items()},
        "ratios": {cmd: round(figs[f"{cmd}/ours"].p50 / figs[f"{cmd}/grpcio"].p50, 3) for cmd in COMMANDS},
        "ratios_per_round": {cmd: [round(x, 3) for x in ratios[i]] for i, cmd in enumerate(COMMANDS)},
    }
    print(json.dumps(summary))  # last line: for scripts and the smoke test
    if args.quick or args.no_doc:
        return 0
    workload = (f"{args.rounds} rounds of the {len(procs)} processes after {args.warmup} warm-up round(s), order rotated "
                f"each round; {args.import_runs} -X importtime run(s) of each, then {args.import_runs} round(s) of the replays; one `trio-jobs serve --port 0` (default "
                f"policy, cgroups as the host has them); `list` answers with {1 + 2 * args.warmup} to "
                f"{1 + 2 * (args.warmup + args.rounds)} jobs as `start` adds them.")
    command = f"python -m benchmarks.cli --rounds {args.rounds}" + (f" --tree {args.tree}" if tree else "")
    block = docblock.block(RESULTS, [
        *docblock.stamp(command=command, seconds=elapsed, load=(load_before, load_after), workload=workload,
                        commit=docblock.commit_stamp(tree or ROOT), dists=DISTS),
        "",
        body,
    ])
    write_doc(block)
    print(f"wrote {DOC}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
