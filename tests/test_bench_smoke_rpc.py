"""The rpc benchmark runs end to end (``python -m benchmarks.rpc --quick``) and reports figures.

A smoke test only: it never asserts a speed (teammates and CI load the machine), only that
every peer ran over mTLS in its own processes and produced positive numbers (the server's CPU
per GiB streamed included), that our layer has a row per rpc mode whose server and client
processes each reported running that very mode, and so did the status phase (our
GetJobStatus of an ended job beside grpcio's server). The second test runs the before/after
row (``--ab``) on the trio_jobs of another checkout and checks that its processes really
imported that code.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("trio_jobs.rpc", "grpcio (aio)", "grpclib", "bare trio.SSLStream")
# Our layer's rows: the default keeps its name, the other modes carry the banner's words.
MODES = {
    "trio_jobs.rpc": "transport=lean fast-paths=on",
    "trio_jobs.rpc transport=lean fast-paths=off": "transport=lean fast-paths=off",
    "trio_jobs.rpc transport=ssl-stream fast-paths=on": "transport=ssl-stream fast-paths=on",
    "trio_jobs.rpc transport=ssl-stream fast-paths=off": "transport=ssl-stream fast-paths=off",
}
NUMBER = r"[\d,]+(?:\.\d+)?"
FIGURES = rf"({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER})"


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.rpc", "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _figures(out: str, row: str) -> None:
    """``row`` has five positive figures: p50, p99, c=64 QPS, MB/s, server CPU per GiB."""
    found = re.search(rf"^\| {re.escape(row)} \| {FIGURES} \|$", out, re.MULTILINE)
    assert found is not None, f"no figures for {row}:\n{out}"
    assert all(float(x.replace(",", "")) > 0 for x in found.groups()), found.group(0)


def _ran(out: str, row: str) -> tuple[str, str, str, str]:
    """What ``row``'s server and client reported: (server mode, client mode, server's
    trio_jobs, client's trio_jobs)."""
    found = re.search(rf"^\| {re.escape(row)} \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", out, re.MULTILINE)
    assert found is not None, f"no report of what {row} ran:\n{out}"
    server_mode, client_mode, server_code, client_code = (g.strip() for g in found.groups())
    return server_mode, client_mode, server_code, client_code


@pytest.mark.slow
def test_rpc_benchmark_quick_run() -> None:
    done = _bench()
    for peer in (*PEERS, *MODES):
        _figures(done.stdout, peer)
    assert "trio_jobs.rpc / grpcio" in done.stdout
    assert "trio_jobs.rpc / bare TLS" in done.stdout
    # each mode's processes said they ran that mode, on this checkout's trio_jobs
    here = os.path.realpath(ROOT / "trio_jobs")
    for row, words in MODES.items():
        assert _ran(done.stdout, row) == (words, words, here, here)
        if row != "trio_jobs.rpc":
            assert f"| {row} / trio_jobs.rpc | " in done.stdout  # the same-round comparison
    # the status phase: GetJobStatus of an ended job beside grpcio's server, both measured
    for call in ("trio-jobs GetJobStatus, ended job", "grpcio server (sync), grpc.health.v1 Check"):
        found = re.search(rf"^\| {re.escape(call)} \| ({NUMBER}) \| ({NUMBER}) \|$", done.stdout, re.MULTILINE)
        assert found is not None, f"no figures for {call}:\n{done.stdout}"
        assert all(float(x.replace(",", "")) > 0 for x in found.groups()), found.group(0)
    assert "| GetJobStatus (ended) / grpcio's Check | " in done.stdout


@pytest.mark.slow
def test_rpc_benchmark_ab_runs_the_other_checkouts_code(tmp_path: Path) -> None:
    """``--ab`` on the committed trio_jobs (``git archive HEAD``): its server and client import
    that copy, not this checkout's, though this checkout's benchmark code runs them."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (git archive HEAD)")
    before = tmp_path / "before"
    before.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "trio_jobs"],
                             capture_output=True, timeout=60, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive, timeout=60, check=True)
    done = _bench("--impls", "ours", "--modes", "default", "--status", "off", "--ab", str(before))
    row = f"trio_jobs.rpc at {before}"  # not a git checkout: named by its path
    _figures(done.stdout, "trio_jobs.rpc")
    _figures(done.stdout, row)
    assert f"| trio_jobs.rpc / {row} | " in done.stdout
    server_mode, client_mode, server_code, client_code = _ran(done.stdout, row)
    there = os.path.realpath(before / "trio_jobs")
    assert (server_code, client_code) == (there, there)
    # a checkout from before RpcMode has only the one mode; a later one runs the default
    assert server_mode in ("no RpcMode (lean, fast paths: its only mode)", "transport=lean fast-paths=on")
    assert client_mode == server_mode
    here = os.path.realpath(ROOT / "trio_jobs")
    assert _ran(done.stdout, "trio_jobs.rpc")[2:] == (here, here)


@pytest.mark.slow
def test_a_row_whose_processes_run_another_mode_or_code_fails(tmp_path: Path) -> None:
    """The runner refuses figures under a label its processes did not run: a row labelled
    lean whose environment asks for ssl-stream, and a before/after row whose ``trio_jobs``
    symlink leads back to this checkout."""
    from benchmarks.rpc.__main__ import run_peer
    from benchmarks.rpc.common import Workload, generate_code, make_pki
    from benchmarks.rpc.variants import FAST_PATHS_ENV, TRANSPORT_ENV, Peer, make_shim

    gen, pki = tmp_path / "gen", tmp_path / "pki"
    generate_code(gen)
    make_pki(pki)
    work = Workload.quick()
    wrong_mode = Peer(key="ours", impl="ours", label="trio_jobs.rpc", mode="transport=lean fast-paths=on",
                      env={TRANSPORT_ENV: "ssl-stream", FAST_PATHS_ENV: "1"})
    with pytest.raises(RuntimeError, match="the server ran transport=ssl-stream fast-paths=on, not transport=lean"):
        run_peer(wrong_mode, pki, gen, work, timeout=60)
    before = tmp_path / "before"
    before.mkdir()
    wrong_code = Peer(key="ours before", impl="ours", label="trio_jobs.rpc at before", mode="transport=lean fast-paths=on",
                      server_tree=before, shim=make_shim(ROOT, tmp_path))
    with pytest.raises(RuntimeError, match=r"the server imported trio_jobs from /.*, not /.*/before/trio_jobs"):
        run_peer(wrong_code, pki, gen, work, timeout=60)
