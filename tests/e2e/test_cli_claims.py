"""Documented behaviours of the CLI and of ``serve`` that had no test (issue 20), each checked
end to end: a real ``trio-jobs serve`` and real client processes over loopback.

- a followed StreamOutput carries the final status in the ``trio-jobs-final-status-bin``
  trailer, equal to GetJobStatus's, and ``tail`` / ``start -f`` use it (no GetJobStatus call);
- ``serve --require-limits`` exits 8 with one line where cgroups are unusable (read-only
  cgroup mounts in a private mount namespace, as in a default Docker container), while
  without the flag the same host serves with the "none" driver;
- Ctrl-C of ``tail`` or ``start -f`` exits 130 with ``trio-jobs: interrupted`` and leaves
  the job running (it later ends on its own, exit 0);
- ``tail JOB`` into a pipe its reader closed exits 141, without a traceback;
- ``JobsClient.tail`` gives up after its reconnect window when the server is gone (the CLI
  has no knob for that window: 60 s, too long for a test; the client's public
  ``Reconnect`` policy is the shortest public means);
- a graceful shutdown (SIGTERM, SIGINT) stops the jobs, kills their processes and removes
  their cgroups and the parent the server created.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from trio_jobs.client import FINAL_STATUS_KEY, JobsClient, JobsError, Reconnect
from trio_jobs.rpc import StatusCode, connect
from trio_jobs.security.tls import client_ssl_context
from trio_jobs.v1 import jobs_pb2 as pb

from .conftest import CLI, COMMAND_TIMEOUT, STARTUP_TIMEOUT, read_line, read_until

if TYPE_CHECKING:
    from .conftest import Host

pytestmark = pytest.mark.slow

_SERVICE = "/trio_jobs.v1.JobService/"


def _audit_methods(host: Host) -> list[tuple[str, str | None]]:
    """(method, job_id) of every line of the server's audit log, in order."""
    lines = (host.home / "audit.jsonl").read_text().splitlines()
    return [(r["method"], r.get("job_id")) for r in map(json.loads, lines)]


