"""The end-to-end benchmark runs (``python -m benchmarks.e2e --quick``) and reports figures.

A smoke test only: it never asserts a speed (teammates and CI load the machine), only that
every scenario ran against real servers and printed a positive measured figure and ceiling
for each row, and that the quick run writes nothing into docs/.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"[\d,]+(?:\.\d+)?"
ROWS = (
    "job start p50, no cgroups",
    "job start p99, no cgroups",
    "jobs started/s, no cgroups (8 callers)",
    "tail of 32 MiB over mTLS",
    "job wall time with one follower",
    "fan-out 1 followers, aggregate",
    "fan-out 10 followers, aggregate",
    "server RSS per running job (50 sleeping)",
    "bob's status p99 while alice floods",
    "bob's follower: longest gap during the flood",
)


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
    assert re.search(rf"^\| list p99, ({NUMBER}) jobs in history \|", done.stdout, re.MULTILINE), done.stdout
    assert "wrote" not in done.stderr, "--quick must not write docs/benchmarks.md or charts"
