"""Faults (issue 8): a client killed mid-stream, the server killed mid-run, a full disk, a
damaged or locked database. Real processes, real TLS on loopback, real cgroups where the host
has them; every wait is bounded and event driven."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from e2e.conftest import read_line

from trio_jobs.worker import JobSpec, JobState, leftovers, open_worker, store

from .conftest import connect

if TYPE_CHECKING:
    from collections.abc import Iterator

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
        # v1: one mount per controller; v2: /sys/fs/cgroup itself, or .../unified on hybrid hosts
        mounts = [root / controllers.split(",")[0].removeprefix("name=")] if controllers else [root / "unified", root]
        for mount in mounts:
            base = mount / own.lstrip("/") / parent
            if base.is_dir():
                found += [p for p in base.iterdir() if p.is_dir()]
    return sorted(set(found))


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


# -- the data directory runs out of space ------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted on a directory of this test (root only), unmounted afterwards."""
    mnt = tmp_path / "data"
    mnt.mkdir(mode=0o700)
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs: {exc}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30, check=False)


def _status(host: Host, job: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(host.run("status", job, "--json").stdout)
    return result


@pytest.mark.root
def test_disk_full_keeps_jobs_and_server_alive(host: Host, small_tmpfs: Path, tmp_path: Path) -> None:
    host.start_server("--data-dir", str(small_tmpfs))
    try:
        _disk_full_scenario(host, small_tmpfs, tmp_path)
    finally:
        host.close()  # before the fixture unmounts the data directory


def _disk_full_scenario(host: Host, data: Path, tmp_path: Path) -> None:
    before = host.start("echo", "before")
    assert host.run("tail", before).stdout == b"before\n"
    sleeper = host.start("sleep", "600")  # stopped while the disk is full
    # Leave 256 KiB free; the job then writes 3 MB.
    filler = data / "filler"
    vfs = os.statvfs(data)
    with filler.open("wb") as f:
        f.write(b"\0" * max(0, vfs.f_bavail * vfs.f_frsize - 256 * 1024))
    signal_fifo = tmp_path / "wrote"
    os.mkfifo(signal_fifo)
    flood = host.start("sh", "-c", f"head -c 3000000 /dev/zero; echo wrote > {signal_fifo}; exec sleep 600")
    fd = os.open(signal_fifo, os.O_RDWR)  # never blocks; we hold a writer, so no early EOF
    with os.fdopen(fd, "rb", buffering=0) as fifo:
        assert read_line(fifo, 60) == b"wrote\n"  # the job got past its 3 MB: the pump drained it

    # full: the job still runs, its output is marked truncated, the server answers
    full = _status(host, flood)
    assert full["state"] == "JOB_STATE_RUNNING"
    assert full["output_truncated"] is True
    assert 0 < int(str(full["output_bytes"])) < 3_000_000
    assert _status(host, before)["state"] == "JOB_STATE_EXITED"
    assert host.run("tail", flood, "--no-follow").stdout == b"\0" * int(str(full["output_bytes"]))
    # a job that ends while the disk is full: its final status is true at once, stored later
    assert json.loads(host.run("stop", sleeper, "--grace", "0", "--json").stdout)["status"]["state"] == "JOB_STATE_KILLED"
    assert _status(host, sleeper)["state"] == "JOB_STATE_KILLED"
    attempt = host.run("start", "--", "echo", "while-full", check=False)
    print(f"\nstart on a full disk: exit {attempt.returncode}: {attempt.stderr.decode(errors='replace').strip()}")
    if attempt.returncode != 0:  # refused: a clear, retryable error, never "internal error"
        assert attempt.returncode == 3, attempt.stderr  # UNAVAILABLE
        assert b"could not start the job" in attempt.stderr, attempt.stderr
        assert b"internal" not in attempt.stderr, attempt.stderr
    else:
        assert host.run("tail", attempt.stdout.decode().strip()).stdout == b"while-full\n"
    assert host.server is not None
    assert host.server.poll() is None, "the server died on a full disk"

    # space returns: new jobs work again; the flooded job stops and records truthfully
    filler.unlink()
    after = host.start("echo", "after")
    assert host.run("tail", after).stdout == b"after\n"
    stopped = json.loads(host.run("stop", flood, "--grace", "0", "--json").stdout)
    assert (stopped["status"]["state"], stopped["force_ended"]) == ("JOB_STATE_KILLED", True)
    final = _status(host, flood)
    assert (final["state"], final["output_truncated"]) == ("JOB_STATE_KILLED", True)
    assert final["output_bytes"] == full["output_bytes"]
    assert host.stop_server() == 0
    print(f"server log:\n{host.server_stderr()}")
    # what was recorded while the disk was full survives a restart
    host.start_server("--data-dir", str(data))
    assert _status(host, sleeper)["state"] == "JOB_STATE_KILLED"
    assert _status(host, flood)["state"] == "JOB_STATE_KILLED"


# -- a damaged or locked database ---------------------------------------------------------------


def _serve_once(host: Host) -> subprocess.CompletedProcess[bytes]:
    return host.run("serve", "--port", "0", "--cgroup-parent", host.cgroup_parent, check=False, timeout=60)


def _one_clear_line(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 8, result  # EXIT_CONFIG: local setup
    assert b"listening" not in result.stdout
    lines = [ln for ln in result.stderr.decode().splitlines() if ln.startswith("trio-jobs: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr.decode()
    assert "internal error" not in lines[0]
    return lines[0]


def test_damaged_database_is_one_clear_error(host: Host) -> None:
    host.home.mkdir(parents=True)
    (host.home / "jobs.sqlite3").write_bytes(b"this is not an SQLite database\n" * 200)
    line = _one_clear_line(_serve_once(host))
    assert "jobs.sqlite3 is damaged" in line
    assert "move it aside" in line


def test_truncated_database_is_one_clear_error(host: Host) -> None:
    """A database cut short (e.g. a copy that stopped half-way) rather than a foreign file."""
    host.start_server()
    for _ in range(3):
        host.start("echo", "x")
    assert host.stop_server() == 0
    db = host.home / "jobs.sqlite3"
    data = db.read_bytes()
    db.write_bytes(data[:100] + b"\xff" * (len(data) - 100))  # header kept, pages garbage
    for side in ("-wal", "-shm"):
        (host.home / f"jobs.sqlite3{side}").unlink(missing_ok=True)
    line = _one_clear_line(_serve_once(host))
    assert "damaged" in line


LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
conn.execute("BEGIN EXCLUSIVE")
conn.execute("INSERT INTO t VALUES (1)")
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes our stdin
"""


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_locked_database_is_one_clear_error(host: Host, journal: str) -> None:
    host.home.mkdir(parents=True)
    db = host.home / "jobs.sqlite3"
    if journal == "wal":
        host.start_server()  # a real store, in WAL mode
        assert host.stop_server() == 0
    locker = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert locker.stdout is not None
        assert read_line(locker.stdout, 30) == b"locked\n"
        line = _one_clear_line(_serve_once(host))
        assert "is locked by another process" in line
    finally:
        assert locker.stdin is not None
        locker.stdin.close()
        locker.wait(timeout=30)
        if locker.stdout is not None:
            locker.stdout.close()
    assert locker.returncode == 0
    host.start_server()  # once the lock is gone the server starts


def test_second_server_on_one_data_directory_is_refused(served: Host) -> None:
    """A second server would mark the first one's running jobs LOST and kill their cgroups."""
    job = served.start("sleep", "600")
    line = _one_clear_line(_serve_once(served))
    assert "another trio-jobs server is using the data directory" in line
    assert _status(served, job)["state"] == "JOB_STATE_RUNNING"  # untouched


# -- without cgroups: the process group of a job of a killed server -----------------------------

NO_CGROUP_SERVER = """
import sys, trio
from trio_jobs.worker import JobSpec, open_worker

async def main():
    async with open_worker(sys.argv[1]) as worker:  # no cgroups: process groups
        script = "sleep 600 & echo $!; echo $$; echo ready; wait"
        status = await worker.start(JobSpec(command="/bin/sh", args=("-c", script), owner="admin"))
        print(status.job_id, flush=True)
        out = b""
        async for chunk in worker.follow(status.job_id):
            out += chunk.data
            if out.endswith(b"ready\\n"):
                break
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
        await trio.sleep_forever()

trio.run(main)
"""


async def test_restart_without_cgroups_kills_the_old_process_group(tmp_path: Path) -> None:
    data = tmp_path / "data"
    old = await trio.lowlevel.open_process(
        [sys.executable, "-c", NO_CGROUP_SERVER, str(data)], stdout=subprocess.PIPE
    )
    try:
        assert old.stdout is not None
        with trio.fail_after(60):
            out = await _read_until(old.stdout, b"ready\n")
        job, child, main = out.decode().split()[:3]
        pids = [int(child), int(main)]
        started = {pid: _start_time(pid) for pid in pids}
        assert all(started.values()), started
    finally:
        old.kill()
        await old.wait()
        if old.stdout is not None:
            await old.stdout.aclose()
    assert [pid for pid in pids if _start_time(pid) == started[pid]] == pids  # they outlive it

    async with open_worker(data) as worker:
        survivors = [pid for pid in pids if _start_time(pid) == started[pid]]
        assert survivors == [], f"processes of the old run survived the restart: {survivors}"
        status = await worker.status(job)
        assert status.state is JobState.LOST
        # the history is intact
        assert [j.job_id for j in await worker.list()] == [job]


async def test_leftover_kill_spares_a_reused_pid() -> None:
    """A recorded pid whose start time no longer matches belongs to someone else: untouched."""
    proc = await trio.lowlevel.open_process(["sleep", "600"], start_new_session=True)
    try:
        started = leftovers.start_time(proc.pid)
        assert started is not None
        assert not leftovers.kill_leftover_group(proc.pid, started - 1)  # "another" process
        assert leftovers.group_members(proc.pid) == [proc.pid]
        assert leftovers.kill_leftover_group(proc.pid, started)
        with trio.fail_after(30):
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert not leftovers.kill_leftover_group(proc.pid, started)  # gone: nothing to do
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def test_database_of_an_older_release_opens(tmp_path: Path) -> None:
    """Records written before pid/pid_start existed: columns are added, the running job LOST."""
    data = tmp_path / "data"
    data.mkdir()
    old_schema = store.SCHEMA.replace(",\n    pid INTEGER,\n    pid_start INTEGER", "")
    assert "pid_start" not in old_schema
    conn = sqlite3.connect(data / "jobs.sqlite3")
    conn.executescript(old_schema)
    conn.execute(
        "INSERT INTO jobs (job_id, owner, command, args, state, stopped_by_user, oom_killed, "
        "stopped_by_shutdown, created_at, limits, usage, output_bytes, output_truncated) "
        "VALUES (?, 'alice', '/bin/true', '[]', 'RUNNING', 0, 0, 0, ?, '{}', '{}', 0, 0)",
        ("6d1f0b7e-9a49-4a4e-9d3e-0c1c7f7c2a11", "2026-01-01T00:00:00+00:00"),
    )
    conn.commit()
    conn.close()
    async with open_worker(data) as worker:
        (job,) = await worker.list()
        assert job.state is JobState.LOST
        started = await worker.start(JobSpec(command="/bin/true", owner="alice"))
        assert (await worker.stop(started.job_id, grace=0)).status.job_id == started.job_id
