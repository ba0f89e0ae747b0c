"""The rpc benchmark's table, ratios against the targets of issue 3, and the docs section."""

from __future__ import annotations

import dataclasses
import statistics
from typing import TYPE_CHECKING, Final

from benchmarks import docblock
from benchmarks.rpc.common import Result
from benchmarks.rpc.variants import OURS

if TYPE_CHECKING:
    from pathlib import Path

    from benchmarks.rpc.common import RanAs, StatusResult, Workload
    from benchmarks.rpc.variants import Peer

BEGIN: Final = "<!-- rpc-bench:begin (written by python -m benchmarks.rpc) -->"
END: Final = "<!-- rpc-bench:end -->"
STATUS_BEGIN: Final = "<!-- rpc-status-bench:begin (written by python -m benchmarks.rpc) -->"
STATUS_END: Final = "<!-- rpc-status-bench:end -->"
STATUS_TARGET: Final = "<=1.0"  # issue 19: GetJobStatus of an ended job <= grpcio's trivial unary
NO_MODE: Final = "no RpcMode (lean, fast paths: its only mode)"
MAIN: Final = docblock.Markers(BEGIN, END)
DISTS: Final = ("trio", "h2", "protobuf", "grpcio", "grpclib")


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


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


def _ratios(a: Result, b: Result, targets: tuple[str | None, ...] = (None,) * 4) -> str:
    """The cells of a ratio row: a's figures over b's (higher is better for a in QPS and MB/s,
    lower in p50 and CPU)."""
    return " | ".join((
        _cell(_ratio(a.unary_p50_us, b.unary_p50_us), targets[0]),
        _cell(_ratio(a.c64_qps, b.c64_qps), targets[1]),
        _cell(_ratio(a.stream_mbps, b.stream_mbps), targets[2]),
        _cell(_ratio(a.stream_server_cpu_s_per_gib, b.stream_server_cpu_s_per_gib), targets[3]),
    ))


def _same_round(a: list[Result], b: list[Result]) -> Result:
    """Each figure's median over the rounds of a's figure / b's figure in the same round, as a
    Result of ratios: robust to the machine's drift between rounds, which a ratio of medians
    is not."""
    pairs = list(zip(a, b, strict=False))
    return Result(**{
        f.name: statistics.median(getattr(x, f.name) / getattr(y, f.name) for x, y in pairs)
        for f in dataclasses.fields(Result)
    })


def _ratio_cells(r: Result) -> str:
    return " | ".join(f"{getattr(r, f.name):.2f}x" for f in dataclasses.fields(Result) if f.name != "unary_p99_us")


