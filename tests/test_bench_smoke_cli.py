"""The CLI benchmark runs (``python -m benchmarks.cli --quick``) and reports figures.

A smoke test only: it never asserts a speed (teammates and CI load the machine), only that
every process ran against a real ``trio-jobs serve`` and answered correctly (the benchmark
refuses a failed run), that each has positive figures, and that the quick run writes nothing
into docs/. The import-time figures come from parsing ``-X importtime`` and replaying the
top-level imports; both are checked against real interpreter output here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.cli import COMMANDS, Proc, child_env, import_figures, run

ROOT = Path(__file__).resolve().parent.parent
LABELS = ("trio-jobs status JOB", "trio-jobs start -- /bin/true", "trio-jobs list")
KEYS = {f"{cmd}/{impl}" for cmd in COMMANDS for impl in ("ours", "grpcio")} | {"floor/python", "floor/version"}


@pytest.mark.slow
def test_cli_benchmark_quick_run() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.cli", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    procs = summary["processes"]
    assert set(procs) == KEYS
    for key, f in procs.items():
        assert len(f["wall_ms"]) == 2, key
        assert all(w > 0 for w in f["wall_ms"]), key
        assert 0 < f["p50"] <= f["p90"], key
        assert f["cpu"] > 0, key
        assert f["importtime"] > 0, key
    # What each process loads is a property of the process, not a speed: the CLI and the
    # grpcio scripts import more than the bare interpreter, and a call more than --version.
    bare = procs["floor/python"]["modules"]
    assert all(procs[key]["modules"] > bare for key in KEYS - {"floor/python"})
    assert all(procs[f"{cmd}/ours"]["modules"] > procs["floor/version"]["modules"] for cmd in COMMANDS)
    for cmd in COMMANDS:
        ours, grpcio = procs[f"{cmd}/ours"], procs[f"{cmd}/grpcio"]
        assert summary["ratios"][cmd] == pytest.approx(ours["p50"] / grpcio["p50"], rel=0.01)
        assert len(summary["ratios_per_round"][cmd]) == 2
    for label in LABELS:
        assert re.search(rf"^\| `{re.escape(label)}` \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+ ms \| [\d.]+x \|",
                         done.stdout, re.MULTILINE), f"no figures for {label!r}:\n{done.stdout}"
    assert "wrote" not in done.stderr, "--quick must not write docs/benchmarks.md"


def _importtime(code: str) -> str:
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stderr


def test_import_figures_read_real_importtime_output() -> None:
    seconds, count, top = import_figures(_importtime("import json, email.message"))
    assert seconds > 0
    assert top[-2:] == ["json", "email.message"], top  # in the order imported, after the startup's
    assert "json.decoder" not in top, "a nested import is not a top-level one"
    assert count > len(top)


def test_replaying_the_top_level_imports_loads_the_same_modules() -> None:
    """The *imports* figure times ``python -c "import <top-level imports>"``: that must load
    exactly the modules the measured process loaded."""
    first = _importtime("import json, email.message\nimport http.client")
    _, count, top = import_figures(first)
    again = _importtime("import " + ", ".join(top))
    names = set(re.findall(r"\| +(\S+)$", first, re.MULTILINE))
    assert set(re.findall(r"\| +(\S+)$", again, re.MULTILINE)) == names
    assert import_figures(again)[1] == count


def test_processes_import_trio_jobs_from_the_tree_asked_for(tmp_path: Path) -> None:
    """``--tree``: every process, ``python -c`` ones included (they put their working
    directory first on sys.path), imports trio_jobs from that tree, not from the checkout
    the benchmark runs in."""
    tree = tmp_path / "tree"
    (tree / "trio_jobs").mkdir(parents=True)
    (tree / "trio_jobs" / "__init__.py").write_text("")
    (tmp_path / "home").mkdir()
    env = child_env(tmp_path / "home", tmp_path / "pycache", tree)
    code = "import trio_jobs; print(trio_jobs.__file__)"
    _, _, done = run(Proc("t", "where", (sys.executable, "-c", code)), env)
    assert done.stdout.strip() == str(tree / "trio_jobs" / "__init__.py")
