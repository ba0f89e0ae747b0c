"""The rpc benchmark runs end to end (``python -m benchmarks.rpc --quick``) and reports figures.

A smoke test only: it never asserts a speed (teammates and CI load the machine), only that
every peer ran over mTLS in its own processes and produced positive numbers, and so did the
status phase (our GetJobStatus of an ended job beside grpcio's server).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("trio_jobs.rpc", "grpcio (aio)", "grpclib", "bare trio.SSLStream")
NUMBER = r"[\d,]+(?:\.\d+)?"


@pytest.mark.slow
def test_rpc_benchmark_quick_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.rpc", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for peer in PEERS:
        row = re.search(
            rf"^\| {re.escape(peer)} \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \|$",
            done.stdout,
            re.MULTILINE,
        )
        assert row is not None, f"no figures for {peer}:\n{done.stdout}"
        assert all(float(x.replace(",", "")) > 0 for x in row.groups()), row.group(0)
    assert "trio_jobs.rpc / grpcio" in done.stdout
    assert "trio_jobs.rpc / bare TLS" in done.stdout
    # the status phase: GetJobStatus of an ended job beside grpcio's server, both measured
    for call in ("trio-jobs GetJobStatus, ended job", "grpcio server (sync), grpc.health.v1 Check"):
        row = re.search(rf"^\| {re.escape(call)} \| ({NUMBER}) \| ({NUMBER}) \|$", done.stdout, re.MULTILINE)
        assert row is not None, f"no figures for {call}:\n{done.stdout}"
        assert all(float(x.replace(",", "")) > 0 for x in row.groups()), row.group(0)
    assert "| GetJobStatus (ended) / grpcio's Check | " in done.stdout
