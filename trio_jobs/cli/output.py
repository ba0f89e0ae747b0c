"""Human tables and proto3 JSON for ``status`` and ``list``.

Every cell of a table passes through :func:`.escape.terminal_safe` (the command line through
:func:`.escape.shell_join`) before the columns are measured: a job's command, its arguments,
its id and owner are the server's (and so possibly a hostile user's) text. The JSON is
exact and needs no escaping (protobuf writes it as ASCII with every control escaped).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from .escape import shell_join, terminal_safe
from .units import format_duration, format_size

if TYPE_CHECKING:
    from collections.abc import Sequence

    from google.protobuf.message import Message

    from ..client import JobInfo, JobLimits


def to_json(message: Message) -> str:
    """The proto3 JSON mapping with the .proto's field names (int64 values are strings)."""
    from google.protobuf.json_format import MessageToJson  # only for --json: ~1.5 ms

    return MessageToJson(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _signal_name(number: int) -> str:
    import signal  # only for a job a signal ended: its enums cost ~0.5 ms to build

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def describe_state(job: JobInfo) -> str:
    """``exited 0``, ``killed SIGKILL (stopped by user)``, ``running``, ``lost``."""
    if job.state == "exited":
        return f"exited {job.exit_code}"
    if job.state == "killed":
        reasons = [
            text
            for flag, text in (
                (job.stopped_by_user, "stopped by user"),
                (job.oom_killed, "out of memory"),
                (job.stopped_by_shutdown, "server shutdown"),
            )
            if flag
        ]
        sig = _signal_name(job.signal) if job.signal is not None else "by signal"
        return f"killed {sig}" + (f" ({', '.join(reasons)})" if reasons else "")
    return job.state


def command_line(job: JobInfo) -> str:
    """The job's argv as a bash command line; terminal-safe (see :func:`.escape.shell_join`)."""
    return shell_join([job.command, *job.args])


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _runtime(job: JobInfo, now: datetime) -> str:
    end = job.ended_at or now
    return format_duration(max(0.0, (end - job.created_at).total_seconds()))


def describe_limits(limits: JobLimits) -> str:
    parts = []
    if limits.cpu_millis is not None:
        parts.append(f"cpus {limits.cpu_millis / 1000:g}")
    if limits.memory_bytes is not None:
        parts.append(f"memory {format_size(limits.memory_bytes)}")
    if limits.pids_max is not None:
        parts.append(f"pids {limits.pids_max}")
    if limits.io_read_bps is not None:
        parts.append(f"io-read {format_size(limits.io_read_bps)}/s")
    if limits.io_write_bps is not None:
        parts.append(f"io-write {format_size(limits.io_write_bps)}/s")
    if limits.io_read_iops is not None:
        parts.append(f"read-iops {limits.io_read_iops}")
    if limits.io_write_iops is not None:
        parts.append(f"write-iops {limits.io_write_iops}")
    return ", ".join(parts) or "none"


def status_table(job: JobInfo, *, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    u = job.usage
    rows = [
        ("job", job.job_id),
        ("owner", job.owner),
        ("command", command_line(job)),
        ("state", describe_state(job)),
        ("created", _when(job.created_at)),
        ("ended", _when(job.ended_at) if job.ended_at else "-"),
        ("runtime", _runtime(job, now)),
        ("limits", describe_limits(job.limits)),
        (
            "usage",
            f"cpu {format_duration(u.cpu_usec / 1e6)}, memory peak {format_size(u.memory_peak_bytes)}, "
            f"io read {format_size(u.io_read_bytes)}, io write {format_size(u.io_write_bytes)}",
        ),
        ("output", f"{job.output_bytes} bytes" + (" (truncated: over the output cap)" if job.output_truncated else "")),
    ]
    width = max(len(k) for k, _ in rows)
    # every value escaped (the command line already is, in its own notation)
    return "\n".join(f"{k:<{width}}  {v if k == 'command' else terminal_safe(v)}" for k, v in rows)


def list_table(jobs: Sequence[JobInfo], *, show_owner: bool, now: datetime | None = None) -> str:
    if not jobs:
        return "no jobs"
    now = now or datetime.now(UTC)
    header = ["JOB ID", *(["OWNER"] if show_owner else []), "STATE", "CREATED", "RUNTIME", "COMMAND"]
    rows = [
        [
            terminal_safe(j.job_id),
            *([terminal_safe(j.owner)] if show_owner else []),
            terminal_safe(describe_state(j)),
            _when(j.created_at),
            _runtime(j, now),
            command_line(j),
        ]
        for j in jobs
    ]
    # measured on the escaped cells, which are what is printed
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        cells = [f"{c:<{w}}" for c, w in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, r[-1]]))
    return "\n".join(lines)