def render_table(
    peers: list[Peer],
    results: dict[str, Result],
    failures: dict[str, str],
    rounds: dict[str, list[Result]] | None = None,
) -> str:
    """Markdown: the figures of each row (medians over the rounds); ours as ratios to grpcio
    and to bare TLS; our other rows against the default in the same rounds; then (several
    rounds) ours / grpcio in each round and the streaming figures of our rows in each round."""
    rounds = rounds or {}
    labels = {p.key: p.label for p in peers}
    lines = [
        "| peer | unary c=1 p50 (µs) | unary c=1 p99 (µs) | unary c=64 QPS | streaming MB/s "
        "| server CPU per GiB streamed (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, r in results.items():
        lines.append(
            f"| {labels[key]} | {r.unary_p50_us:,.0f} | {r.unary_p99_us:,.0f} | "
            f"{r.c64_qps:,.0f} | {r.stream_mbps:,.1f} | {r.stream_server_cpu_s_per_gib:.2f} |"
        )
    for key, why in failures.items():
        lines.append(f"| {labels[key]} | failed: {why[:160]} | | | | |")
    ours, grpcio, tls = results.get("ours"), results.get("grpcio"), results.get("tls")
    ratio_rows: list[str] = []

    def row(label: str, a: Result | None, b: Result | None, targets: tuple[str | None, ...] = (None,) * 4) -> None:
        if a is not None and b is not None:
            ratio_rows.append(f"| {label} | {_ratios(a, b, targets)} |")

    row(f"{OURS} / grpcio", ours, grpcio, ("<=0.9", ">=1.2", ">=1.2", None))
    others = [p for p in peers if p.is_ours and not p.is_default and p.key in results]
    for p in others:
        row(f"{p.label} / grpcio", results[p.key], grpcio)
    row(f"{OURS} / bare TLS", ours, tls, (None, None, ">=0.75", None))
    row("grpclib / grpcio", results.get("grpclib"), grpcio)
    row("grpcio / bare TLS", grpcio, tls)
    if ratio_rows:
        lines += ["", "| ratio | unary p50 | c=64 QPS | streaming | server CPU/GiB |", "|---|---|---|---|---|", *ratio_rows]
    if ours is not None and others:
        lines += [
            "",
            "| same round, median of the rounds' ratios | unary p50 | c=64 QPS | streaming | server CPU/GiB |",
            "|---|---|---|---|---|",
        ]
        for p in others:
            if p.is_before:  # now / before: below 1 in p50 and CPU, above in QPS and MB/s = better now
                label, ratio = f"{OURS} / {p.label}", _same_round(rounds["ours"], rounds[p.key])
            else:
                label, ratio = f"{p.label} / {OURS}", _same_round(rounds[p.key], rounds["ours"])
            lines.append(f"| {label} | {_ratio_cells(ratio)} |")
    per_round = list(zip(rounds.get("ours", []), rounds.get("grpcio", []), strict=False))
    if len(per_round) > 1:
        lines += ["", "| round | unary p50 ours / grpcio | c=64 QPS | streaming |", "|---|---|---|---|"]
        for n, (a, b) in enumerate(per_round, 1):
            lines.append(
                f"| {n} | {a.unary_p50_us:,.0f} / {b.unary_p50_us:,.0f} µs | "
                f"{a.c64_qps:,.0f} / {b.c64_qps:,.0f} | {a.stream_mbps:,.0f} / {b.stream_mbps:,.0f} MB/s |"
            )
    ours_rows = [p for p in peers if p.is_ours and p.key in results]
    if len(ours_rows) > 1 and len(rounds.get("ours", [])) > 1:
        short = [p.label.removeprefix(OURS).strip() or OURS for p in ours_rows]
        lines += [
            "",
            "| round: streaming MB/s, server CPU s/GiB | " + " | ".join(short) + " |",
            "|---|" + "---|" * len(short),
        ]
        for n, per_row in enumerate(zip(*(rounds[p.key] for p in ours_rows), strict=False), 1):
            cells = (f"{r.stream_mbps:,.0f}, {r.stream_server_cpu_s_per_gib:.2f}" for r in per_row)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_ran(peers: list[Peer], ran: dict[str, tuple[RanAs, RanAs]]) -> str:
    """Markdown: what each of our rows' processes said they ran (checked, variants.check_ran)."""
    lines = [
        "| row | server ran | client ran | server's trio_jobs | client's trio_jobs |",
        "|---|---|---|---|---|",
    ]
    for p in peers:
        if p.key in ran:
            server, client = ran[p.key]
            lines.append(
                f"| {p.label} | {server.mode or NO_MODE} | {client.mode or NO_MODE} | {server.code} | {client.code} |"
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
    when = docblock.now()
    return "\n".join(
        [
            STATUS_BEGIN,
            f"Run {when} at {docblock.commit_stamp()} with `{command}` on {docblock.cpu_model()}: "
            f"{rounds} round(s), each {work.status_calls} calls of each "
            f"kind after {work.status_warmup} of each, alternated in blocks of {work.status_block}; "
            f"medians over the rounds. Load average (1/5/15 min) before: "
            f"{_load(load_before)}, after: {_load(load_after)}.",
            "",
            table,
            STATUS_END,
        ]
    )


def render_doc_section(
    table: str,
    *,
    work: Workload,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    seconds: float,
    command: str,
    rounds: int = 1,
    stamp: str,
    ran: str = "",
    before: str | None = None,
) -> str:
    """The docs section: when, at which commit (``stamp``), on what, the workload, the tables,
    and what our rows' processes ran (``ran``, from :func:`render_ran`). ``before``: the
    ``--ab`` checkout's commit stamp and path, if any."""
    workload = (
        f"{work.unary_calls} sequential unary calls of {work.unary_size} B "
        f"(after {work.unary_warmup} warm-up), {work.c64_calls} calls by "
        f"{work.concurrency} tasks on one connection, median of {work.stream_rounds} "
        f"streaming calls of {work.stream_count} x {work.stream_size // 1024} KiB (the server's "
        f"CPU time over all of them, per GiB of payload); "
        f"{rounds} interleaved round(s) of every peer, medians."
    )
    lines = docblock.stamp(command=command, seconds=seconds, load=(_load(load_before), _load(load_after)),
                           workload=workload, commit=stamp, dists=DISTS)
    if before is not None:
        lines.append(f"- Before/after: the row `{OURS} at ...` runs {before}.")
    lines += ["", table]
    if ran:
        lines += ["", "What the processes of our rows reported running (checked by the runner):", "", ran]
    return docblock.block(MAIN, lines)


def replace_doc_section(doc: Path, section: str, *, begin: str = BEGIN, end: str = END) -> None:
    """Put ``section`` between the markers of ``doc`` (appended if the markers are missing)."""
    docblock.replace_block(doc, section, docblock.Markers(begin, end), new_section=section)
