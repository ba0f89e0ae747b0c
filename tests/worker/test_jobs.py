"""Real processes through the Worker (NoCgroupDriver: process-group kill)."""

from __future__ import annotations

import hashlib
import os
import signal
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.worker import (
    InvalidArgument,
    JobNotFound,
    JobSpec,
    JobState,
    WorkerClosed,
    open_worker,
)
from trio_jobs.worker.job import DRAIN_TIMEOUT

from .conftest import read_all, sh

if TYPE_CHECKING:
    from pathlib import Path

    from trio_jobs.worker import Worker


async def _dies(pid: int) -> bool:
    """Whether process ``pid`` exits within a few seconds (SIGKILL is delivered asynchronously,
    so a killed process may still be finishing its exit). Event driven: a pidfd becomes
    readable when the process exits."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        with trio.move_on_after(5):
            await trio.lowlevel.wait_readable(pidfd)
            return True
        return False
    finally:
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)


async def test_output_exit_code_and_interleaving(worker: Worker) -> None:
    status = await worker.start(sh("echo a; echo b >&2; echo c; exit 3"))
    assert status.state is JobState.RUNNING
    assert await read_all(worker, status.job_id) == b"a\nb\nc\n"  # one pipe: exact order
    final = await worker.status(status.job_id)
    assert (final.state, final.exit_code, final.signal) == (JobState.EXITED, 3, None)
    assert final.output_bytes == 6
    assert not final.output_truncated
    assert final.ended_at is not None
    assert final.ended_at >= final.created_at


async def test_clean_environment_cwd_and_stdin(worker: Worker, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVER_SECRET", "must-not-leak")
    status = await worker.start(sh("env; pwd; cat; echo done", env={"GREETING": "hi"},
                                   working_dir=str(tmp_path)))
    out = (await read_all(worker, status.job_id)).decode()
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert "SERVER_SECRET" not in env
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["LANG"] == "C.UTF-8"
    assert env["GREETING"] == "hi"
    assert {"HOME", "USER", "LOGNAME"} <= env.keys()
    assert set(env) <= {"PATH", "LANG", "HOME", "USER", "LOGNAME", "GREETING", "PWD"}
    assert out.endswith(f"{tmp_path}\ndone\n")  # cat read /dev/null: EOF at once


async def test_program_is_looked_up_in_the_fixed_path(worker: Worker) -> None:
    status = await worker.start(JobSpec(command="echo", args=("x y", "$HOME"), owner="o"))
    assert await read_all(worker, status.job_id) == b"x y $HOME\n"  # argv, never a shell


async def test_background_child_does_not_keep_the_job_alive(worker: Worker) -> None:
    with trio.fail_after(20):
        status = await worker.start(sh("sleep 1000 & echo $!; echo hi"))
        out = await read_all(worker, status.job_id)
    pid_line, hi = out.decode().split()
    assert hi == "hi"
    final = await worker.status(status.job_id)
    assert (final.state, final.exit_code) == (JobState.EXITED, 0)
    assert await _dies(int(pid_line)), "the background sleep survived its job"


async def test_setsid_escapee_cannot_hang_the_job_or_followers(worker: Worker) -> None:
    """Without cgroups a setsid'd process escapes the group kill and holds the pipe; the
    drain is bounded, so the job and its followers still end. (The cgroup drivers kill it.)"""
    with trio.fail_after(DRAIN_TIMEOUT + 20):
        status = await worker.start(sh("setsid sleep 1000 & echo $!"))
        out = await read_all(worker, status.job_id)
    pid = int(out.split()[0])
    try:
        final = await worker.status(status.job_id)
        assert (final.state, final.exit_code) == (JobState.EXITED, 0)
    finally:
        pidfd = os.pidfd_open(pid)  # the escapee is alive (unreaped), so this is that process
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)


async def test_stop_sigterm_then_status(worker: Worker) -> None:
    status = await worker.start(sh("echo ready; exec sleep 1000"))
    reader = worker.follow(status.job_id)
    assert (await reader.__anext__()).data == b"ready\n"
    with trio.fail_after(10):
        result = await worker.stop(status.job_id, grace=5)
    assert result.force_ended
    assert (result.status.state, result.status.signal) == (JobState.KILLED, signal.SIGTERM)
    assert result.status.stopped_by_user
    assert not result.status.stopped_by_shutdown
    assert [c async for c in reader] == []  # the follower ends with the job
    again = await worker.stop(status.job_id)  # stopping an ended job is not an error
    assert not again.force_ended
    assert again.status == result.status


async def test_job_ignoring_sigterm_is_killed_after_the_grace_period(worker: Worker) -> None:
    status = await worker.start(sh("trap '' TERM; echo ready; while :; do sleep 1; done"))
    reader = worker.follow(status.job_id)
    assert (await reader.__anext__()).data == b"ready\n"  # the trap is in place
    start = trio.current_time()
    with trio.fail_after(20):
        result = await worker.stop(status.job_id, grace=0.5)
    assert trio.current_time() - start >= 0.5
    assert result.force_ended
    assert (result.status.state, result.status.signal) == (JobState.KILLED, signal.SIGKILL)
    await reader.aclose()


async def test_grace_zero_kills_at_once(worker: Worker) -> None:
    status = await worker.start(sh("trap '' TERM; exec sleep 1000"))
    with trio.fail_after(10):
        result = await worker.stop(status.job_id, grace=0)
    assert result.force_ended
    assert result.status.signal == signal.SIGKILL


async def test_running_count_per_owner(worker: Worker) -> None:
    def job(owner: str, script: str) -> JobSpec:
        return JobSpec(command="/bin/sh", args=("-c", script), owner=owner)

    a1 = await worker.start(job("a", "exec sleep 1000"))
    await worker.start(job("a", "exec sleep 1000"))
    b = await worker.start(job("b", "exec sleep 1000"))
    done = await worker.start(job("a", "true"))
    with trio.fail_after(10):
        await read_all(worker, done.job_id)  # ends once the job has ended
    assert (worker.running_count(owner="a"), worker.running_count(owner="b")) == (2, 1)
    assert worker.running_count() == 3
    await worker.stop(a1.job_id, grace=0)
    await worker.stop(b.job_id, grace=0)
    assert (worker.running_count(owner="a"), worker.running_count(owner="b")) == (1, 0)


async def test_stop_racing_a_natural_exit_reports_the_truth(worker: Worker) -> None:
    """Stop sent at the moment the job exits on its own: either outcome may happen, but what
    is reported must be the one that did (exit code 7 means it was not force-ended)."""
    outcomes = set()
    with trio.fail_after(60):
        for _ in range(40):
            status = await worker.start(sh("exit 7"))
            result = await worker.stop(status.job_id, grace=5)
            s = result.status
            if s.state is JobState.EXITED:
                assert (s.exit_code, s.signal, result.force_ended) == (7, None, False)
                assert not s.stopped_by_user
            else:
                assert (s.state, s.signal, result.force_ended) == (
                    JobState.KILLED, signal.SIGTERM, True)
                assert s.stopped_by_user
            assert await worker.status(status.job_id) == s
            outcomes.add(s.state)
    # an exited job is never reported as stopped
    status = await worker.start(sh("exit 7"))
    await read_all(worker, status.job_id)
    result = await worker.stop(status.job_id)
    assert not result.force_ended
    assert result.status.exit_code == 7


async def test_late_follower_gets_the_whole_output(worker: Worker) -> None:
    status = await worker.start(sh("head -c 300000 /dev/urandom"))
    first = await read_all(worker, status.job_id)
    assert len(first) == 300000
    assert await read_all(worker, status.job_id) == first  # after the end
    assert await read_all(worker, status.job_id, 123456) == first[123456:]
    assert await read_all(worker, status.job_id, 300000) == b""
    assert await read_all(worker, status.job_id, 10**9) == b""
    assert await read_all(worker, status.job_id, 5, wait=False) == first[5:]


async def test_output_cap_drains_and_says_truncated(tmp_path: Path) -> None:
    async with open_worker(tmp_path, output_cap=1000) as worker:
        status = await worker.start(sh("head -c 500000 /dev/zero; echo end >&2"))
        assert await read_all(worker, status.job_id) == b"\0" * 1000
        final = await worker.status(status.job_id)
        assert final.exit_code == 0  # it was not blocked on a full pipe
        assert final.output_bytes == 1000
        assert final.output_truncated


@pytest.mark.slow
async def test_twenty_followers_of_50_mb_see_identical_bytes(worker: Worker) -> None:
    status = await worker.start(JobSpec(command="head", args=("-c", "50000000", "/dev/urandom"),
                                        owner="o"))
    digests: list[tuple[int, str]] = []

    async def follow() -> None:
        h, n = hashlib.sha256(), 0
        async for chunk in worker.follow(status.job_id):
            h.update(chunk.data)
            n += len(chunk.data)
        digests.append((n, h.hexdigest()))

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(follow)
        await follow()  # and one more after the end, from the spool file
    assert len(digests) == 21
    assert len(set(digests)) == 1
    assert digests[0][0] == 50_000_000
    assert (await worker.status(status.job_id)).output_bytes == 50_000_000


async def test_restart_on_the_same_data_dir_keeps_jobs_and_output(tmp_path: Path) -> None:
    async with open_worker(tmp_path) as worker:
        done = await worker.start(sh("echo persisted; exit 4"))
        await read_all(worker, done.job_id)
        running = await worker.start(sh("echo partial; exec sleep 1000"))
        reader = worker.follow(running.job_id)
        await reader.__anext__()
        await reader.aclose()
        before = {s.job_id: s for s in await worker.list()}
    # leaving open_worker stopped the running job (reason: shutdown)
    async with open_worker(tmp_path) as worker:
        after = {s.job_id: s for s in await worker.list()}
        assert after == before | {running.job_id: after[running.job_id]}
        stopped = after[running.job_id]
        assert stopped.state is JobState.KILLED
        assert stopped.stopped_by_shutdown
        assert await read_all(worker, done.job_id) == b"persisted\n"
        assert await read_all(worker, running.job_id) == b"partial\n"
        assert (await worker.status(done.job_id)).exit_code == 4
        assert [s.job_id for s in await worker.list(owner="tester")] == [done.job_id,
                                                                        running.job_id]
        assert await worker.list(owner="nobody-else") == []


async def test_jobs_running_when_the_worker_died_are_lost(tmp_path: Path) -> None:
    from trio_jobs.worker.store import JobStore  # simulate a crash: a RUNNING record remains

    async with open_worker(tmp_path) as worker:
        status = await worker.start(sh("echo hi"))
        await read_all(worker, status.job_id)
    store = await JobStore.open(tmp_path / "jobs.sqlite3")
    crashed = type(status)(**{**status.__dict__, "job_id": "00000000-0000-4000-8000-000000000000"})
    await store.insert(crashed)
    await store.aclose()
    (tmp_path / "output" / f"{crashed.job_id}.out").write_bytes(b"before the crash")
    async with open_worker(tmp_path) as worker:
        lost = await worker.status(crashed.job_id)
        assert lost.state is JobState.LOST
        assert lost.ended_at is not None
        assert lost.output_bytes == 16
        assert await read_all(worker, crashed.job_id) == b"before the crash"


async def test_unknown_job_and_bad_arguments(worker: Worker) -> None:
    with pytest.raises(JobNotFound):
        await worker.status("nope")
    with pytest.raises(JobNotFound):
        await worker.stop("nope")
    with pytest.raises(JobNotFound):
        worker.follow("nope")
    status = await worker.start(sh("true"))
    with pytest.raises(InvalidArgument):
        worker.follow(status.job_id, -1)
    with pytest.raises(InvalidArgument):
        await worker.stop(status.job_id, grace=-1)
    with pytest.raises(InvalidArgument):
        await worker.stop(status.job_id, grace=float("nan"))
    await read_all(worker, status.job_id)


async def test_shutdown_stops_jobs_and_refuses_new_ones(tmp_path: Path) -> None:
    async with open_worker(tmp_path) as worker:
        status = await worker.start(sh("exec sleep 1000"))
        with trio.fail_after(10):
            await worker.shutdown(grace=1)
        final = await worker.status(status.job_id)
        assert final.state is JobState.KILLED
        assert final.stopped_by_shutdown
        assert not final.stopped_by_user
        with pytest.raises(WorkerClosed):
            await worker.start(sh("true"))
        await worker.shutdown()  # idempotent


async def test_cancelling_the_worker_still_kills_and_records_jobs(tmp_path: Path) -> None:
    pids: list[int] = []
    with trio.move_on_after(30) as outer:
        async with open_worker(tmp_path, default_grace=0.2) as worker:
            status = await worker.start(sh("trap '' TERM; echo $$; exec sleep 1000"))
            async for chunk in worker.follow(status.job_id):
                pids.append(int(chunk.data))
                break
            outer.cancel()  # the body is cancelled: open_worker still stops the job
            await trio.sleep_forever()
    assert outer.cancelled_caught
    async with open_worker(tmp_path) as worker:
        final = await worker.status(status.job_id)
        assert final.state is JobState.KILLED
        assert final.stopped_by_shutdown
    assert await _dies(pids[0])


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="running a job as another user needs root")
async def test_run_as_another_user(worker: Worker) -> None:
    from trio_jobs.worker import RunAs

    status = await worker.start(sh("id -u; id -g; echo $HOME $USER",
                                   run_as=RunAs(uid=65534, gid=65534, name="nobody",
                                                home="/nonexistent")))
    assert await read_all(worker, status.job_id) == b"65534\n65534\n/nonexistent nobody\n"


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="running a job as another user needs root")
async def test_run_as_drops_every_id_group_and_capability(worker: Worker) -> None:
    """The switch (setpriv, before the held shell) leaves the job no way back to root: real,
    effective, saved and fs ids are the user's, the groups are exactly the given ones, no
    capability is left (the bounding set included), and no_new_privs is set."""
    from trio_jobs.worker import RunAs
    from trio_jobs.worker import spawn as spawn_module

    if spawn_module.SETPRIV is None:
        pytest.skip("util-linux setpriv is not installed")
    script = "grep -E '^(Uid|Gid|Groups|CapPrm|CapEff|CapAmb|CapBnd|CapInh|NoNewPrivs):' /proc/self/status"
    for groups, shown in (((65534, 4), "65534 4"), ((), "")):
        run_as = RunAs(uid=65534, gid=65534, groups=groups, name="nobody", home="/")
        status = await worker.start(sh(script, run_as=run_as))
        lines = dict(line.split(":", 1) for line in (await read_all(worker, status.job_id)).decode().splitlines())
        assert lines["Uid"].split() == ["65534"] * 4
        assert lines["Gid"].split() == ["65534"] * 4
        assert sorted(lines["Groups"].split()) == sorted(shown.split())  # the kernel sorts them
        for caps in ("CapPrm", "CapEff", "CapAmb", "CapBnd", "CapInh"):
            assert int(lines[caps], 16) == 0, lines
        assert lines["NoNewPrivs"].strip() == "1"
        assert (await worker.status(status.job_id)).exit_code == 0


async def test_usage_without_cgroups_comes_from_the_main_process(worker: Worker) -> None:
    status = await worker.start(sh("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"))
    await read_all(worker, status.job_id)
    usage = (await worker.status(status.job_id)).usage
    assert usage.cpu_usec > 0
    assert usage.memory_peak_bytes > 0
