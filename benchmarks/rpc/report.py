"""The rpc benchmark's table, ratios against the targets of issue 3, and the docs section."""

from __future__ import annotations

import datetime as dt
import platform
import ssl
from importlib import metadata
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from pathlib import Path

    from benchmarks.rpc.common import Result, StatusResult, Workload

BEGIN: Final = "<!-- rpc-bench:begin (written by python -m benchmarks.rpc) -->"
END: Final = "<!-- rpc-bench:end -->"
STATUS_BEGIN: Final = "<!-- rpc-status-bench:begin (written by python -m benchmarks.rpc) -->"
STATUS_END: Final = "<!-- rpc-status-bench:end -->"
STATUS_TARGET: Final = "<=1.0"  # issue 19: GetJobStatus of an ended job <= grpcio's trivial unary
NAMES: Final = {
    "ours": "trio_jobs.rpc",
    "grpcio": "grpcio (aio)",
    "grpclib": "grpclib",
    "tls": "bare trio.SSLStream",
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _cell(ratio: float | None, target: str | None) -> str:
    if ratio is None:
        return "-"
    if target is None:
        return f"{ratio:.2f}x"
    op, bound = target[:2], float(target[2:])
    ok = ratio <= bound if op == "<=" else ratio >= bound
    return f"{ratio:.2f}x ({'meets' if ok else 'misses'} {op.replace('<=', '≤').replace('>=', '≥')} {bound})"


def render_table(
    results: dict[str, Result], failures: dict[str, str], rounds: dict[str, list[Result]] | None = None
) -> str:
    """Markdown: the figures of each peer (medians over the rounds), then ours as ratios to
    grpcio and to bare TLS, then (several rounds) ours / grpcio in each round."""
    lines = [
        "| peer | unary c=1 p50 (µs) | unary c=1 p99 (µs) | unary c=64 QPS | streaming MB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for impl, r in results.items():
        lines.append(
            f"| {NAMES[impl]} | {r.unary_p50_us:,.0f} | {r.unary_p99_us:,.0f} | "
            f"{r.c64_qps:,.0f} | {r.stream_mbps:,.1f} |"
        )
    for impl, why in failures.items():
        lines.append(f"| {NAMES[impl]} | failed: {why[:120]} | | | |")
    ours, grpcio, tls = results.get("ours"), results.get("grpcio"), results.get("tls")
    lines += ["", "| ratio | unary p50 | c=64 QPS | streaming |", "|---|---|---|---|"]

    def row(
        label: str, a: Result | None, b: Result | None, targets: tuple[str | None, ...]
    ) -> None:
        if a is None or b is None:
            return
        cells = (
            _cell(_ratio(a.unary_p50_us, b.unary_p50_us), targets[0]),
            _cell(_ratio(a.c64_qps, b.c64_qps), targets[1]),
            _cell(_ratio(a.stream_mbps, b.stream_mbps), targets[2]),
        )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("trio_jobs.rpc / grpcio", ours, grpcio, ("<=0.9", ">=1.2", ">=1.2"))
    row("trio_jobs.rpc / bare TLS", ours, tls, (None, None, ">=0.75"))
    row("grpclib / grpcio", results.get("grpclib"), grpcio, (None, None, None))
    row("grpcio / bare TLS", grpcio, tls, (None, None, None))
    per_round = list(zip((rounds or {}).get("ours", []), (rounds or {}).get("grpcio", []), strict=False))
    if len(per_round) > 1:
        lines += ["", "| round | unary p50 ours / grpcio | c=64 QPS | streaming |", "|---|---|---|---|"]
        for n, (a, b) in enumerate(per_round, 1):
            lines.append(
                f"| {n} | {a.unary_p50_us:,.0f} / {b.unary_p50_us:,.0f} µs | "
                f"{a.c64_qps:,.0f} / {b.c64_qps:,.0f} | {a.stream_mbps:,.0f} / {b.stream_mbps:,.0f} MB/s |"
            )
    return "\n".join(lines)


def render_status_table(result: StatusResult, rounds: list[StatusResult]) -> str:
    """Markdown: the status phase's figures (medians over the rounds), the ratio against
    the target, and each round's pair."""
    lines = [
        "| call (grpcio client, sync) | p50 (µs) | p99 (µs) |",
        "|---|---:|---:|",
        f"| trio-jobs GetJobStatus, ended job | {result.status_p50_us:,.0f} | {result.status_p99_us:,.0f} |",
        f"| trio-jobs grpc.health.v1 Check | {result.check_p50_us:,.0f} | |",
        f"| grpcio server (sync), grpc.health.v1 Check | {result.grpcio_p50_us:,.0f} | {result.grpcio_p99_us:,.0f} |",
        "",
        "| ratio | p50 |",
        "|---|---|",
        f"| GetJobStatus (ended) / grpcio's Check | "
        f"{_cell(_ratio(result.status_p50_us, result.grpcio_p50_us), STATUS_TARGET)} |",
        f"| GetJobStatus (ended) / our Check | {_cell(_ratio(result.status_p50_us, result.check_p50_us), None)} |",
    ]
    if len(rounds) > 1:
        lines += ["", "| round | GetJobStatus / our Check / grpcio's Check, p50 |", "|---|---|"]
        for n, r in enumerate(rounds, 1):
            lines.append(f"| {n} | {r.status_p50_us:,.0f} / {r.check_p50_us:,.0f} / {r.grpcio_p50_us:,.0f} µs |")
    return "\n".join(lines)


def render_status_section(
    table: str, *, work: Workload, load_before: tuple[float, float, float],
    load_after: tuple[float, float, float], command: str, rounds: int,
) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            STATUS_BEGIN,
            f"Run {when} with `{command}`: {rounds} round(s), each {work.status_calls} calls of each "
            f"kind after {work.status_warmup} of each, alternated in blocks of {work.status_block}; "
            f"medians over the rounds. Load average (1/5/15 min) before: "
            f"{'/'.join(f'{x:.2f}' for x in load_before)}, after: {'/'.join(f'{x:.2f}' for x in load_after)}.",
            "",
            table,
            STATUS_END,
        ]
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _versions() -> str:
    parts = [f"Python {platform.python_version()}", ssl.OPENSSL_VERSION]
    for dist in ("trio", "h2", "protobuf", "grpcio", "grpclib"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    return ", ".join(parts)


def render_doc_section(
    table: str,
    *,
    work: Workload,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    seconds: float,
    command: str,
    rounds: int = 1,
) -> str:
    import os

    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            BEGIN,
            f"Run {when} with `{command}` ({seconds:.0f} s).",
            "",
            f"- Machine: {_cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
            f"- Software: {_versions()}",
            f"- Load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in load_before)}, "
            f"after: {'/'.join(f'{x:.2f}' for x in load_after)}",
            f"- Workload: {work.unary_calls} sequential unary calls of {work.unary_size} B "
            f"(after {work.unary_warmup} warm-up), {work.c64_calls} calls by "
            f"{work.concurrency} tasks on one connection, median of {work.stream_rounds} "
            f"streaming calls of {work.stream_count} x {work.stream_size // 1024} KiB; "
            f"{rounds} interleaved round(s) of every peer, medians.",
            "",
            table,
            END,
        ]
    )


def replace_doc_section(doc: Path, section: str, *, begin: str = BEGIN, end: str = END) -> None:
    """Put ``section`` between the markers of ``doc`` (appended if the markers are missing)."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text, encoding="utf-8")
