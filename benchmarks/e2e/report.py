"""The ratio table, the docs/benchmarks.md section and the charts of the e2e benchmark."""

from __future__ import annotations

import os
import platform
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

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
    """One figure next to its ceiling (or baseline). ``higher``: bigger is better."""

    figure: str
    value: float
    unit: str
    ceiling: float
    ceiling_name: str
    target: str = ""
    ok: bool | None = None  # None: no target

    @property
    def ratio(self) -> float:
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
        lines.append(
            f"| {r.figure} | {_num(r.value)} {r.unit} | {_num(r.ceiling)} {r.unit} ({r.ceiling_name}) "
            f"| {r.ratio:.2f}x | {r.target}{verdict} |"
        )
    return "\n".join(lines)


def machine() -> list[str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import h2
    import trio

    return [
        f"- Machine: {cpu}, {os.cpu_count()} CPUs, {platform.platform()}",
        f"- Software: Python {platform.python_version()}, {ssl.OPENSSL_VERSION}, trio {trio.__version__}, h2 {h2.__version__}",
    ]


def results_block(*, when: str, command: str, seconds: float, load: tuple[str, str], workload: str,
                  rows: Sequence[Row], charts: bool, profile: str) -> str:
    parts = [
        RESULTS_BEGIN,
        f"Run {when} with `{command}` ({seconds:.0f} s).",
        "",
        *machine(),
        f"- Load average (1/5/15 min) before: {load[0]}, after: {load[1]}",
        f"- Workload: {workload}",
        "",
        table(rows),
        "",
    ]
    if charts:
        parts += [f"![{name[:-4]}](img/{name})" for name in CHARTS] + [""]
    else:
        parts += ["(charts skipped: matplotlib is not installed; `./dev bench e2e` installs it)", ""]
    if profile:
        parts += [profile, ""]
    parts.append(RESULTS_END)
    return "\n".join(parts)


def write_doc(block: str, default_section: str) -> None:
    """Replace our results block; add our whole section at the end if it is not there yet."""
    text = DOC.read_text()
    if RESULTS_BEGIN in text and RESULTS_END in text:
        pattern = re.escape(RESULTS_BEGIN) + r".*?" + re.escape(RESULTS_END)
        text = re.sub(pattern, lambda _m: block, text, count=1, flags=re.DOTALL)
    elif BEGIN not in text:
        text = text.rstrip("\n") + "\n\n" + default_section.replace("{results}", block) + "\n"
    else:
        raise RuntimeError(f"{DOC}: the e2e section has no results markers; restore {RESULTS_BEGIN}")
    DOC.write_text(text)


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
    starts = [figures["start_none"], figures["start_cg"]]
    ceilings = [ceil["spawn_p50_ms"], ceil["spawn_p50_ms"] + ceil["cgroup_p50_ms"]]
    xs = range(len(labels))
    ax.bar([x - 0.27 for x in xs], [s["p50_ms"] for s in starts], 0.27, label="StartJob p50")
    ax.bar(list(xs), [s["p99_ms"] for s in starts], 0.27, label="StartJob p99")
    ax.bar([x + 0.27 for x in xs], ceilings, 0.27, label="ceiling (spawn + cgroup writes)")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms")
    ax.set_title("Job start: StartJob call -> process running")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(IMG / CHARTS[0], dpi=100)
    plt.close(fig)
    # 2. throughput
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = ["bare TLS\n(ceiling)", "tail x1"] + [f"fan-out x{n}\n(aggregate)" for n in fanout_counts]
    values = [ceil["tls_mbps"], figures["stream"]["mbps"]] + [figures[f"fanout-{n}"]["mbps"] for n in fanout_counts]
    ax.bar(names, values, color=["grey"] + ["tab:blue"] * (len(values) - 1))
    ax.set_ylabel("MB/s")
    ax.set_title("Output streaming over mutual TLS on loopback")
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
figure is compared in the same run with its ceiling or baseline:

- **Job start**: a `StartJob` of `/bin/true` timed from the call to the answer (the worker
  answers once the process has been released into its program), one at a time, then 8
  concurrent callers on one connection for jobs/s. Ceiling: `os.posix_spawn` + `waitpid` of
  `/bin/true`, plus (with cgroups) mkdir + the limit writes + rmdir of one directory in each
  hierarchy the driver uses, measured in a cgroup of our own.
- **Streaming**: `head -c 1G /dev/zero`, one `trio-jobs tail` into a pipe; MB/s from its
  first to its last byte. Ceiling: bare `trio.SSLStream` between two processes with the same
  TLS contexts, 64 KiB writes. The job's own wall time (the server's `ended_at -
  created_at`) with and without a follower shows whether a follower slows the job.
- **Fan-out**: 1, 10, 100 followers of one 32 MiB job: aggregate MB/s (all bytes / first
  byte to last end) and the server's peak RSS growth (VmRSS sampled every 20 ms).
- **Scale**: 1,000 `sleep` jobs at once (admin's quota raised by the benchmark policy):
  server RSS growth per job. History: 10,000 ended `/bin/true` jobs, written by the same
  `Worker` the server runs, in the benchmark's process, into the data directory the server
  then opens (twice as fast as 10,000 `StartJob` calls, which were quadratic until commit
  319f012, see below); then `list` (all 10,000 in one answer), `status` and `StartJob`
  latency, against the same calls on a server with 10 jobs.
- **Isolation**: alice runs `head -c 1G /dev/zero` and follows it with `trio-jobs tail`;
  meanwhile bob calls `status` back to back and follows his own job, which writes the
  wall-clock time into a line every 20 ms: the follower's figure is each line's delivery
  delay (arrival minus the time in it). Baselines: the same before the flood.

**Reading the numbers.** 2 CPUs, shared with teammates' test runs: the server, the client
and the job compete for them, so compare ratios within one run; the load average is recorded.

{{results}}
{END}"""