def _status(host: Host, job: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(host.run("status", job, "--json").stdout)
    return result


# -- 1. the final status travels in the trailer ---------------------------------------------


def test_tail_and_start_f_take_the_exit_status_from_the_trailer(host: Host) -> None:
    """With ``--audit-reads`` every successful GetJobStatus is logged: a follower that needed
    one after its stream (the client's fallback when the trailer is missing) would show."""
    host.start_server("--audit-reads")
    job = host.start("sh", "-c", "echo out; exit 3")
    tailed = host.run("tail", job, check=False)
    assert (tailed.returncode, tailed.stdout, tailed.stderr) == (3, b"out\n", b"")
    started = host.run("start", "-f", "--", "sh", "-c", "echo more; exit 5", check=False)
    assert (started.returncode, started.stdout) == (5, b"more\n"), started.stderr
    second = started.stderr.decode().removeprefix("trio-jobs: job ").strip()
    assert _audit_methods(host) == [
        ("StartJob", job), ("StreamOutput", job), ("StartJob", second), ("StreamOutput", second),
    ]  # fmt: skip
    # the control: a GetJobStatus of this client does reach the log
    host.run("status", job)
    assert _audit_methods(host)[-1] == ("GetJobStatus", job)


async def test_the_trailer_holds_the_same_status_as_get_job_status(served: Host) -> None:
    """Drive StreamOutput on the wire and read its trailers: one job that exits, one that a
    signal kills; each trailer's JobStatus equals GetJobStatus's, field for field."""
    pki = served.home / "pki"
    ctx = client_ssl_context(cert=pki / "admin.crt", key=pki / "admin.key", ca=pki / "ca.crt")
    address, port = served.address.rsplit(":", 1)
    with trio.fail_after(COMMAND_TIMEOUT):
        async with connect(address, int(port), ssl_context=ctx) as channel:
            for argv, state, field, value in (
                (["-c", "echo out; exit 3"], pb.JOB_STATE_EXITED, "exit_code", 3),
                (["-c", "echo out; kill -TERM $$"], pb.JOB_STATE_KILLED, "signal", signal.SIGTERM),
            ):
                started = await channel.unary(
                    _SERVICE + "StartJob", pb.StartJobRequest(command="sh", args=argv), pb.StartJobResponse
                )
                job = started.job_id
                request = pb.StreamOutputRequest(job_id=job, offset=0, follow=True)
                data = b""
                async with channel.server_stream(_SERVICE + "StreamOutput", request, pb.OutputChunk) as stream:
                    async for chunk in stream:
                        data += chunk.data
                    trailers = [v for k, v in stream.trailing_metadata if k == FINAL_STATUS_KEY]
                assert data == b"out\n"
                assert len(trailers) == 1
                assert isinstance(trailers[0], bytes)
                final = pb.JobStatus.FromString(trailers[0])
                assert (final.job_id, final.state, getattr(final, field)) == (job, state, value)
                assert final.HasField("ended_at")
                asked = await channel.unary(_SERVICE + "GetJobStatus", pb.GetJobStatusRequest(job_id=job), pb.JobStatus)
                assert final == asked


# -- 2. serve --require-limits --------------------------------------------------------------


def _cgroup_mounts() -> list[str]:
    """Mount points of every cgroup (v1) and cgroup2 file system this process sees."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if right.split()[:1] in (["cgroup"], ["cgroup2"]):
            points.append(left.split()[4].replace("\\040", " "))
    return points


# sh -c SCRIPT sh MOUNT... -- COMMAND...: in a private mount namespace, remount the cgroup
# file systems read-only (only this namespace's view), then exec the command.
_READ_ONLY_CGROUPS = """
while [ "$1" != -- ]; do mount -o remount,bind,ro "$1" || exit 99; shift; done
shift
exec "$@"
"""


def _without_cgroups(host: Host, *serve_args: str) -> subprocess.Popen[bytes]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to give the server read-only cgroup mounts")
    mounts = _cgroup_mounts()
    if not mounts:
        pytest.skip("this host has no cgroup file system to make unusable")
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _READ_ONLY_CGROUPS, "sh",
            *mounts, "--", *CLI, "serve", "--port", "0", "--cgroup-parent", host.cgroup_parent, *serve_args]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=host.env())


def test_require_limits_exits_8_where_cgroups_are_unusable(host: Host) -> None:
    refused = _without_cgroups(host, "--require-limits")
    try:
        assert refused.stdout is not None
        # EOF, not a banner: a server that started anyway fails here at once
        assert read_line(refused.stdout, STARTUP_TIMEOUT) == b""
        _, err = refused.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        _end(refused)
    assert refused.returncode == 8, err.decode()
    *notes, line = err.decode().splitlines()
    assert notes == [f"created the development PKI in {host.home / 'pki'}"]  # first run
    assert line.startswith("trio-jobs: error: cgroups: no usable cgroups ("), line
    assert "read-only" in line
    assert line.endswith("; refusing to run jobs without resource limits")

    # The control: the same host without the flag serves, with no limits and a warning.
    serving = _without_cgroups(host)
    try:
        assert serving.stdout is not None
        banner = read_until(serving.stdout, b"at once)\n", STARTUP_TIMEOUT).decode()
        assert banner.startswith("trio-jobs listening on 127.0.0.1:"), banner
        assert "cgroups: no cgroups (no usable cgroups (" in banner
        serving.send_signal(signal.SIGTERM)
        _, err = serving.communicate(timeout=COMMAND_TIMEOUT)
    finally:
        _end(serving)
    assert serving.returncode == 0, err.decode()
    assert "trio-jobs: WARNING: no usable cgroups: jobs run WITHOUT cpu/memory/io/pids limits" in err.decode()


def _end(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs (a failed check), and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=COMMAND_TIMEOUT)


# -- 3. Ctrl-C of a follower ----------------------------------------------------------------


@pytest.mark.parametrize("command", ["tail", "start -f"])
def test_ctrl_c_exits_130_and_leaves_the_job_running(served: Host, tmp_path: Path, command: str) -> None:
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    argv = ("sh", "-c", f"echo started; read x < {fifo}; echo finished")
    if command == "tail":
        job = served.start(*argv)
        follower = served.popen("tail", job)
    else:
        follower = served.popen("start", "-f", "--", *argv)
        assert follower.stderr is not None
        job = read_line(follower.stderr, COMMAND_TIMEOUT).decode().removeprefix("trio-jobs: job ").strip()
    assert follower.stdout is not None
    assert read_line(follower.stdout, COMMAND_TIMEOUT) == b"started\n"  # it is following

    follower.send_signal(signal.SIGINT)
    rest, err = follower.communicate(timeout=COMMAND_TIMEOUT)
    assert (follower.returncode, rest) == (130, b"")
    assert err.decode().splitlines()[-1:] == ["trio-jobs: interrupted"], err.decode()
    assert "Traceback" not in err.decode()
    assert _status(served, job)["state"] == "JOB_STATE_RUNNING"

    with fifo.open("w") as release:  # the job goes on from where it was, and ends by itself
        release.write("go\n")
    done = served.run("tail", job, check=False)
    assert (done.returncode, done.stdout) == (0, b"started\nfinished\n"), done.stderr
    assert _status(served, job)["state"] == "JOB_STATE_EXITED"


# -- 4. tail | head -------------------------------------------------------------------------


def test_tail_into_a_closed_pipe_exits_141(served: Host) -> None:
    # 8 MiB: more than the pipe holds (tail grows it to 1 MiB), so tail is still writing
    # when the reader goes away.
    job = served.start("sh", "-c", "seq 1 1200000")
    follower = served.popen("tail", job)
    assert follower.stdout is not None
    head = b""
    while len(head) < 100:
        head += os.read(follower.stdout.fileno(), 100 - len(head))
    assert head.startswith(b"1\n2\n3\n")
    follower.stdout.close()  # what `head -c 100` does once it has its bytes
    _, err = follower.communicate(timeout=COMMAND_TIMEOUT)
    assert follower.returncode == 141, err.decode()
    assert err == b""


# -- 5. tail's reconnect window -------------------------------------------------------------


async def test_tail_gives_up_after_its_reconnect_window(served: Host) -> None:
    """Kill the server (SIGKILL: no trailer, no GOAWAY) during a follow: tail keeps trying to
    reconnect (each attempt is refused at once) and gives up after ``Reconnect.window``
    without progress. The CLI uses the default (60 s) and has no option for it."""
    window = 3.0
    pki = served.home / "pki"
    job = served.start("sh", "-c", "echo started; sleep 600")
    got_first = trio.Event()
    received: list[bytes] = []

    async def sink(data: bytes) -> None:
        received.append(data)
        got_first.set()

    assert Reconnect().window == 60.0  # the CLI's: documented in docs/cli.md
    async with JobsClient.connect(served.address, cert=pki / "admin.crt", key=pki / "admin.key",
                                  ca=pki / "ca.crt", reconnect=Reconnect(window=window)) as jobs:
        failure: list[JobsError] = []
        done = trio.Event()

        async def follow() -> None:
            try:
                await jobs.tail(job, sink)
            except JobsError as exc:
                failure.append(exc)
            finally:
                done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            with trio.fail_after(COMMAND_TIMEOUT):
                await got_first.wait()
            assert served.server is not None
            served.server.kill()
            killed_at = trio.current_time()
            with trio.fail_after(window + 10):  # a tail that never gives up fails here
                await done.wait()
            gave_up_after = trio.current_time() - killed_at

    assert b"".join(received) == b"started\n"
    assert len(failure) == 1
    assert failure[0].code == StatusCode.UNAVAILABLE
    assert "gave up" in failure[0].message, failure[0].message
    # The window after the last progress (the stream's end, just after the kill): not at
    # the first refusal, and not a backoff wait (at most 2 s) past it.
    assert window - 0.5 <= gave_up_after <= window + 2.0, gave_up_after
    # The job the killed server left, and its cgroup, are the fixture's to remove (a killed
    # server may leave them: its next start would).


# -- 6. graceful shutdown removes the jobs' cgroups -----------------------------------------


def _parent_dirs(name: str) -> list[Path]:
    """The directories of cgroup ``name`` under this process's own cgroup in every hierarchy:
    where the e2e servers (our children, in our cgroups) put their jobs' cgroups."""
    root = Path("/sys/fs/cgroup")
    found: set[Path] = set()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, own = line.split(":", 2)
        names = [c for c in controllers.split(",") if c] if controllers else [""]
        for sub in [root / c for c in names] + [root / controllers]:
            base = sub.joinpath(own.lstrip("/"), name)
            if base.is_dir():
                found.add(base.resolve())
    return sorted(found)


def _pids_under(dirs: list[Path]) -> set[int]:
    return {int(p) for d in dirs for f in d.rglob("cgroup.procs") for p in f.read_text().split()}


def _dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has ended


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_graceful_shutdown_stops_the_jobs_and_removes_their_cgroups(served: Host, sig: int) -> None:
    if "cgroups: no cgroups" in served.banner:
        pytest.skip("the server found no usable cgroups on this host")
    assert not [d for d in _parent_dirs(served.cgroup_parent) if any(p.is_dir() for p in d.iterdir())]
    mine = served.start("sh", "-c", "sleep 600 & echo started; wait")
    theirs = served.start("sleep", "600", identity="alice")  # a user's jobs sit in a group cgroup
    follower = served.popen("tail", mine)
    assert follower.stdout is not None
    assert read_line(follower.stdout, COMMAND_TIMEOUT) == b"started\n"  # both sleeps are running

    dirs = _parent_dirs(served.cgroup_parent)
    job_dirs = [p for d in dirs for p in d.rglob("*") if p.is_dir() and (p / "cgroup.procs").read_text().split()]
    assert len(job_dirs) >= 2, job_dirs
    pids = _pids_under(dirs)
    assert len(pids) >= 3, pids  # sh and its sleep, alice's sleep

    assert served.stop_server(sig=sig, timeout=COMMAND_TIMEOUT) == 0
    # The follower got the final status in the trailer while the server drained.
    rest, err = follower.communicate(timeout=COMMAND_TIMEOUT)
    assert (follower.returncode, rest) == (128 + signal.SIGTERM, b""), err.decode()
    assert _parent_dirs(served.cgroup_parent) == []
    assert [p for p in job_dirs if p.exists()] == []
    assert {p for p in pids if not _dead(p)} == set()

    served.start_server()
    for job, who in ((mine, None), (theirs, "alice")):
        status = json.loads(served.run("status", job, "--json", identity=who).stdout)
        assert (status["state"], status.get("stopped_by_shutdown")) == ("JOB_STATE_KILLED", True), status
