"""The results blocks benchmarks write into docs/ (``benchmarks/docblock.py``, issue 20).

A block is replaced in place, never added next to an older one, and nothing else in the file
changes; a file whose markers were edited away is refused rather than given a second block at
its end; the stamp names the commit (and an uncommitted change to the measured code), the
command, the machine and the load. Real files and a real git repository.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from benchmarks import docblock

MARKERS = docblock.Markers.of("demo", "benchmarks.demo")
DOC = f"""# Title

Prose before, which quotes the block.

{MARKERS.begin}
Run 2020-01-01 00:00 UTC at commit 0000000 with `python -m benchmarks.demo` (1 s).

| old | table |
{MARKERS.end}

Prose after. <!-- other:begin (written by python -m benchmarks.other) -->
kept
<!-- other:end -->
"""


def _block(*lines: str) -> str:
    return docblock.block(MARKERS, lines)


def test_markers_name_the_command_that_writes_the_block() -> None:
    assert MARKERS.begin == "<!-- demo:begin (written by python -m benchmarks.demo) -->"
    assert MARKERS.end == "<!-- demo:end -->"


def test_a_block_is_replaced_in_place_and_the_rest_is_untouched(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    head, tail = DOC.split(MARKERS.begin)[0], DOC.split(MARKERS.end)[1]
    for n in (1, 2):  # twice: the second run replaces the first run's block
        docblock.replace_block(doc, _block(f"run {n}", "| new | table |"), MARKERS)
        text = doc.read_text()
        assert text == head + _block(f"run {n}", "| new | table |") + tail
        assert text.count(MARKERS.begin) == text.count(MARKERS.end) == 1
    assert "| old | table |" not in doc.read_text()
    assert "run 1" not in doc.read_text()


@pytest.mark.parametrize("broken", [
    DOC.replace(MARKERS.end, "<!-- demo:end, edited -->"),
    DOC.replace(MARKERS.begin, "<!-- demo:begin -->"),
])
def test_a_file_whose_markers_were_edited_away_is_refused(tmp_path: Path, broken: str) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(broken)
    with pytest.raises(RuntimeError, match="restore the markers"):
        docblock.replace_block(doc, _block("new"), MARKERS)
    with pytest.raises(SystemExit, match="restore the markers or pass --no-doc"):
        docblock.require_block(doc, MARKERS)
    assert doc.read_text() == broken
    (tmp_path / "ok.md").write_text(DOC)
    docblock.require_block(tmp_path / "ok.md", MARKERS)  # a file with the block passes


def test_a_new_section_is_appended_once_then_its_block_replaced(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\nOnly prose.\n")
    section = "<!-- demo-section -->\n## Demo\n\n{results}\n<!-- demo-section:end -->"
    docblock.replace_block(doc, _block("first"), MARKERS, new_section=section)
    docblock.replace_block(doc, _block("second"), MARKERS, new_section=section)
    assert doc.read_text() == "# Title\n\nOnly prose.\n\n" + section.replace("{results}", _block("second")) + "\n"
    # the section is there but its block was edited away: refused, not appended again
    doc.write_text(doc.read_text().replace(MARKERS.end, ""))
    with pytest.raises(RuntimeError, match="restore the markers"):
        docblock.replace_block(doc, _block("third"), MARKERS, new_section=section)


def test_a_block_must_carry_its_own_markers(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(DOC)
    with pytest.raises(ValueError, match="a block must run from"):
        docblock.replace_block(doc, "no markers", MARKERS)
    assert doc.read_text() == DOC


def test_the_stamp_names_commit_command_machine_and_load() -> None:
    lines = docblock.stamp(command=docblock.command("benchmarks.demo", ["--rounds", "2", "a b"]), seconds=12.4,
                           load=("1.00/0.50/0.25", "2.00/1.00/0.50"), workload="two rounds", dists=("trio",))
    assert re.fullmatch(r"Run \d{4}-\d\d-\d\d \d\d:\d\d UTC at commit [0-9a-f]{7,}( plus \d+ uncommitted .*)? "
                        r"with `python -m benchmarks.demo --rounds 2 'a b'` \(12 s\)\.", lines[0]), lines[0]
    assert re.fullmatch(r"- Machine: .+, \d+ CPUs, .+", lines[2]), lines[2]
    assert re.fullmatch(r"- Software: Python 3\.\d+\.\d+, OpenSSL .+, trio \d.+", lines[3]), lines[3]
    assert lines[4:] == ["- Load average (1/5/15 min) before: 1.00/0.50/0.25, after: 2.00/1.00/0.50",
                         "- Workload: two rounds"]


def test_the_commit_stamp_says_when_the_measured_code_differs(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "trio_jobs").mkdir()
    (tmp_path / "trio_jobs" / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("prose\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git("rev-parse", "--short", "HEAD")
    (tmp_path / "notes.md").write_text("other prose\n")  # not measured code
    assert docblock.commit_stamp(tmp_path) == f"commit {head}"
    (tmp_path / "trio_jobs" / "a.py").write_text("x = 2\n")
    assert docblock.commit_stamp(tmp_path) == f"commit {head} plus 1 uncommitted file(s) in trio_jobs/"
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "b.py").write_text("y = 1\n")  # untracked: measured code too
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    assert docblock.commit_stamp(tmp_path) == (
        f"commit {head} plus 3 uncommitted file(s) in benchmarks/, pyproject.toml, trio_jobs/")
    assert docblock.commit_stamp(tmp_path / "nowhere") == f"an unknown commit ({tmp_path / 'nowhere'})"


def test_the_older_writers_replace_their_blocks_of_benchmarks_md_alone(tmp_path: Path) -> None:
    """The rpc, e2e and cli benchmarks write through the same helper: each one's block of a
    copy of docs/benchmarks.md is replaced and stamped, the rest of the file stays."""
    from benchmarks import cli
    from benchmarks.e2e import report as e2e
    from benchmarks.rpc import report as rpc
    from benchmarks.rpc.common import Workload

    source = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    doc = tmp_path / "benchmarks.md"
    doc.write_text(source.read_text())
    stamp = docblock.stamp(command="python -m x", seconds=1, load=("0.10/0.20/0.30", "0.40/0.50/0.60"), workload="w")
    blocks = {
        rpc.MAIN: rpc.render_doc_section("| rpc |", work=Workload(), load_before=(0.1, 0.2, 0.3),
                                         load_after=(0.4, 0.5, 0.6), seconds=1, command="python -m benchmarks.rpc",
                                         stamp="commit 1234567"),
        e2e.RESULTS: e2e.results_block(stamp=stamp, rows=[e2e.Row(figure="f", value=1, unit="ms", ceiling=2,
                                                                  ceiling_name="c")], charts=False, profile=""),
        cli.RESULTS: docblock.block(cli.RESULTS, [*stamp, "", "| cli |"]),
    }
    for markers, block in blocks.items():
        before = doc.read_text()
        head, tail = before.split(markers.begin)[0], before.split(markers.end, 1)[1]
        if markers is rpc.MAIN:
            rpc.replace_doc_section(doc, block)
        elif markers is e2e.RESULTS:
            e2e.write_doc(block, e2e.DEFAULT_SECTION, doc)
        else:
            cli.write_doc(block, doc)
        assert doc.read_text() == head + block + tail
        assert block.splitlines()[1].startswith("Run "), block
        assert "- Load average (1/5/15 min) before: 0.10/0.20/0.30, after: 0.40/0.50/0.60" in block
