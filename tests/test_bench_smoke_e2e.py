"""The end-to-end benchmark runs (``python -m benchmarks.e2e --quick``) and reports figures.

A smoke test only: it never asserts a speed (teammates and CI load the machine), only that
every scenario ran against real servers and printed a positive measured figure and ceiling
for each row, that a figure with only an absolute target shows no ratio, and that the quick
run writes nothing into docs/. The fan-out rows also prove the live gate held: the scenario
raises (and the run fails) unless every follower had the job's marker line before the job
was released, and the job had written nothing else by then.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from trio_jobs.cli.sink import PIPE_SIZE, StdoutWriter

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"[\d,]+(?:\.\d+)?"
ROWS = (
    "job start p50, no cgroups (to exec)",
    "job start p99, no cgroups (to exec)",
    "job start to its end, p50, no cgroups (to exit)",
    "jobs started/s, no cgroups (8 callers)",
    "tail of 32 MiB over mTLS",
    "tail of the ended 32 MiB job over mTLS",
    "job wall time with one follower",
    "job wall time beside one spinning process, no follower",
    "fan-out 1 followers, live, aggregate",
    "fan-out 10 followers, live, aggregate",
    "fan-out 1 followers, replay of the ended job, aggregate",
    "fan-out 10 followers, replay of the ended job, aggregate",
    "job start p50, 200 jobs in history",
    "bob's status p99 while alice floods",
    "bob's follower: line delay p99 during the flood",
)
# Figures with only an absolute target: no ceiling, no ratio (never one against the target).
ABSOLUTE = (
    "server RSS growth, 10 followers, live",
    "server RSS growth, 10 followers, replay",
    "server RSS per running job (50 sleeping)",
)


@pytest.mark.slow
def test_e2e_benchmark_quick_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.e2e", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ROWS:
        row = re.search(
            rf"^\| {re.escape(name)} \| ({NUMBER}) \S+ \| ({NUMBER}) \S+ \(.*\) \| ({NUMBER})x \|",
            done.stdout,
            re.MULTILINE,
        )
        assert row is not None, f"no figures for {name!r}:\n{done.stdout}"
        assert all(float(x.replace(",", "")) > 0 for x in row.groups()), row.group(0)
    for name in ABSOLUTE:
        row = re.search(
            rf"^\| {re.escape(name)} \| ({NUMBER}) \S+ \| none: an absolute target \| -- \| < ",
            done.stdout,
            re.MULTILINE,
        )
        assert row is not None, f"no figure for {name!r}:\n{done.stdout}"
        assert float(row.group(1).replace(",", "")) > 0, row.group(0)
    assert re.search(rf"^\| list p99, ({NUMBER}) jobs in history \|", done.stdout, re.MULTILINE), done.stdout
    assert re.search(r"^Targets: \d+ of \d+ met", done.stdout, re.MULTILINE), done.stdout
    assert "wrote" not in done.stderr, "--quick must not write docs/benchmarks.md or charts"


# The client-side fix the benchmark's profile led to (trio_jobs/cli/sink.py): `tail` writes
# into a pipe from trio's thread with RWF_NOWAIT. Real pipes and files; no sleeps.

PATTERN = bytes(range(256)) * 16384  # 4 MiB, many times a pipe's buffer (64 KiB, grown to 1 MiB)


async def test_tail_sink_writes_every_byte_into_a_full_pipe() -> None:
    read_fd, write_fd = os.pipe()
    writer = StdoutWriter(write_fd)
    assert writer.in_loop, "a pipe is written from trio's thread"
    received = bytearray()

    def drain() -> None:
        while data := os.read(read_fd, 7000):
            received.extend(data)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, drain)
                for piece in (PATTERN[:100], PATTERN[100:70_000], PATTERN[70_000:]):
                    await writer.write(piece)
                os.close(write_fd)
                write_fd = -1
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)
    assert bytes(received) == PATTERN


def test_tail_sink_grows_its_pipe() -> None:
    read_fd, write_fd = os.pipe()
    try:
        assert fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ) == 65536
        StdoutWriter(write_fd)
        want = min(PIPE_SIZE, int(Path("/proc/sys/fs/pipe-max-size").read_text()))
        assert fcntl.fcntl(write_fd, fcntl.F_GETPIPE_SZ) == want
    finally:
        os.close(read_fd)
        os.close(write_fd)


async def test_tail_sink_leaves_the_pipe_blocking_and_reports_a_closed_reader() -> None:
    read_fd, write_fd = os.pipe()
    try:
        writer = StdoutWriter(write_fd)
        await writer.write(b"x" * 1000)
        assert os.get_blocking(write_fd), "stdout is shared: its blocking mode must not change"
        os.close(read_fd)
        read_fd = -1
        with pytest.raises(BrokenPipeError):
            await writer.write(b"more")
    finally:
        os.close(write_fd)
        if read_fd >= 0:
            os.close(read_fd)


async def test_tail_sink_writes_a_regular_file_from_a_thread(tmp_path: Path) -> None:
    with (tmp_path / "out").open("wb") as f:
        writer = StdoutWriter(f.fileno())
        assert not writer.in_loop
        await writer.write(PATTERN[:5000])
        await writer.write(PATTERN[5000:])
    assert (tmp_path / "out").read_bytes() == PATTERN
