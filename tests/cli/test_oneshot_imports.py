"""The one-shot commands (start, stop, status, list) stay off trio, the server and
``cryptography``: they pay only for the call they make (issue #19). Run as a real process,
with what each command imported listed at exit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

JOB = "00000000-0000-4000-8000-000000000000"
HEAVY = ("trio", "cryptography", "trio_jobs.server", "trio_jobs.service", "trio_jobs.worker",
         "trio_jobs.rpc._server", "trio_jobs.client", "asyncio",
         # what a one-shot command uses only on some paths (#19: each costs ~1-2 ms at start)
         "pathlib", "google.protobuf.json_format", "encodings.idna", "signal")
PROBE = f"""
import json, sys
from trio_jobs.cli.main import main
code = main(sys.argv[1:])
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
sys.stderr.write(json.dumps({{"code": code, "heavy": heavy}}) + "\\n")
"""


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _run(dev_pki: Path, *argv: str) -> dict[str, object]:
    env = {**os.environ, "TRIO_JOBS_HOME": str(dev_pki.parent),
           "TRIO_JOBS_SERVER": f"127.0.0.1:{_dead_port()}"}
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    last = done.stderr.strip().splitlines()[-1]
    result: dict[str, object] = json.loads(last)
    result["stderr"] = done.stderr
    return result


@pytest.mark.parametrize("argv", [
    ["status", JOB], ["stop", JOB], ["list"], ["start", "--", "/bin/true"],
])
def test_one_shot_commands_import_no_event_loop(dev_pki: Path, argv: list[str]) -> None:
    got = _run(dev_pki, *argv)
    assert got["code"] == 3, got["stderr"]  # nobody listens: UNAVAILABLE
    assert "cannot connect to 127.0.0.1:" in str(got["stderr"])
    assert got["heavy"] == [], got["stderr"]


def test_following_commands_run_on_trio(dev_pki: Path) -> None:
    got = _run(dev_pki, "tail", JOB)
    assert got["code"] == 3, got["stderr"]
    heavy = got["heavy"]
    assert isinstance(heavy, list)
    assert "trio" in heavy  # the probe sees what it claims to see
    assert "pathlib" in heavy


def test_json_flag_imports_nothing_before_there_is_an_answer(dev_pki: Path) -> None:
    got = _run(dev_pki, "status", "--json", JOB)
    assert got["code"] == 3, got["stderr"]
    assert got["heavy"] == [], got["stderr"]  # not before it has something to print
