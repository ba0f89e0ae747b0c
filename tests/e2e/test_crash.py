"""``kill -9`` of the server, then a restart: history and output intact, running jobs LOST."""

from __future__ import annotations

import json
import signal
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .conftest import Host

pytestmark = pytest.mark.slow


def test_kill_9_and_restart(served: Host) -> None:
    done = served.start("sh", "-c", "seq 1 1000; exit 4")
    assert served.run("tail", done, check=False).returncode == 4
    running = served.start("sh", "-c", "echo started; sleep 600")
    follower = served.popen("tail", running)
    assert follower.stdout is not None
    assert follower.stdout.readline() == b"started\n"

    served.stop_server(sig=signal.SIGKILL)
    follower.kill()
    follower.communicate(timeout=30)

    served.start_server()
    finished = json.loads(served.run("status", done, "--json").stdout)
    assert finished["state"] == "JOB_STATE_EXITED"
    assert finished["exit_code"] == 4
    assert served.run("tail", done, check=False).stdout == b"".join(b"%d\n" % i for i in range(1, 1001))

    lost = json.loads(served.run("status", running, "--json").stdout)
    assert lost["state"] == "JOB_STATE_LOST"
    result = served.run("tail", running, check=False)
    assert result.stdout == b"started\n"
    assert result.returncode == 1  # a lost job has no exit status
    assert "lost" in result.stderr.decode()

    ids = [j["job_id"] for j in json.loads(served.run("list", "--json").stdout)["jobs"]]
    assert ids == [done, running]
    # the new server takes new jobs
    assert served.run("tail", served.start("echo", "again")).stdout == b"again\n"
