"""Which cgroup driver this host can use, and why.

Order of preference:

1. **v2**: a cgroup2 mount whose controllers available to our own cgroup include cpu,
   memory, io and pids, on a writable mount we may write to;
2. **v1** (hybrid hosts): cpu, cpuacct, memory, blkio, pids and freezer each mounted as a v1
   hierarchy (co-mounts such as ``cpu,cpuacct`` are fine), writable for us;
3. **none**: ``NoCgroupDriver`` (process-group kill, no limits) with a loud warning, or a
   ``CgroupError`` that lists every reason when ``require=True`` (``--require-limits``).

Detection only reads (/proc/self/mountinfo, /proc/self/cgroup, cgroup.controllers, access
checks); the driver's ``prepare()`` makes the directories. ``_detect`` takes the filesystem
root as a parameter so the logic is tested on fake trees.

``parent`` (``--cgroup-parent``): "a/b" is under this process's own cgroup in each
hierarchy, "/a/b" is from the hierarchy root. Default: ``trio-jobs`` under our own cgroup. On
v2, if we already sit in our own ``supervisor`` leaf (a driver of this process moved us
there before), our own cgroup is taken to be the one above it.

A server picks its driver with :func:`detect_server_driver` (``trio-jobs serve`` and
``trio_jobs.server.serve`` alike): the parent defaults to one per data directory
(:func:`default_cgroup_parent`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ._layout import Mount, parse_mountinfo, parse_proc_cgroup, resolve_parent
from .base import CgroupError
from .none import NoCgroupDriver
from .v1 import V1_CONTROLLERS, V1Driver
from .v2 import SUPERVISOR_LEAF, V2_CONTROLLERS, V2Driver

if TYPE_CHECKING:
    from .base import CgroupDriver

log = logging.getLogger(__name__)

DEFAULT_PARENT: Final = "trio-jobs"
# What running without cgroups means, in every warning that says so (detection, the CLI,
# ``serve(cgroups=NO_CGROUPS)``): one wording for operators to grep.
NO_LIMITS_WARNING: Final = "jobs run WITHOUT cpu/memory/io/pids limits"


def detect_driver(*, parent: str | None = None, require: bool = False) -> CgroupDriver:
    """The best cgroup driver for this host (see the module docstring)."""
    return _detect(parent=parent, require=require, root=Path("/"), pid=os.getpid())


def default_cgroup_parent(data_dir: Path) -> str:
    """``trio-jobs-<digest of the data directory>``: one parent cgroup per server state.

    At start the driver kills and removes every job cgroup left under its parent (jobs of a
    crashed run). Naming the parent after the data directory keeps that cleanup to our own
    leftovers: a second server with another ``TRIO_JOBS_HOME`` on the same host never
    touches the first one's jobs, while a restart on the same state finds its old cgroups.
    """
    digest = hashlib.sha256(os.fsencode(data_dir.resolve())).hexdigest()[:12]
    return f"trio-jobs-{digest}"


def detect_server_driver(data_dir: Path, *, parent: str | None = None, require: bool = False) -> CgroupDriver:
    """The driver of a server keeping its state in ``data_dir``: :func:`detect_driver` under
    ``parent`` (``--cgroup-parent``; None or "": :func:`default_cgroup_parent`). ``require``
    (``--require-limits``): raise ``CgroupError`` rather than fall back to no limits.
    Blocking reads of /proc and /sys: call it from a thread in async code."""
    return detect_driver(parent=parent or default_cgroup_parent(data_dir), require=require)


def _host_path(root: Path, p: Path) -> Path:
    return root / p.relative_to("/") if p.is_absolute() else root / p


def _writable(path: Path) -> bool:
    """Whether we may create entries at ``path`` (its nearest existing ancestor)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return os.access(p, os.W_OK)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _try_v2(
    mounts: list[Mount], own: dict[str, str], parent: str, root: Path, pid: int
) -> V2Driver | str:
    v2_mounts = [m for m in mounts if m.fstype == "cgroup2"]
    if not v2_mounts:
        return "no cgroup2 mount"
    mount = v2_mounts[-1]
    mount_dir = _host_path(root, mount.mount_point)
    if "" not in own:
        return "this process has no cgroup2 entry in /proc/self/cgroup"
    own_cg = own[""]
    if own_cg.rstrip("/").endswith("/" + SUPERVISOR_LEAF):
        own_cg = own_cg.rstrip("/").rsplit("/", 1)[0] or "/"
    own_rel = mount.dir_of(own_cg)
    if own_rel is None:
        return f"our cgroup2 cgroup {own_cg} is not visible under {mount.mount_point}"
    own_dir = _host_path(root, own_rel)
    text = _read(own_dir / "cgroup.controllers")
    if text is None:
        return f"cannot read {own_dir / 'cgroup.controllers'}"
    lacking = V2_CONTROLLERS - set(text.split())
    if lacking:
        return (
            f"cgroup2 at {mount.mount_point} lacks controllers {' '.join(sorted(lacking))} "
            f"for {own_cg}"
        )
    if mount.read_only:
        return f"cgroup2 at {mount.mount_point} is mounted read-only"
    parent_cg = resolve_parent(own_cg, parent)
    parent_rel = mount.dir_of(parent_cg)
    if parent_rel is None:
        return f"cgroup parent {parent_cg} is not visible under {mount.mount_point}"
    parent_dir = _host_path(root, parent_rel)
    if not _writable(parent_dir):
        return f"no permission to create cgroups at {parent_dir}"
    is_root = own_cg == "/"
    if parent_dir.is_relative_to(own_dir) and not is_root:
        if not os.access(own_dir / "cgroup.subtree_control", os.W_OK):
            return f"no permission to enable controllers in {own_dir}"
        others = [p for p in (_read(own_dir / "cgroup.procs") or "").split() if p != str(pid)]
        if others:
            return (
                f"{own_cg} holds other processes ({' '.join(others[:5])}), so it cannot "
                "delegate controllers to job cgroups (the no-internal-process rule); run the "
                "server in its own cgroup or pass --cgroup-parent"
            )
    return V2Driver(
        mount_dir=mount_dir,
        own_dir=own_dir,
        parent_dir=parent_dir,
        parent_cgroup=parent_cg,
        is_root=is_root,
        reason=f"cgroup2 with {' '.join(sorted(V2_CONTROLLERS))} at {mount.mount_point}",
        sys_root=root / "sys",
    )


