"""Two servers with different homes on one host never clean up each other's jobs."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

import pytest

from trio_jobs.worker.cgroups.detect import default_cgroup_parent

from .conftest import Host

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = pytest.mark.slow


def test_default_parent_is_per_data_directory(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert default_cgroup_parent(a) == default_cgroup_parent(tmp_path / "x" / ".." / "a")
    assert default_cgroup_parent(a) != default_cgroup_parent(b)
    assert default_cgroup_parent(a).startswith("trio-jobs-")


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    hosts = []
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        hosts.append(Host(tmp_path / name / "home", tmp_path / name, default_cgroup_parent=True))
    with contextlib.ExitStack() as closing:  # every host is closed, even if one reports
        for h in hosts:
            closing.callback(h.close)
        yield hosts[0], hosts[1]


def test_second_server_leaves_first_servers_jobs_alone(two_hosts: tuple[Host, Host]) -> None:
    first, second = two_hosts
    first.start_server()
    job = first.start("sleep", "600")
    second.start_server()  # its start-up cleans leftovers of *its* state only
    second.start("true")
    status = json.loads(first.run("status", job, "--json").stdout)
    assert status["state"] == "JOB_STATE_RUNNING", status
    first.run("stop", job, "--grace", "0")
