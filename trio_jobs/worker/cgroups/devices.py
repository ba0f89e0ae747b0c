"""Block devices that IO limits apply to.

Both ``io.max`` (v2) and ``blkio.throttle.*_device`` (v1) take a ``MAJ:MIN`` of a device and
throttle the bios a cgroup submits to it. We apply the job's IO limits to every *whole* block
device of the host (DESIGN §2):

- partitions are skipped: their bios are throttled on the disk they belong to (the kernel
  rejects per-partition throttling on v2 anyway), so limiting the disk covers them;
- ``loop*``, ``ram*`` and ``zram*`` are skipped: they are memory or file backed, and IO
  through a loop device is IO on the disk under its backing file, which is throttled there;
- device-mapper (``dm-*``) and md devices are kept: they are where a filesystem on LVM or
  RAID submits its bios. A bio remapped to the underlying disk stays charged to the same
  cgroup, so throttling both levels at the same rate does not halve it.

A device that rejects a limit (some virtual devices do) is logged by the drivers, not fatal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SKIPPED_PREFIXES: Final = ("loop", "ram", "zram")


@dataclass(frozen=True, kw_only=True, order=True)
class BlockDevice:
    major: int
    minor: int
    name: str

    @property
    def dev(self) -> str:
        """``MAJ:MIN`` as the cgroup files take it."""
        return f"{self.major}:{self.minor}"


def _read_dev(entry: Path) -> tuple[int, int] | None:
    try:
        text = (entry / "dev").read_text().strip()
        major, minor = text.split(":")
        return int(major), int(minor)
    except (OSError, ValueError):
        return None


def whole_disks(sys_root: Path = Path("/sys")) -> list[BlockDevice]:
    """Every whole block device the IO limits apply to, sorted by MAJ:MIN."""
    base = sys_root / "class" / "block"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    out: list[BlockDevice] = []
    for name in names:
        if name.startswith(SKIPPED_PREFIXES):
            continue
        entry = base / name
        if (entry / "partition").exists():
            continue
        dev = _read_dev(entry)
        if dev is not None:
            out.append(BlockDevice(major=dev[0], minor=dev[1], name=name))
    return sorted(out)


def disk_of(st_dev: int, sys_root: Path = Path("/sys")) -> BlockDevice | None:
    """The whole disk behind a filesystem's ``st_dev`` (a partition resolves to its disk).

    None when there is no block device (tmpfs, overlay, 9p, NFS: their ``st_dev`` is an
    anonymous device that has no entry under /sys/dev/block).
    """
    link = sys_root / "dev" / "block" / f"{os.major(st_dev)}:{os.minor(st_dev)}"
    try:
        entry = link.resolve(strict=True)
    except OSError:
        return None
    if (entry / "partition").exists():
        entry = entry.parent
    dev = _read_dev(entry)
    if dev is None:
        return None
    return BlockDevice(major=dev[0], minor=dev[1], name=entry.name)