def _try_v1(mounts: list[Mount], own: dict[str, str], parent: str, root: Path) -> V1Driver | str:
    parents: dict[str, tuple[Path, str]] = {}
    problems: list[str] = []
    for c in V1_CONTROLLERS:
        candidates = [m for m in mounts if m.fstype == "cgroup" and c in m.controllers]
        if not candidates:
            problems.append(f"v1 controller {c} is not mounted")
            continue
        mount = candidates[-1]
        if c not in own:
            problems.append(f"no {c} entry in /proc/self/cgroup")
            continue
        if mount.read_only:
            problems.append(f"{mount.mount_point} is mounted read-only")
            continue
        parent_cg = resolve_parent(own[c], parent)
        rel = mount.dir_of(parent_cg)
        if rel is None:
            problems.append(f"cgroup {parent_cg} is not visible under {mount.mount_point}")
            continue
        parent_dir = _host_path(root, rel)
        if not _writable(parent_dir):
            problems.append(f"no permission to create cgroups at {parent_dir}")
            continue
        parents[c] = (parent_dir, parent_cg)
    if problems:
        return "; ".join(problems)
    return V1Driver(
        parents=parents,
        reason="hybrid host: cpu, cpuacct, memory, blkio, pids and freezer on cgroup v1",
        sys_root=root / "sys",
    )


def _detect(*, parent: str | None, require: bool, root: Path, pid: int) -> CgroupDriver:
    parent = DEFAULT_PARENT if parent is None else parent
    mountinfo = _read(root / "proc" / "self" / "mountinfo")
    proc_cgroup = _read(root / "proc" / "self" / "cgroup")
    if mountinfo is None or proc_cgroup is None:
        reasons = ["cannot read /proc/self/mountinfo or /proc/self/cgroup"]
    else:
        mounts = parse_mountinfo(mountinfo)
        own = parse_proc_cgroup(proc_cgroup)
        v2 = _try_v2(mounts, own, parent, root, pid)
        if not isinstance(v2, str):
            return v2
        v1 = _try_v1(mounts, own, parent, root)
        if not isinstance(v1, str):
            return v1
        reasons = [f"v2: {v2}", f"v1: {v1}"]
    message = "no usable cgroups (" + "; ".join(reasons) + ")"
    if require:
        raise CgroupError(message + "; refusing to run jobs without resource limits")
    log.warning("%s: %s", NO_LIMITS_WARNING, message)
    return NoCgroupDriver(message)
