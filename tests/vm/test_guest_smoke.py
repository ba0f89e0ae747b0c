"""Runs inside the cgroup v2 VM (tests/test_cgroup_v2_vm.py boots it): proves that the VM gives
the cgroup tests what they need — cgroup2 with cpu, memory, io and pids delegated, a real block
device for io.max, and limits that the kernel enforces (an OOM kill under memory.max).

Everything happens under a cgroup directory this module creates and removes.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

CGROUP_ROOT = Path("/sys/fs/cgroup")
IN_VM = os.environ.get("TRIO_JOBS_IN_VM") == "1"

pytestmark = [
    pytest.mark.cgroups,
    pytest.mark.root,
    pytest.mark.skipif(
        not IN_VM, reason="runs only inside the cgroup v2 VM (tests/test_cgroup_v2_vm.py)"
    ),
]

# `sh -c` puts itself into the cgroup given as $1, then execs the rest: the program starts
# inside the cgroup.
ENTER = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """A leaf cgroup `job` under a parent created for this test; both removed afterwards."""
    parent = CGROUP_ROOT / f"trio-jobs-vm-smoke-{os.getpid()}"
    parent.mkdir()
    leaf = parent / "job"
    try:
        (parent / "cgroup.subtree_control").write_text("+cpu +memory +io +pids")
        leaf.mkdir()
        yield leaf
    finally:
        if leaf.exists():
            (leaf / "cgroup.kill").write_text("1")
            _wait_unpopulated(leaf)
            leaf.rmdir()
        parent.rmdir()


def _wait_unpopulated(cg: Path, timeout: float = 30) -> None:
    """Wait for `populated 0` (cgroup.kill is asynchronous): kernfs wakes poll() with POLLPRI
    when cgroup.events changes, so this is event-driven; the timeout is only a bound."""
    deadline = time.monotonic() + timeout
    fd = os.open(cg / "cgroup.events", os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while b"populated 0" not in os.pread(fd, 4096, 0):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{cg} still populated {timeout} s after cgroup.kill")
            poller.poll(left * 1000)
    finally:
        os.close(fd)


def _run_in(cg: Path, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["/bin/sh", "-c", ENTER, "sh", str(cg), *argv],
        capture_output=True,
        timeout=timeout,
        check=False,
    )


def _keyed(path: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in path.read_text().splitlines())}


def test_cgroup2_is_mounted_with_nsdelegate() -> None:
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    (entry,) = [m for m in mounts if m[1] == str(CGROUP_ROOT)]
    assert entry[2] == "cgroup2"
    assert "nsdelegate" in entry[3].split(",")


def test_four_controllers_are_enabled_for_children() -> None:
    wanted = {"cpu", "memory", "io", "pids"}
    assert wanted <= set((CGROUP_ROOT / "cgroup.controllers").read_text().split())
    assert wanted <= set((CGROUP_ROOT / "cgroup.subtree_control").read_text().split())


def test_limits_are_written_and_read_back(cgroup: Path) -> None:
    (cgroup / "memory.max").write_text("67108864")
    (cgroup / "memory.swap.max").write_text("0")
    (cgroup / "cpu.max").write_text("50000 100000")
    (cgroup / "pids.max").write_text("64")
    assert (cgroup / "memory.max").read_text().strip() == "67108864"
    assert (cgroup / "memory.swap.max").read_text().strip() == "0"
    assert (cgroup / "cpu.max").read_text().split() == ["50000", "100000"]
    assert (cgroup / "pids.max").read_text().strip() == "64"


def test_scratch_disk_takes_io_max(cgroup: Path) -> None:
    dev = os.environ["TRIO_JOBS_TEST_BLOCKDEV"]
    st = os.stat(dev)
    majmin = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    (cgroup / "io.max").write_text(f"{majmin} wbps=1048576 riops=1000")
    line = (cgroup / "io.max").read_text().strip()
    assert line.startswith(f"{majmin} ")
    assert "wbps=1048576" in line
    assert "riops=1000" in line
    assert os.path.ismount(os.environ["TRIO_JOBS_TEST_BLOCKDEV_DIR"])


def test_memory_max_oom_kills(cgroup: Path) -> None:
    """dd's 200 MiB buffer, filled from /dev/zero: killed under 64 MiB, fine without a limit."""
    hog = ("dd", "if=/dev/zero", "of=/dev/null", "bs=200M", "count=1")
    unlimited = _run_in(cgroup, *hog)
    assert unlimited.returncode == 0, unlimited.stderr
    assert _keyed(cgroup / "memory.events")["oom_kill"] == 0

    (cgroup / "memory.max").write_text(str(64 * 1024 * 1024))
    (cgroup / "memory.swap.max").write_text("0")
    assert (cgroup / "memory.max").read_text().strip() == str(64 * 1024 * 1024)
    limited = _run_in(cgroup, *hog)
    assert limited.returncode == -signal.SIGKILL
    assert _keyed(cgroup / "memory.events")["oom_kill"] > 0
