"""Retention end to end (DESIGN §7): ``trio-jobs serve --retain-jobs N`` deletes the oldest
ended jobs -- record and output file -- and a deleted job is NOT_FOUND (exit 4) for the
client; bad ``--retain-*`` values are a usage error (exit 2) with one line."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .conftest import Host

GONE_WITHIN = 15.0  # a pass follows a job's end within a second; bounded generously


def _wait_not_found(host: Host, job_id: str) -> None:
    """Until ``status`` says NOT_FOUND. Retention runs in the server's background after a
    job ends and nothing outside tells when it ran: a bounded poll."""
    deadline = time.monotonic() + GONE_WITHIN
    while True:
        result = host.run("status", job_id, check=False)
        if result.returncode == 4:
            return
        assert result.returncode == 0, result.stderr
        assert time.monotonic() < deadline, f"job {job_id} still exists {GONE_WITHIN}s later"
        time.sleep(0.1)


def test_retain_jobs_deletes_the_oldest_ended_jobs(host: Host) -> None:
    host.start_server("--retain-jobs", "2")
    sleeper = host.start("sleep", "600")  # running: never counted, never deleted
    ended = []
    for word in ("one", "two", "three", "four"):
        ended.append(host.start("echo", word))
        assert host.run("tail", ended[-1]).stdout == f"{word}\n".encode()
    for job_id in ended[:2]:
        _wait_not_found(host, job_id)
        result = host.run("tail", job_id, check=False)
        assert result.returncode == 4, result.stderr
        assert b"no job" in result.stderr
        assert not (host.home / "output" / f"{job_id}.out").exists()
    listed = [j["job_id"] for j in json.loads(host.run("list", "--json").stdout)["jobs"]]
    assert listed == [sleeper, *ended[2:]]
    assert host.run("tail", ended[3]).stdout == b"four\n"
    assert json.loads(host.run("status", sleeper, "--json").stdout)["state"] == "JOB_STATE_RUNNING"
    host.run("stop", sleeper, "--grace", "0")
    _wait_not_found(host, ended[2])  # the sleeper's end made 3 ended jobs: the oldest end goes
    assert host.stop_server() == 0


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--retain-jobs", "0", "greater than zero"),
    ("--retain-jobs", "many", "invalid count"),
    ("--retain-output", "0", "greater than zero"),
    ("--retain-output", "10X", "invalid size"),
    ("--retain-for", "0", "greater than zero"),
    ("--retain-for", "-1d", "invalid duration"),
    ("--retain-for", "soon", "invalid duration"),
])
def test_bad_retention_values_are_usage_errors(host: Host, flag: str, value: str, needle: str) -> None:
    result = host.run("serve", "--port", "0", f"{flag}={value}", check=False)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.startswith("trio-jobs: error: "), err
    assert err.count("\n") == 1, err
    assert needle in err, err
    assert b"listening" not in result.stdout
