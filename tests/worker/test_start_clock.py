"""The start time of a job's process, noted without reading its /proc/PID/stat
(``leftovers.StartClock``): exactly what /proc says, or read from /proc when unsure."""

from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING

from trio_jobs.worker.leftovers import StartClock, boot_ticks, start_time

if TYPE_CHECKING:
    import pytest


def _spawn() -> tuple[subprocess.Popen[bytes], int, int]:
    before = boot_ticks()
    proc = subprocess.Popen(["/bin/sleep", "5"])
    return proc, before, boot_ticks()


def test_the_bracketing_ticks_are_the_start_time_proc_gives() -> None:
    clock = StartClock()
    agreed = 0
    for _ in range(20):  # a bracket across a tick boundary is read from /proc: try a few
        proc, before, after = _spawn()
        try:
            noted = clock.of(proc.pid, before, after)
            assert noted == start_time(proc.pid)
            agreed += before == after
        finally:
            proc.kill()
            proc.wait()
    assert agreed > 0
    assert clock.verified is True  # checked against /proc once, then trusted


def test_a_bracket_across_ticks_and_an_unverified_clock_read_proc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[int] = []

    def read(pid: int) -> int:
        reads.append(pid)
        return 42

    monkeypatch.setattr("trio_jobs.worker.leftovers.start_time", read)
    clock = StartClock()
    assert clock.of(7, 41, 42) == 42  # across a tick: unsure, read
    assert clock.verified is None
    assert clock.of(7, 40, 40) == 42  # the first sure one is checked: this kernel disagrees
    assert clock.verified is False
    assert clock.of(7, 42, 42) == 42  # so /proc is always read
    assert reads == [7, 7, 7]
    trusted = StartClock()
    assert trusted.of(8, 42, 42) == 42
    assert trusted.verified is True
    assert trusted.of(8, 50, 50) == 50  # trusted now: no read
    assert reads == [7, 7, 7, 8]


def test_a_process_that_is_gone_has_no_start_time() -> None:
    proc, before, _after = _spawn()
    proc.kill()
    proc.wait()
    assert StartClock().of(proc.pid, before, before + 1) is None
