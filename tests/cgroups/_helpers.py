"""Helpers for the cgroup tests: spawn a job the way the worker does, read limits back.

``spawn_in`` starts ``/bin/sh`` blocked on a pipe, puts it into the job cgroup with
``add_process`` and only then releases it to ``exec`` the program — the worker's placement
(see trio_jobs/worker/cgroups/base.py), so the driver tests do not depend on the worker.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import trio

from trio_jobs.worker.cgroups._layout import parse_proc_cgroup
from trio_jobs.worker.cgroups.v1 import V1_CONTROLLERS, V1Driver, V1JobCgroup
from trio_jobs.worker.cgroups.v2 import V2Driver, V2JobCgroup
from trio_jobs.worker.limits import Limits

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

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


# -- CPU caps measured over a window ------------------------------------------------------------

# Four busy processes (processes, not Python threads, so the GIL cannot be what limits them).
BUSY4: Final = "for i in 1 2 3 4; do (while :; do :; done) & done; echo started; wait"
CPU_WINDOW: Final = 2.0  # wall seconds measured
# The jobs measured in the same window, and the most CPU-s per wall-s a capped one may show:
# 20% (half) and 30% (tenth) above the cap cover the quota granted at the window's edges.
CPU_CASES: Final = {"half": Limits(cpu_millis=500), "tenth": Limits(cpu_millis=100), "none": Limits()}
CPU_CAPS: Final = {"half": 0.6, "tenth": 0.13}
CPU_STARVED: Final = 0.5  # below this sum the host gave us too little to compare the jobs


@dataclass(frozen=True, kw_only=True)
class CpuRate:
    """A job's CPU-s per wall-s over a window, bracketed: each end's usage was read some time
    between two clock readings, so the true rate is between ``low`` (the longest window the
    readings allow) and ``high`` (the shortest). Slow readings (a loaded host, the TCG VM)
    widen the bracket instead of biasing a point estimate."""

    low: float
    high: float
    window: float

    def __str__(self) -> str:
        return f"{self.low:.3f}-{self.high:.3f} over {self.window:.2f} s"


async def _cpu_window(read_usec: Callable[[str], Awaitable[int]]) -> dict[str, CpuRate]:
    async def bracket(key: str) -> tuple[float, int, float]:
        before = trio.current_time()
        usec = await read_usec(key)
        return before, usec, trio.current_time()

    s0 = {k: await bracket(k) for k in CPU_CASES}
    await trio.sleep(CPU_WINDOW)  # the measurement window itself, not a wait
    s1 = {k: await bracket(k) for k in CPU_CASES}
    out = {}
    for k in CPU_CASES:
        cpu = (s1[k][1] - s0[k][1]) / 1e6
        longest, shortest = s1[k][2] - s0[k][0], s1[k][0] - s0[k][2]
        out[k] = CpuRate(low=cpu / longest, high=cpu / shortest, window=shortest)
    return out


def cpu_starved(r: Mapping[str, CpuRate]) -> bool:
    """The host gave our busy jobs too little CPU to compare them (they share whatever it
    gives at that moment, so a busy host slows all three, not the comparison)."""
    return sum(x.high for x in r.values()) < CPU_STARVED


def cpu_misses(r: Mapping[str, CpuRate]) -> list[str]:
    """What these rates prove wrong, whatever the load and however slow the readings. A
    capped job above its bound even at its lowest rate broke its cap. The uncapped job,
    measured in the same window (the baseline the caps are judged against), must get far
    more than the tenth-CPU job: twice as much and 0.1 CPU more, even at its highest rate
    against the tenth's lowest."""
    misses = [f"{k} above {bound}" for k, bound in CPU_CAPS.items() if r[k].low > bound]
    if not cpu_starved(r):
        if r["none"].high < 2 * r["tenth"].low:
            misses.append("none below 2 x tenth")
        if r["none"].high <= r["tenth"].low + 0.1:
            misses.append("none not 0.1 above tenth")
    return misses


async def cpu_rounds(read_usec: Callable[[str], Awaitable[int]]) -> list[dict[str, CpuRate]]:
    """The CPU rate of every job of CPU_CASES (all busy) over the same window, and over a
    second window (the same jobs) when the first misses or the host starved it.
    ``read_usec(case)`` reads that job's CPU usage."""
    rounds = [await _cpu_window(read_usec)]
    if cpu_misses(rounds[0]) or cpu_starved(rounds[0]):
        rounds.append(await _cpu_window(read_usec))
    return rounds


def cpu_verdict(rounds: list[dict[str, CpuRate]]) -> None:
    """Fail when the last round is still wrong, skip when the host starved it, showing the
    figures of every round either way."""
    figures = "\n".join(
        f"round {i}: " + "; ".join(f"{k} {x}" for k, x in r.items())
        + f" -> {', '.join(cpu_misses(r)) or ('starved' if cpu_starved(r) else 'ok')}"
        for i, r in enumerate(rounds, 1)
    )
    if cpu_misses(rounds[-1]):
        pytest.fail(f"CPU-s per wall-s (caps: half 0.5, tenth 0.1; none uncapped):\n{figures}")
    if cpu_starved(rounds[-1]):
        pytest.skip(f"the host gave too little CPU to 12 busy processes:\n{figures}")
