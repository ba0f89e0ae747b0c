"""The README's five-minute tour, run for real: start, tail with several followers, status,
stop, list, limits, JSON output, errors and exit codes."""

from __future__ import annotations

import json
import re
import subprocess
from typing import TYPE_CHECKING

import pytest

from .conftest import read_until
from .gate import MARKER, Gate

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Host

pytestmark = pytest.mark.slow


def test_zero_config_banner_and_pki(served: Host) -> None:
    assert "cgroups:" in served.banner
    assert "trio-jobs start -- echo hello" in served.banner
    assert f"TRIO_JOBS_SERVER=localhost:{served.address.rsplit(':', 1)[1]}" in served.banner
    for name in ("ca", "server", "admin", "alice", "bob"):
        assert (served.home / "pki" / f"{name}.crt").is_file()
        assert (served.home / "pki" / f"{name}.key").stat().st_mode & 0o077 == 0


def test_tour(served: Host, tmp_path: Path) -> None:
    # start prints the job id alone; tail replays from the first byte and exits like the job
    job = served.start("echo", "hello")
    tail = served.run("tail", job)
    assert tail.stdout == b"hello\n"
    assert served.run("tail", "--job", job).stdout == b"hello\n"

    # several followers of a running job all get the same bytes, and the job's exit status;
    # the job is held after its first line until all three have it (tests/e2e/gate.py)
    with Gate(tmp_path / "go") as gate:
        script = gate.script("for i in $(seq 1 200); do echo line $i; done; echo oops >&2; exit 3")
        job2 = served.start("sh", "-c", script)
        followers = [served.popen("tail", job2) for _ in range(3)]
        gate.release_when_attached(served, job2, followers)
        outputs = [p.communicate(timeout=60) for p in followers]
    rest = b"".join(b"line %d\n" % i for i in range(1, 201)) + b"oops\n"
    assert [o for o, _ in outputs] == [rest] * 3
    assert [p.returncode for p in followers] == [3, 3, 3]
    expected = MARKER + rest

    # status: a table, and the proto3 JSON mapping with the proto's field names
    table = served.run("status", job2).stdout.decode()
    assert "exited 3" in table
    assert "sh -c" in table
    status = json.loads(served.run("status", job2, "--json").stdout)
    assert status["job_id"] == job2
    assert status["state"] == "JOB_STATE_EXITED"
    assert status["exit_code"] == 3
    assert status["output_bytes"] == str(len(expected))  # int64 is a string in proto3 JSON
    assert status["owner"] == "admin"

    # stop: SIGTERM, then the job is killed; tail exits 128 + SIGTERM
    sleeper = served.start("sleep", "600")
    stopped = served.run("stop", sleeper, "--grace", "2s")
    assert "stopped" in stopped.stderr.decode()
    assert served.run("tail", sleeper, check=False).returncode == 128 + 15
    status = json.loads(served.run("status", "--json", "--job", sleeper).stdout)
    assert status["state"] == "JOB_STATE_KILLED"
    assert status["stopped_by_user"] is True
    # stopping an ended job is not an error; --json is the whole StopJobResponse (DESIGN §6)
    again = json.loads(served.run("stop", sleeper, "--grace", "0", "--json").stdout)
    assert again["force_ended"] is False
    assert again["status"]["job_id"] == sleeper
    assert again["status"]["state"] == "JOB_STATE_KILLED"

    # a program that ignores SIGTERM is killed after the grace period
    stubborn = served.start("sh", "-c", "trap '' TERM; echo ready; sleep 600")
    p = served.popen("tail", stubborn)
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    forced = json.loads(served.run("stop", stubborn, "--grace", "500ms", "--json").stdout)
    assert forced["force_ended"] is True
    assert forced["status"]["signal"] == 9
    p.communicate(timeout=60)
    assert p.returncode == 128 + 9

    # list: oldest first, a table and JSON
    listing = served.run("list").stdout.decode()
    order = [listing.index(j) for j in (job, job2, sleeper, stubborn)]
    assert order == sorted(order)
    jobs = json.loads(served.run("list", "--json").stdout)["jobs"]
    assert [j["job_id"] for j in jobs] == [job, job2, sleeper, stubborn]

    # limits: the flags land in the job's status
    limited = served.start(
        "true", options=["--cpus", "0.5", "--memory", "64M", "--pids", "32", "--io-read-bps", "10M"]
    )
    served.run("tail", limited)
    limits = json.loads(served.run("status", limited, "--json").stdout)["limits"]
    assert limits["cpu_millis"] == "500"
    assert limits["memory_bytes"] == str(64 << 20)
    assert limits["pids_max"] == "32"
    assert limits["io_read_bps"] == str(10 << 20)
    assert limits["io_write_bps"] == str(100 << 20)  # the default, filled in
    assert "memory 64M" in served.run("status", limited).stdout.decode()

    # start -f follows at once and exits like tail
    followed = served.run("start", "-f", "-e", "GREETING=hi there", "--cwd", "/tmp", "--", "sh", "-c", 'echo "$GREETING from $(pwd)"; exit 7', check=False)
    assert followed.stdout == b"hi there from /tmp\n"  # only the job's bytes
    assert re.fullmatch(rb"trio-jobs: job [0-9a-f-]{36}\n", followed.stderr), followed.stderr
    assert followed.returncode == 7


