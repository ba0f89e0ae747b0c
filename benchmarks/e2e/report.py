"""The ratio table, the docs/benchmarks.md section and the charts of the e2e benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from benchmarks import docblock

if TYPE_CHECKING:
    from collections.abc import Sequence

ROOT: Final = Path(__file__).resolve().parents[2]
DOC: Final = ROOT / "docs" / "benchmarks.md"
IMG: Final = ROOT / "docs" / "img"
BEGIN: Final = "<!-- e2e-bench:begin -->"
END: Final = "<!-- e2e-bench:end -->"
RESULTS_BEGIN: Final = "<!-- e2e-bench:results:begin (written by python -m benchmarks.e2e) -->"
RESULTS_END: Final = "<!-- e2e-bench:results:end -->"
CHARTS: Final = ("e2e-start.png", "e2e-throughput.png", "e2e-latency.png")


@dataclass(frozen=True, kw_only=True)
class Row:
    """One figure next to its ceiling (or baseline), both measured in the same run.

    ``ceiling=None``: a figure with only an absolute target (a memory bound): it has no
    ratio, rather than one against the target's number."""

    figure: str
    value: float
    unit: str
    ceiling: float | None = None
    ceiling_name: str = ""
    target: str = ""
    ok: bool | None = None  # None: no target

    @property
    def ratio(self) -> float | None:
        if self.ceiling is None:
            return None
        return self.value / self.ceiling if self.ceiling else float("nan")


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| figure | measured | ceiling / baseline | ratio | target |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        verdict = "" if r.ok is None else (" (meets)" if r.ok else " (misses)")
        ceiling = "none: an absolute target" if r.ceiling is None else f"{_num(r.ceiling)} {r.unit} ({r.ceiling_name})"
        ratio = "--" if r.ratio is None else f"{r.ratio:.2f}x"
        lines.append(f"| {r.figure} | {_num(r.value)} {r.unit} | {ceiling} | {ratio} | {r.target}{verdict} |")
    return "\n".join(lines)


def targets(rows: Sequence[Row]) -> str:
    """One line on the targets, written with the table, so that prose need not restate it."""
    judged = [r for r in rows if r.ok is not None]
    missed = [r.figure.strip() for r in judged if not r.ok]
    return f"Targets: {len(judged) - len(missed)} of {len(judged)} met" + (
        f"; missed: {'; '.join(missed)}." if missed else "."
    )


RESULTS: Final = docblock.Markers(RESULTS_BEGIN, RESULTS_END)


def results_block(*, stamp: list[str], rows: Sequence[Row], charts: bool, profile: str) -> str:
    """``stamp``: :func:`benchmarks.docblock.stamp`'s lines."""
    parts = [*stamp, "", table(rows), "", targets(rows), ""]
    if charts:
        parts += [f"![{name[:-4]}](img/{name})" for name in CHARTS] + [""]
    else:
        parts += ["(charts skipped: matplotlib is not installed; `./dev bench e2e` installs it)", ""]
    if profile:
        parts += [profile, ""]
    return docblock.block(RESULTS, parts)


def write_doc(block: str, default_section: str, doc: Path = DOC) -> None:
    """Replace our results block; add our whole section at the end if it is not there yet."""
    docblock.replace_block(doc, block, RESULTS, new_section=default_section)


def charts(figures: dict[str, dict[str, float]], fanout_counts: Sequence[int]) -> bool:
    """Write the PNG charts into docs/img; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    IMG.mkdir(parents=True, exist_ok=True)
    ceil = figures["ceiling"]
    # 1. job start latency vs ceilings
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = ["no cgroups", "cgroups"]
    starts = [figures["start_none"], figures.get("start_cg", figures["start_none"])]
    xs = range(len(labels))
    bars = (("p50_ms", "StartJob p50"), ("ceiling_p50_ms", "ceiling p50"),
            ("p99_ms", "StartJob p99"), ("ceiling_p99_ms", "ceiling p99"))  # fmt: skip
    for i, (key, label) in enumerate(bars):
        ax.bar([x + (i - 1.5) * 0.2 for x in xs], [s[key] for s in starts], 0.2, label=label)
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms")
    ax.set_title("Job start, to exec (ceiling: [cgroup dirs +] posix_spawn of /bin/true)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / CHARTS[0], dpi=100)
    plt.close(fig)
    # 2. throughput
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = ["bare TLS\n(ceiling)", "tail x1"]
    values = [ceil["tls_mbps"], figures["stream"]["mbps"]]
    colors = ["grey", "tab:blue"]
    for n in fanout_counts:
        names += [f"x{n}\nlive", f"x{n}\nreplay"]
        values += [figures[f"fanout-{n}"]["live_mbps"], figures[f"fanout-{n}"]["replay_mbps"]]
        colors += ["tab:blue", "tab:orange"]
    ax.bar(names, values, color=colors)
    ax.set_ylabel("MB/s")
    ax.set_title("Output streaming over mutual TLS on loopback (fan-out: aggregate)")
    fig.tight_layout()
    fig.savefig(IMG / CHARTS[1], dpi=100)
    plt.close(fig)
    # 3. latencies against the 50 ms target
    fig, ax = plt.subplots(figsize=(8, 3.8))
    hist, iso = figures["history"], figures["isolation"]
    names = ["status\n10 jobs", "status\n10k jobs", "list\n10 jobs", "list\n10k jobs",
             "bob status\nidle", "bob status\nflood", "bob's lines\nflood"]  # fmt: skip
    values = [hist["status_few_p99_ms"], hist["status_p99_ms"], hist["list_few_p99_ms"], hist["list_p99_ms"],
              iso["status_idle_p99_ms"], iso["status_flood_p99_ms"], iso["bob_p99_delay_ms"]]  # fmt: skip
    ax.bar(names, values)
    ax.set_yscale("log")
    ax.axhline(50, color="red", linestyle="--", label="target 50 ms")
    ax.set_ylabel("p99 ms (log scale)")
    ax.set_title("Latency p99: history size and a flooding neighbour")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / CHARTS[2], dpi=100)
    plt.close(fig)
    return True


DEFAULT_SECTION: Final = f"""{BEGIN}
## End to end (`benchmarks/e2e`)

