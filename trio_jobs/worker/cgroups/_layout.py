"""Where the cgroup hierarchies are mounted and where this process sits in them.

Pure parsing of ``/proc/self/mountinfo`` and ``/proc/self/cgroup`` text, so detection can be
tested on fake trees. Paths in ``/proc/<pid>/cgroup`` are relative to the hierarchy root (as
seen from our cgroup namespace); a mount may expose only a sub-tree of the hierarchy (its
``root`` field in mountinfo), so a cgroup path maps to a directory only when it lies under
that root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .base import CgroupError

_OCTAL = re.compile(r"\\([0-7]{3})")

# Mount options of a cgroup v1 super block that are not controller names.
_NON_CONTROLLER_OPTIONS = frozenset(
    {"rw", "ro", "noprefix", "clone_children", "xattr", "cpuset_v2_mode", "favordynmods"}
)


@dataclass(frozen=True, kw_only=True)
class Mount:
    mount_point: Path
    root: str  # the cgroup path this mount shows at its mount point
    fstype: str  # "cgroup" (v1) or "cgroup2"
    controllers: frozenset[str]  # v1: the controllers of this hierarchy; cgroup2: empty
    read_only: bool

    def dir_of(self, cgroup_path: str) -> Path | None:
        """The directory of ``cgroup_path`` under this mount, or None if not visible."""
        root = self.root.rstrip("/")
        if cgroup_path == self.root or cgroup_path == root:
            return self.mount_point
        if root and not cgroup_path.startswith(root + "/"):
            return None
        rel = cgroup_path[len(root) :].lstrip("/")
        return self.mount_point / rel if rel else self.mount_point


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in a mountinfo text (later mounts last)."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf = left.split()
        rf = right.split()
        if len(lf) < 6 or len(rf) < 3 or rf[0] not in ("cgroup", "cgroup2"):
            continue
        super_opts = rf[2].split(",")
        mount_opts = lf[5].split(",")
        controllers = frozenset(
            o for o in super_opts if o not in _NON_CONTROLLER_OPTIONS and "=" not in o
        )
        mounts.append(
            Mount(
                mount_point=Path(_unescape(lf[4])),
                root=_unescape(lf[3]),
                fstype=rf[0],
                controllers=controllers if rf[0] == "cgroup" else frozenset(),
                read_only="ro" in mount_opts or "ro" in super_opts,
            )
        )
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Map hierarchy key -> cgroup path: "" for cgroup2, else each v1 controller name."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, controllers, path = parts
        if hid == "0" and controllers == "":
            out[""] = path
            continue
        for c in controllers.split(","):
            if c and not c.startswith("name="):
                out[c] = path
    return out


def resolve_parent(own: str, parent: str) -> str:
    """The cgroup path of the jobs' parent.

    ``parent`` is absolute ("/a/b": from the hierarchy root, like ``docker --cgroup-parent``)
    or relative ("a/b": under this process's own cgroup). ".." and empty names are refused,
    so a relative parent can never escape our own sub-tree.
    """
    if not parent or "\0" in parent:
        raise CgroupError(f"invalid cgroup parent {parent!r}: give a path such as 'trio-jobs'")
    parts = [p for p in parent.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise CgroupError(f"invalid cgroup parent {parent!r}: '.' and '..' are not allowed")
    if parent.startswith("/"):
        return "/" + "/".join(parts)
    return str(PurePosixPath(own) / "/".join(parts))


def check_job_id(job_id: str) -> None:
    if (
        not job_id
        or len(job_id) > 200
        or job_id in (".", "..")
        or "/" in job_id
        or "\0" in job_id
        or job_id.startswith("cgroup.")
    ):
        raise CgroupError(f"job id {job_id!r} cannot name a cgroup directory")
