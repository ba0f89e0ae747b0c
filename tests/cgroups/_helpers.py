"""Helpers for the cgroup tests: spawn a job the way the worker does, read limits back.

``spawn_in`` starts ``/bin/sh`` blocked on a pipe, puts it into the job cgroup with
``add_process`` and only then releases it to ``exec`` the program — the worker's placement
(see trio_jobs/worker/cgroups/base.py), so the driver tests do not depend on the worker.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from trio_jobs.worker.cgroups._layout import parse_proc_cgroup
from trio_jobs.worker.cgroups.v1 import V1_CONTROLLERS, V1Driver, V1JobCgroup
from trio_jobs.worker.cgroups.v2 import V2Driver, V2JobCgroup

if TYPE_CHECKING:
    from trio_jobs.worker.cgroups.base import JobCgroup

# Leak tests run 200 jobs; inside the cgroup v2 VM (TCG, ~14x slower, 8-minute budget for
# the whole guest run) fewer jobs exercise the same v2 clean-up paths.
IN_VM: Final = os.environ.get("TRIO_JOBS_IN_VM") == "1"
LEAK_JOBS: Final = 200  # issue 6: "after 200 jobs no job cgroup, process or fd is left"
# The driver-level twin of the leak test repeats it without the worker; under emulation
# (TCG runs Python ~15x slower) 30 jobs keep it within the VM's time, the worker-level
# test still runs all 200 there.
MECHANICS_LEAK_JOBS: Final = 30 if IN_VM else 200


# stdin is the gate: the wrapper reads one line from it (and exits, without running the
# program, if the pipe closes first), then execs the program with stdin from /dev/null.
WRAPPER = 'read -r _ || exit 125; exec "$@" </dev/null'


async def spawn_in(
    job: JobCgroup, argv: list[str], *, stdout: int | None = subprocess.DEVNULL
) -> trio.Process:
    r, w = os.pipe()
    try:
        proc = await trio.lowlevel.open_process(
            ["/bin/sh", "-c", WRAPPER, "wrapper", *argv],
            stdin=r,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
        )
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    os.close(r)
    try:
        await job.add_process(proc.pid)
        os.write(w, b"go\n")
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    finally:
        os.close(w)
    return proc


async def read_lines(proc: trio.Process, count: int) -> list[str]:
    """Read ``count`` lines of the job's stdout (bounded by the caller's fail_after)."""
    assert proc.stdout is not None
    buf = b""
    while buf.count(b"\n") < count:
        chunk = await proc.stdout.receive_some(4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode().splitlines()[:count]


def cgroup_dir(job: JobCgroup, controller: str) -> Path:
    """The directory holding ``controller``'s files for this job."""
    if isinstance(job, V1JobCgroup):
        return job.dir(controller)
    assert isinstance(job, V2JobCgroup)
    return Path(job.path)


def read_limit(job: JobCgroup, what: str) -> str:
    """Read a limit back from the kernel: "memory", "pids" or "cpu"."""
    files_v1 = {
        "memory": ("memory", "memory.limit_in_bytes"),
        "pids": ("pids", "pids.max"),
        "cpu": ("cpu", "cpu.cfs_quota_us"),
    }
    files_v2 = {"memory": "memory.max", "pids": "pids.max", "cpu": "cpu.max"}
    if isinstance(job, V1JobCgroup):
        controller, name = files_v1[what]
        return (job.dir(controller) / name).read_text().strip()
    return (Path(job.path) / files_v2[what]).read_text().strip()


def parent_dirs(driver: V1Driver | V2Driver) -> list[Path]:
    """The jobs' parent directory in every hierarchy the driver uses."""
    if isinstance(driver, V1Driver):
        return sorted({driver.parent_dir(c) for c in V1_CONTROLLERS})
    return [driver.parent_dir]


def job_cgroup_dir(driver: V1Driver | V2Driver, pid: int) -> Path:
    """The directory of the (freezer on v1) cgroup holding ``pid``, found as an outsider
    would: from ``/proc/<pid>/cgroup`` (world-readable), not from the driver's key."""
    key = "freezer" if isinstance(driver, V1Driver) else ""
    parent = driver.parent_dir("freezer") if isinstance(driver, V1Driver) else driver.parent_dir
    path = parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())[key]
    # The parent's own cgroup path is a suffix of its directory; the rest of ``path`` below it.
    parts = path.strip("/").split("/")
    for i in range(len(parts)):
        if parts[i] == parent.name and (parent.joinpath(*parts[i + 1 :])).is_dir():
            return parent.joinpath(*parts[i + 1 :])
    raise AssertionError(f"pid {pid} is in {path}, not under {parent}")


def members(job: JobCgroup) -> set[int]:
    procs = cgroup_dir(job, "freezer") / "cgroup.procs"
    try:
        return {int(p) for p in procs.read_text().split()}
    except FileNotFoundError:
        return set()


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def boost_cpu_weight(driver: V1Driver | V2Driver) -> None:
    """Give the test's own parent cgroup 10x the default CPU weight.

    On a shared host (teammates' tests and benchmarks running) every busy process in the root
    cgroup weighs as much as our whole job subtree, so an unlimited job may get less CPU than
    a 0.5-CPU cap would allow and the CPU tests could not tell the cap from the load. The
    caps themselves (cpu.max / cfs_quota) are independent of weights. This only writes to the
    parent the test created.
    """
    if isinstance(driver, V1Driver):
        (driver.parent_dir("cpu") / "cpu.shares").write_text("10240")
    else:
        (driver.parent_dir / "cpu.weight").write_text("1000")


# A bounded fork loop (a few hundred forks, never an exponential bomb): prints how many
# forks succeeded and failed, then waits with its children until it is killed.
FORK_LOOP: Final = """
import os, signal, sys
made = failed = 0
for _ in range(300):
    try:
        pid = os.fork()
    except OSError:
        failed += 1
        continue
    if pid == 0:
        signal.pause()
        os._exit(0)
    made += 1
print(made, failed, flush=True)
signal.pause()
"""

# FORK_LOOP with the number of forks in argv[1] (for splitting a fork loop over jobs).
FORK_N: Final = FORK_LOOP.replace("range(300)", "range(int(sys.argv[1]))")
