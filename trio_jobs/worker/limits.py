"""Resource limits and usage of a job (plain values; no cgroup or protobuf knowledge)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Final

MiB: Final = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Per-job resource limits. ``None`` means unlimited for that resource."""

    cpu_millis: int | None = None  # 1000 = one full CPU
    memory_bytes: int | None = None  # swap is always 0 on top of this
    io_read_bps: int | None = None
    io_write_bps: int | None = None
    io_read_iops: int | None = None
    io_write_iops: int | None = None
    pids_max: int | None = None

    def merged_over(self, base: Limits) -> Limits:
        """These limits, with every unset field taken from ``base``."""
        return replace(
            base, **{f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}
        )


DEFAULT_LIMITS: Final = Limits(
    cpu_millis=2000,
    memory_bytes=1_048_576_000,
    io_read_bps=1000 * MiB,
    io_write_bps=100 * MiB,
    io_read_iops=1_000_000,
    io_write_iops=1_000_000,
    pids_max=4096,
)


@dataclass(frozen=True, kw_only=True)
class Usage:
    """Resources a job has used (live while it runs, final once it ended)."""

    cpu_usec: int = 0
    memory_peak_bytes: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0
