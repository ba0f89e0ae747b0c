"""The benchmarks that write their figures into docs/ do so (issue 20): each one run for real
with tiny parameters on a temporary copy of its doc file.

A smoke test only: no speed is asserted (teammates and CI load the machine). What is checked:
the run exits 0; the copy has exactly one block between the command's markers, and it is a
new one (the old block's text is gone, so it was replaced, not appended); the block is
stamped (UTC date, commit, the command line as run, duration, machine, load before and after)
and holds the figures the run printed; everything outside the block is byte for byte what it
was; and the repository's own doc file is untouched.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import docblock
from benchmarks.e2e import audit_ab, start_ab
from benchmarks.restart import MARKERS as RESTART
from benchmarks.soak.__main__ import MARKERS as SOAK
from benchmarks.soak.__main__ import _parse as soak_parse
from benchmarks.soak.__main__ import writes_doc as soak_writes_doc

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"[\d,]+(?:\.\d+)?"
LOAD = r"\d+\.\d\d/\d+\.\d\d/\d+\.\d\d"


def _split(text: str, markers: docblock.Markers) -> tuple[str, str, str]:
    head, rest = text.split(markers.begin)
    block, tail = rest.split(markers.end)
    return head, markers.begin + block + markers.end, tail


def write_block(tmp_path: Path, module: str, doc_name: str, markers: docblock.Markers, *args: str) -> tuple[str, str]:
    """Run ``python -m module ARGS --doc COPY``; check the copy; (the new block, stdout)."""
    source = ROOT / "docs" / doc_name
    original = source.read_text()
    assert original.count(markers.begin) == original.count(markers.end) == 1, f"{source} must hold one block"
    copy = tmp_path / doc_name
    copy.write_text(original)
    argv = [*args, "--doc", str(copy)]
    done = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"wrote {copy}" in done.stderr
    text = copy.read_text()
    assert text.count(markers.begin) == text.count(markers.end) == 1
    head, block, tail = _split(text, markers)
    old_head, old_block, old_tail = _split(original, markers)
    assert (head, tail) == (old_head, old_tail), "only the block may change"
    assert block != old_block
    lines = block.splitlines()
    stamp = (rf"Run \d{{4}}-\d\d-\d\d \d\d:\d\d UTC at commit [0-9a-f]{{7,}}(?: plus \d+ uncommitted [^`]+)? "
             rf"with `{re.escape(docblock.command(module, argv))}` \(\d+ s\)\.")
    assert re.fullmatch(stamp, lines[1]), lines[1]
    assert re.fullmatch(r"- Machine: .+, \d+ CPUs, .+", lines[3]), lines[3]
    assert lines[4].startswith("- Software: Python 3.")
    assert re.fullmatch(rf"- Load average \(1/5/15 min\) before: {LOAD}, after: {LOAD}", lines[5]), lines[5]
    assert lines[6].startswith("- Workload: ")
    assert source.read_text() == original, "the repository's doc must not be written"
    return block, done.stdout


@pytest.mark.slow
def test_soak_writes_its_report_into_a_copy_of_reliability_md(tmp_path: Path) -> None:
    block, out = write_block(tmp_path, "benchmarks.soak", "reliability.md", SOAK,
                             "--clients", "4", "--seconds", "1", "--rounds", "1")
    assert "- Workload: 4 clients (1 identities) x 1 s x 1 round(s)" in block
    report = out[out.index("trio-jobs soak: "):out.index("verdict: OK") + len("verdict: OK")]
    assert f"```\n{report}\n```" in block, "the block holds the report the run printed"
    assert "unexpected errors: 0" in report
    assert re.search(rf"^StartJob +{NUMBER}( +{NUMBER}){{4}}$", report, re.MULTILINE), report


def test_soak_refuses_a_doc_without_its_block_before_any_load(tmp_path: Path) -> None:
    bare = tmp_path / "bare.md"
    bare.write_text("# no block here\n")
    done = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--doc", str(bare)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "restore the markers or pass --no-doc" in done.stderr
    assert "trio-jobs soak:" not in done.stdout, "the check comes before the load"
    assert bare.read_text() == "# no block here\n"


@pytest.mark.parametrize(("argv", "writes"), [
    ([], True), (["--clients", "4"], True), (["--heap", "none"], True),
    (["--quick"], False), (["--no-doc"], False), (["--heap", "tracemalloc"], False),
])
def test_which_soak_runs_write_the_doc(argv: list[str], writes: bool) -> None:
    assert soak_writes_doc(soak_parse(argv)) is writes


@pytest.mark.slow
def test_start_ab_writes_its_table_into_a_copy_of_benchmarks_md(tmp_path: Path) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (a worktree of the commit compared with)")
    head = docblock.git(ROOT, "rev-parse", "--short", "HEAD")
    block, _ = write_block(tmp_path, "benchmarks.e2e.start_ab", "benchmarks.md", start_ab.MARKERS,
                           "--before", "HEAD", "--rounds", "2", "--per-round", "3")
    assert f"| p50 before ({head}) | p50 after (this tree) |" in block
    rows = re.findall(rf"^\| (\S+) \| (admin|alice) \| ({NUMBER}) ms \| ({NUMBER}) ms \| ({NUMBER})x \| "
                      rf"({NUMBER})-({NUMBER})x \|$", block, re.MULTILINE)
    assert [(cg == "no", who) for cg, who, *_ in rows] == [
        (True, "admin"), (True, "alice"), (False, "admin"), (False, "alice")], block
    assert all(float(x) > 0 for row in rows for x in row[2:]), block
    assert f"{head}'s (a git worktree)" in block
    assert "2 rounds of 3 per side" in block


@pytest.mark.slow
def test_restart_writes_its_table_into_a_copy_of_benchmarks_md(tmp_path: Path) -> None:
    block, _ = write_block(tmp_path, "benchmarks.restart", "benchmarks.md", RESTART,
                           "--jobs", "300", "--big-jobs", "2", "--big-arg-bytes", "20000", "--runs", "1",
                           "--settle", "0.1")
    for label, unit in (("spawn -> listening", "s"), ("VmHWM at listening", "MiB"), ("VmHWM 0.1 s later", "MiB")):
        row = re.search(rf"^\| {re.escape(label)} \| ({NUMBER}) {unit} \| ({NUMBER}) {unit} \| [+-]{NUMBER} {unit} \|$",
                        block, re.MULTILINE)
        assert row is not None, f"no {label!r} row:\n{block}"
        assert all(float(x) > 0 for x in row.groups())
    assert "holding 300 ended jobs, 2 of them with 20,000 bytes of arguments" in block
    assert re.search(r"^Goal \(.*\): (met|missed)\.$", block, re.MULTILINE), block


@pytest.mark.slow
def test_audit_ab_writes_its_table_into_a_copy_of_benchmarks_md(tmp_path: Path) -> None:
    block, _ = write_block(tmp_path, "benchmarks.e2e.audit_ab", "benchmarks.md", audit_ab.MARKERS,
                           # 1,024 calls: ~0.1 s of server CPU, some ticks of /proc's 10 ms each
                           # (128 took ~12 ms, and a round could read 0 CPU time)
                           "--rounds", "1", "--starts", "5", "--calls", "1024")
    for variant in audit_ab.VARIANTS:
        row = re.search(rf"^\| {variant} \| ({NUMBER}) \| ({NUMBER})x \| ({NUMBER}) \| ({NUMBER})x \| ({NUMBER}) "
                        rf"\| ({NUMBER})x \|$", block, re.MULTILINE)
        assert row is not None, f"no {variant} row:\n{block}"
        assert all(float(x.replace(",", "")) > 0 for x in row.groups()), row.group(0)
        if variant == "off":
            assert row.group(2) == row.group(4) == row.group(6) == "1.000"
    lines = re.search(r"Audit lines written: on ([\d,]+), reads ([\d,]+)\.", block)
    assert lines is not None, block
    on, reads = (int(x.replace(",", "")) for x in lines.groups())
    assert 0 < on < reads, "with --audit-reads every call is written, without only the starts"
