"""Faults (issue 8): a client killed mid-stream, the server killed mid-run, a full disk, a
damaged or locked database. Real processes, real TLS on loopback, real cgroups where the host
has them; every wait is bounded and event driven."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.worker import JobSpec

from .conftest import connect

if TYPE_CHECKING:
    from e2e.conftest import Host

    from .conftest import InProc

CLI = (sys.executable, "-m", "trio_jobs.cli")


# -- helpers ---------------------------------------------------------------------------------


def _client_env(pki: Path, address: str, identity: str = "admin") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_JOBS_")}
    env.update(TRIO_JOBS_HOME=str(pki.parent), TRIO_JOBS_SERVER=address, TRIO_JOBS_IDENTITY=identity)
    return env


async def _read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    buf = b""
    while marker not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(f"EOF before {marker!r} (got {buf[-200:]!r})")
        buf += data
    return buf


def _start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live, non-zombie process, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _job_cgroups(parent: str) -> list[Path]:
    """Job cgroups under every directory named ``parent`` in this process's cgroups."""
    found: list[Path] = []
    root = Path("/sys/fs/cgroup")
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, own = line.split(":", 2)
        mount = root / controllers.split(",")[0].removeprefix("name=") if controllers else root / "unified"
        base = mount / own.lstrip("/") / parent
        if base.is_dir():
            found += [p for p in base.iterdir() if p.is_dir()]
    return found


# -- a client killed mid-stream --------------------------------------------------------------


@pytest.mark.parametrize("job_output", ["idle", "flood"])
async def test_killed_tail_frees_its_stream(inproc: InProc, job_output: str) -> None:
    """SIGKILL a ``trio-jobs tail``: the server's reader and stream are gone within seconds.

    "idle": the job prints a line and sleeps (the server waits for output). "flood": the job
    writes at full speed and the tail's stdout is never read, so the server is blocked on the
    client's flow-control window when the client dies.
    """
    script = "echo started; exec sleep 600" if job_output == "idle" else "echo started; exec cat /dev/zero"
    status = await inproc.worker.start(JobSpec(command="/bin/sh", args=("-c", script), owner="admin"))
    job = status.job_id
    env = _client_env(inproc.pki, inproc.address)
    tail = await trio.lowlevel.open_process([*CLI, "tail", job], stdout=subprocess.PIPE, env=env)
    try:
        assert tail.stdout is not None
        with trio.fail_after(60):
            await _read_until(tail.stdout, b"started")  # the stream is open and delivering
        assert inproc.worker.followers(job) == 1
        assert inproc.service.open_streams("admin") == 1
        t0 = time.perf_counter()
        tail.kill()
        await tail.wait()
        with trio.fail_after(10):  # "promptly": in practice milliseconds (the kernel closes the socket)
            await inproc.worker.wait_followers(job, 0)
        freed = time.perf_counter() - t0
        print(f"\nkilled tail ({job_output}): server-side reader freed {freed * 1000:.1f} ms after SIGKILL")
        assert inproc.worker.followers(job) == 0
        # the stream count drops in the handler's finally, right after the reader closed
        with trio.fail_after(10):
            while inproc.service.open_streams("admin"):
                await trio.testing.wait_all_tasks_blocked()
        # the job is unaffected and the server still serves
        async with connect(inproc.address, inproc.pki, "admin") as client:
            assert (await client.status(job)).state == "running"
            stopped = await client.stop(job, grace=0)
        assert stopped.job.state == "killed"
        assert stopped.force_ended
    finally:
        with contextlib.suppress(ProcessLookupError):
            tail.kill()
        await tail.wait()
        if tail.stdout is not None:
            await tail.stdout.aclose()


# -- the server killed mid-run -----------------------------------------------------------------


@pytest.mark.cgroups
def test_server_sigkill_restart_kills_leftovers(served: Host) -> None:
    """``kill -9`` of the server: a restart keeps the history, marks the running job LOST
    and kills every process of it (also one that left the process group) and its cgroup."""
    if "cgroups: none" in served.banner:
        pytest.skip("no usable cgroups here: without them a setsid'd process can outlive its job")
    done = served.start("sh", "-c", "echo finished; exit 3")
    assert served.run("tail", done, check=False).returncode == 3
    script = "sleep 600 & echo $!; setsid sleep 600 & echo $!; echo $$; echo ready; wait"
    running = served.start("sh", "-c", script)
    follower = served.popen("tail", running)
    assert follower.stdout is not None
    lines = [follower.stdout.readline() for _ in range(4)]
    assert lines[-1] == b"ready\n", lines
    pids = [int(x) for x in lines[:3]]
    started = {pid: _start_time(pid) for pid in pids}
    assert all(started.values()), started  # every process of the job runs
    assert _job_cgroups(served.cgroup_parent), "the running job has a cgroup"

    served.stop_server(sig=signal.SIGKILL)
    follower.kill()
    follower.communicate(timeout=30)
    # the server is gone, its job's processes are not
    assert [pid for pid in pids if _start_time(pid) == started[pid]] == pids

    served.start_server()  # the banner comes after the cleanup of the old run
    survivors = [pid for pid in pids if _start_time(pid) == started[pid]]
    assert survivors == [], f"processes of the old run survived the restart: {survivors}"
    assert _job_cgroups(served.cgroup_parent) == []
    assert "was running when the previous server stopped" in served.server_stderr()

    finished = json.loads(served.run("status", done, "--json").stdout)
    assert (finished["state"], finished["exit_code"]) == ("JOB_STATE_EXITED", 3)
    assert served.run("tail", done, check=False).stdout == b"finished\n"
    lost = json.loads(served.run("status", running, "--json").stdout)
    assert lost["state"] == "JOB_STATE_LOST"
    assert served.run("tail", running, check=False).stdout.endswith(b"ready\n")
    ids = [j["job_id"] for j in json.loads(served.run("list", "--json").stdout)["jobs"]]
    assert ids == [done, running]
    assert served.run("tail", served.start("echo", "again")).stdout == b"again\n"