```
./dev bench e2e                                # full run (~3 min), rewrites the results below
.venv/bin/python -m benchmarks.e2e --quick     # smoke run, ~10 s, writes nothing
.venv/bin/python -m benchmarks.e2e --no-doc --no-profile
```

**What runs.** Real servers, each in its own process (`benchmarks/e2e/server_main.py` runs
`trio_jobs.server.serve`, what `trio-jobs serve` runs; it can also force `NoCgroupDriver`,
which the CLI cannot, to measure job start with and without cgroups on the same host), a
development PKI, and clients over mutual TLS 1.3 on 127.0.0.1: this driver process
(`JobsClient`), the real `trio-jobs tail` CLI for the single follower and for alice's flood,
and a process of N `JobsClient.tail` followers (one connection each) for the fan-out. Every
ratio is against a ceiling or baseline measured in the same rounds as the figure:

- **Job start**: `StartJob` of `/bin/true`, one at a time, then 8 concurrent callers on one
  connection for jobs/s, in 5 rounds; the ceiling runs in the same rounds (first in one
  round, second in the next) in the driver's own cgroup. Like for like, two ways. *To
  exec*: the call to its answer (the worker answers once the job's process has executed its
  wrapper and been released, `worker/spawn.py`; the program's own run comes after) against
  `os.posix_spawn` of `/bin/true` alone, which returns once the child has executed (glibc
  clones with `CLONE_VFORK`; an exec failure is reported by the call itself), and with
  cgroups the mkdir and limit writes of one directory in each hierarchy the driver uses
  before it, timed as one span (so its p99 is the p99 of those sums; no process is moved
  into them, so it is below the server's minimum). *To exit*: the call until the job's end
  reaches the client (a follower's stream ends) against the same spawn plus `waitpid` and
  the directories' `rmdir` (the server removes a job's cgroup before it publishes its end);
  both include the program's run. Each start waits for the previous job's end, untimed, on
  both sides. The jobs/s ceiling: the same spawns back to back in one loop, reaping the
  children that have exited between spawns.
- **Streaming**: `head -c 1G /dev/zero`, one `trio-jobs tail` into a pipe; MB/s from its
  first to its last byte, while the job runs and again once it has ended. Ceiling: bare
  `trio.SSLStream` between two processes with the same TLS contexts, 64 KiB writes; the live
  tail is also compared with the job's own output rate. The job's own wall time (the
  server's `ended_at - created_at`) alone, with that follower, and with a follower that
  stops reading shows whether followers slow the job; the same job beside one process that
  only spins on a CPU (no follower) shows what any other busy process does to it on this
  machine. Five interleaved rounds, medians, with bare TLS and the ideal live chain (below)
  measured in each round. Before each of these jobs (and the fan-out's) the driver runs
  `sync`, untimed: the spool files go through the page cache, and once earlier 1 GiB jobs
  have left ~2 GB dirty the kernel throttles every writer to the disk's writeback rate (see
  "Still missed" below), which would make each figure depend on the scenarios before it.
- **Fan-out**: 1, 10, 100 followers of one 32 MiB job, *live*: the job prints a marker line
  and blocks reading a FIFO; the followers' process reports once every follower has
  received the marker (each is then attached to the job's output stream on the server); the
  driver checks that the job is still running and has written only the marker, and only
  then releases it. (Without the gate the followers' process, ~0.2 s of imports, started
  after the job's 32 MiB had passed its pipe in ~20 ms: "fan-out" was a replay.) Then
  *replay*: as many followers of the same job, now ended. For each: aggregate MB/s (all
  payload bytes / first byte to last end) against 1 follower of the same kind, and the
  server's peak RSS growth (VmRSS sampled every 20 ms).
- **Scale**: 1,000 `sleep` jobs at once (admin's quota raised by the benchmark policy):
  server RSS growth per job. History: 10,000 ended `/bin/true` jobs, written by the same
  `Worker` the server runs, in the benchmark's process, into the data directory the server
  then opens (twice as fast as 10,000 `StartJob` calls, which were quadratic until commit
  319f012, see below). That server and one with 10 ended jobs run side by side; both are
  warmed (one untimed call of each kind), then `list` (all 10,000 in one answer) and
  `status` calls, then `StartJob` (each job's end awaited, untimed, as in the job start
  figure), alternate between them in 5 rounds.
- **Isolation**: alice runs `head -c 1G /dev/zero` and follows it with `trio-jobs tail`;
  meanwhile bob calls `status` back to back and follows his own job, which writes the
  wall-clock time into a line every 20 ms: the follower's figure is each line's delivery
  delay (arrival minus the time in it). Baselines: the same before the flood.

Memory figures (RSS growth with 100 followers, RSS per running job) have an absolute target
and nothing of the same run to divide by: the table gives them no ratio.

**Reading the numbers.** 2 CPUs, shared with teammates' test runs: the server, the client
and the job compete for them, so compare ratios within one run; the load average is recorded.
The results block below is written whole by the full run: its first line names the commit
measured (and whether the working tree differed from it), and its "Targets" line is
computed from the table.

{{results}}
{END}"""