ERROR_CASES = [
    (["status", "00000000-0000-4000-8000-000000000000"], 4, "no job"),
    (["status", "not-a-uuid"], 6, "not a UUID"),
    (["status"], 2, "no job given"),
    (["start", "--memory", "lots", "--", "true"], 2, "invalid size"),
    (["start", "--", "no-such-program-xyz"], 6, "not found"),
    (["start", "--cpus", "1000", "--", "true"], 6, "cap"),
    (["list", "--all"], 5, "admin"),
    (["stop", "00000000-0000-4000-8000-000000000000", "--grace", "-1"], 2, "is negative"),
]


def test_errors_are_one_line_with_documented_codes(served: Host) -> None:
    served.run("certs", "issue", "nobody-known", "--dir", str(served.home / "pki"))
    cases = [(args, code, needle, "alice") for args, code, needle in ERROR_CASES]
    cases.append((["start", "--", "true"], 5, "not allowed", "nobody-known"))
    for args, code, needle, identity in cases:
        result = served.run(*args, identity=identity, check=False)
        err = result.stderr.decode()
        assert result.returncode == code, (args, err)
        assert err.startswith("trio-jobs: error: "), err
        assert err.count("\n") == 1, err
        assert needle in err, err
        assert result.stdout == b""


def test_cannot_connect_is_exit_3(host: Host, tmp_path: object) -> None:
    host.start_server()
    address = host.address
    host.stop_server()
    host.address = address
    result = host.run("list", check=False, timeout=60)
    assert result.returncode == 3, result.stderr
    assert result.stderr.decode().startswith("trio-jobs: error: ")


def test_missing_certificates_is_exit_8(host: Host) -> None:
    result = host.run("list", check=False)
    assert result.returncode == 8
    assert "trio-jobs serve" in result.stderr.decode()


def test_graceful_shutdown_stops_jobs_and_exits_0(served: Host) -> None:
    job = served.start("sh", "-c", "echo ready; exec sleep 600")
    follower = served.popen("tail", job)
    assert follower.stdout is not None
    assert follower.stdout.readline() == b"ready\n"  # the follower is attached
    assert served.stop_server() == 0
    _, err = follower.communicate(timeout=60)
    assert follower.returncode == 128 + 15, err
    served.start_server()
    status = json.loads(served.run("status", job, "--json").stdout)
    assert status["state"] == "JOB_STATE_KILLED"
    assert status["stopped_by_shutdown"] is True


def test_second_signal_stops_at_once(served: Host) -> None:
    job = served.start("sh", "-c", "trap '' TERM; echo ready; sleep 600")
    follower = served.popen("tail", job)
    assert follower.stdout is not None
    assert follower.stdout.readline() == b"ready\n"
    assert served.server is not None
    assert served.server.stdout is not None
    served.server.send_signal(2)
    # trio coalesces a signal that arrives twice before it is read: wait for the first
    assert b"shutting down" in read_until(served.server.stdout, b"\n", 30)
    served.server.send_signal(2)
    assert b"at once" in read_until(served.server.stdout, b"\n", 30)
    assert served.stop_server(sig=0, timeout=30) == 0
    _, err = follower.communicate(timeout=60)
    assert follower.returncode == 128 + 9, err  # it got the end and the final status
    served.start_server()
    status = json.loads(served.run("status", job, "--json").stdout)
    assert status["state"] == "JOB_STATE_KILLED"
    assert status["signal"] == 9


def test_help_documents_exit_codes() -> None:
    from .conftest import CLI

    out = subprocess.run([*CLI, "--help"], capture_output=True, timeout=60, check=True).stdout.decode()
    assert "exit codes:" in out
    assert "130" in out
