"""The README's embedding snippets run as written, and print what the README says (issue #20).

Which blocks: every fenced code block of README.md whose language is Python must be announced
on the line just before its fence by ``<!-- readme-snippet: NAME ... -->`` (invisible once
rendered), and NAME must be one of :data:`SNIPPETS`, which says how to run it and what it must
print. A Python block without a marker, a marker that announces no Python block, or a NAME
without an entry fails :func:`test_every_python_block_of_the_readme_is_run`: a new snippet
cannot be left out silently.

How: each snippet's text, byte for byte, is a file run by this interpreter in a subprocess
(bounded by :data:`SNIPPET_TIMEOUT`), in an empty working directory, with the environment a
user's shell would have: ``TRIO_JOBS_HOME`` a temporary state directory, and for a snippet
that talks to a server a real ``trio-jobs serve`` on port 0 there (it creates the development
PKI), named by ``TRIO_JOBS_SERVER``. The test then checks the output against the README's
claim, which it also requires to be in the README's text right after the block.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
from e2e.conftest import host  # noqa: F401  (a fixture shared with tests/e2e)

if TYPE_CHECKING:
    from collections.abc import Callable

    from e2e.conftest import Host

README: Final = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET_TIMEOUT: Final = 60.0  # seconds; each snippet takes about one (import, one job)

_FENCE: Final = re.compile(r" {0,3}(?P<fence>`{3,}|~{3,})(?P<info>.*)")
_MARKER: Final = re.compile(r"<!-- readme-snippet: (?P<name>[a-z0-9-]+)(?: [^>]*)? -->")
_PYTHON: Final = frozenset({"python", "python3", "py", "pycon"})


@dataclass(frozen=True, kw_only=True)
class Block:
    """A fenced code block of the README."""

    language: str  # the first word of the info string, lower case ("" if none)
    code: str
    line: int  # 1-based line of the opening fence
    marker: str | None  # NAME of the marker on the line before the fence
    after: str  # the README's text from the closing fence to the next block


def code_blocks(text: str) -> tuple[list[Block], list[int]]:
    """The fenced blocks of ``text`` (CommonMark fences), and the lines of markers that do not
    stand right before a fence."""
    lines = text.splitlines()
    blocks: list[tuple[str, int, int, int, str | None]] = []  # language, open, first, end, marker
    i = 0
    while i < len(lines):
        opening = _FENCE.fullmatch(lines[i])
        if opening is None:
            i += 1
            continue
        fence = opening["fence"]
        closing = re.compile(rf" {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*")
        end = next((j for j in range(i + 1, len(lines)) if closing.fullmatch(lines[j])), None)
        assert end is not None, f"README.md:{i + 1}: a code block that is never closed"
        before = _MARKER.fullmatch(lines[i - 1].strip()) if i > 0 else None
        words = opening["info"].split()
        blocks.append((words[0].lower() if words else "", i, i + 1, end, before["name"] if before else None))
        i = end + 1
    marked_lines = {b[1] - 1 for b in blocks if b[4] is not None}
    stray = [n + 1 for n, ln in enumerate(lines) if "readme-snippet" in ln and n not in marked_lines]
    result = []
    for k, (language, start, first, end, marker) in enumerate(blocks):
        stop = blocks[k + 1][1] if k + 1 < len(blocks) else len(lines)
        after = "\n".join(lines[end + 1 : stop])
        code = "".join(ln + "\n" for ln in lines[first:end])
        result.append(Block(language=language, code=code, line=start + 1, marker=marker, after=after))
    return result, stray


def readme_snippets() -> dict[str, Block]:
    blocks, _ = code_blocks(README.read_text(encoding="utf-8"))
    return {b.marker: b for b in blocks if b.language in _PYTHON and b.marker is not None}


# -- what each snippet must print --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Snippet:
    needs_server: bool
    says: str  # the README's words for its output, right after the block
    prints: re.Pattern[str]  # its whole stdout
    check: Callable[[Host, Path, re.Match[str]], None] | None = None  # anything else it did


def _worker_checks(served: Host, cwd: Path, printed: re.Match[str]) -> None:
    # Its state went where it says (the working directory), nowhere else.
    assert (cwd / "my-jobs" / "jobs.sqlite3").is_file(), sorted(p.name for p in cwd.iterdir())


def _client_checks(served: Host, cwd: Path, printed: re.Match[str]) -> None:
    # The job it started is the one it listed, and it is alice's (the certificate it used).
    listed = json.loads(served.run("list", "--all", "--json", identity="admin").stdout)
    assert [(j["job_id"], j["owner"]) for j in listed["jobs"]] == [(printed["job"], "alice")], listed
    if os.geteuid() == 0:
        # "alice's own user": the uid the root server allocated to her, not root's.
        users = json.loads((served.home / "dynamic-users.json").read_text())["users"]
        assert int(printed["uid"]) == users["alice"] != 0, (printed["uid"], users)


def _server_checks(served: Host, cwd: Path, printed: re.Match[str]) -> None:
    # It served from its own state (and PKI) in the working directory, and its job was alice's.
    assert (cwd / "data" / "jobs.sqlite3").is_file(), sorted(p.name for p in cwd.iterdir())
    assert (cwd / "pki" / "server.crt").is_file()


SNIPPETS: Final = {
    "worker": Snippet(
        needs_server=False,
        says="prints `hi` and `EXITED 2`",
        prints=re.compile(r"hi\nEXITED 2\n"),
        check=_worker_checks,
    ),
    "client": Snippet(
        needs_server=True,
        says="prints `hello from uid 2053767343` (alice's own user) and `exited 0 [...]`",
        prints=re.compile(r"hello from uid (?P<uid>\d+)\nexited 0 \['(?P<job>[0-9a-f-]{36})'\]\n"),
        check=_client_checks,
    ),
    "server": Snippet(
        needs_server=False,  # it is the server (and, to show it works, its own client)
        says="prints `hello world from alice`, `hi` and `exited alice`",
        prints=re.compile(r"hello world from alice\nhi\nexited alice\n"),
        check=_server_checks,
    ),
}


# -- tests -------------------------------------------------------------------------------------


def test_every_python_block_of_the_readme_is_run() -> None:
    blocks, stray = code_blocks(README.read_text(encoding="utf-8"))
    python = [b for b in blocks if b.language in _PYTHON]
    unmarked = [b.line for b in python if b.marker is None]
    assert not unmarked, f"README.md lines {unmarked}: a Python block with no '<!-- readme-snippet: NAME -->' line before it"
    assert not stray, f"README.md lines {stray}: a readme-snippet marker that is not right before a code block"
    not_python = [(b.line, b.language) for b in blocks if b.marker is not None and b.language not in _PYTHON]
    assert not not_python, f"readme-snippet markers on blocks that are not Python: {not_python}"
    names = [b.marker or "" for b in python]
    assert len(names) == len(set(names)), f"two README snippets share a name: {names}"
    assert sorted(names) == sorted(SNIPPETS), (
        f"README.md has the snippets {sorted(names)}; this test runs {sorted(SNIPPETS)}: "
        "add an entry to SNIPPETS for a new one"
    )


def test_the_block_finder_misses_no_python_block() -> None:
    """The guard above is only as good as :func:`code_blocks`: fences of either kind and any
    length, an info string after the language, a fence inside a longer one, stray markers."""
    text = "\n".join([
        "<!-- readme-snippet: one -->",
        "```python",
        "print(1)",
        "```",
        "said `1`",
        "~~~~ Python title",  # unmarked, and holding a shorter fence
        "```",
        "~~~~",
        "<!-- readme-snippet: two -->",  # stray: a blank line before the fence
        "",
        "   ```py",
        "x = 2",
        "   ```",
        "```console",
        "$ true",
        "```",
    ])
    blocks, stray = code_blocks(text)
    assert [(b.language, b.line, b.marker) for b in blocks] == [
        ("python", 2, "one"), ("python", 6, None), ("py", 11, None), ("console", 14, None)
    ]
    assert blocks[0].code == "print(1)\n"
    assert blocks[0].after == "said `1`"
    assert blocks[1].code == "```\n"
    assert stray == [9]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_readme_snippet_runs_as_written(host: Host, tmp_path: Path, name: str) -> None:  # noqa: F811
    spec = SNIPPETS[name]
    block = readme_snippets().get(name)
    assert block is not None, f"README.md has no snippet {name!r}"
    claim = " ".join(block.after.split())
    assert spec.says in claim, f"README.md no longer says what snippet {name!r} prints: {claim[:300]!r}"

    if spec.needs_server:
        host.start_server()
    script = tmp_path / f"readme_{name}.py"
    script.write_text(block.code, encoding="utf-8")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    done = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=host.env(), capture_output=True, timeout=SNIPPET_TIMEOUT
    )
    out, err = done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"README snippet {name!r} (line {block.line}) exited {done.returncode}:\n{err}"
    printed = spec.prints.fullmatch(out)
    assert printed is not None, f"README snippet {name!r} printed {out!r}, not what the README says ({spec.says}); stderr:\n{err}"
    if spec.check is not None:
        spec.check(host, cwd, printed)
