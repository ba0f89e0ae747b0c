"""A benchmark's results block in a docs/*.md file, replaced whole by each run and stamped.

Every figure in docs/ comes from a command that writes it (issue 20): the command puts its
results between two markers of its own,

    <!-- NAME:begin (written by python -m MODULE) -->
    Run 2026-12-05 08:49 UTC at commit b8644d8 with `python -m MODULE ARGS` (29 s).

    - Machine: ..., 2 CPUs, ...
    - Software: Python ..., OpenSSL ..., trio ...
    - Load average (1/5/15 min) before: ..., after: ...
    - Workload: ...

    (the tables)
    <!-- NAME:end -->

and the prose around the block quotes it. The stamp says when (UTC), which commit (and
whether the measured code differed from it), with which command line, on what machine, under
which load (the machine is shared: the load before and after is how to read the figures) and
how long it took. The rest of the file is never touched: a block is replaced, never appended
next to an older one.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import ssl
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable, Sequence

ROOT: Final = Path(__file__).resolve().parents[1]
MEASURED_CODE: Final = ("trio_jobs", "benchmarks", "pyproject.toml")


@dataclass(frozen=True)
class Markers:
    """The two lines around one command's block."""

    begin: str
    end: str

    @classmethod
    def of(cls, name: str, module: str) -> Markers:
        return cls(f"<!-- {name}:begin (written by python -m {module}) -->", f"<!-- {name}:end -->")


def git(root: Path, *args: str) -> str:
    """``git ARGS`` in ``root``; empty when git or the checkout is not there."""
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def commit_stamp(root: Path = ROOT) -> str:
    """The commit measured, and whether the code measured differed from it."""
    head = git(root, "rev-parse", "--short", "HEAD")
    if not head:
        return f"an unknown commit ({root})"
    dirty = [line.split(maxsplit=1)[-1] for line in git(root, "status", "--porcelain", "--", *MEASURED_CODE).splitlines() if line]
    if not dirty:
        return f"commit {head}"
    where = sorted({path.split("/", 1)[0] + ("/" if "/" in path else "") for path in dirty})
    return f"commit {head} plus {len(dirty)} uncommitted file(s) in {', '.join(where)}"


def load() -> str:
    """The load average now, 1/5/15 min."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")


def command(module: str, argv: Iterable[str]) -> str:
    """The command line to stamp: what reruns the measurement."""
    return " ".join(["python -m", module, *map(shlex.quote, argv)])


def cpu_model() -> str:
    with contextlib.suppress(OSError, StopIteration):
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    return platform.processor() or "unknown CPU"


def machine(dists: Sequence[str] = ("trio", "h2")) -> list[str]:
    """The block's machine and software lines; ``dists``: the packages whose versions matter."""
    versions = []
    for dist in dists:
        try:
            versions.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} (not installed)")
    return [
        f"- Machine: {cpu_model()}, {os.cpu_count()} CPUs, {platform.platform()}",
        f"- Software: {', '.join([f'Python {platform.python_version()}', ssl.OPENSSL_VERSION, *versions])}",
    ]


def stamp(*, command: str, seconds: float, load: tuple[str, str], workload: str, commit: str | None = None,
          when: str | None = None, dists: Sequence[str] = ("trio", "h2")) -> list[str]:
    """The lines that open a block: when, at which commit, which command, how long, on what,
    under which load, measuring what."""
    return [
        f"Run {when or now()} at {commit or commit_stamp()} with `{command}` ({seconds:.0f} s).",
        "",
        *machine(dists),
        f"- Load average (1/5/15 min) before: {load[0]}, after: {load[1]}",
        f"- Workload: {workload}",
    ]


def block(markers: Markers, lines: Iterable[str]) -> str:
    return "\n".join([markers.begin, *lines, markers.end])


def require_block(doc: Path, markers: Markers) -> None:
    """Fail before a long run, not after it, if ``doc`` has no block to replace."""
    try:
        text = doc.read_text(encoding="utf-8")
    except OSError as exc:
        raise SystemExit(f"cannot write the results into {doc}: {exc}") from exc
    start = text.find(markers.begin)
    if start < 0 or text.find(markers.end, start) < 0:
        raise SystemExit(f"{doc}: no {markers.begin} ... {markers.end} block to replace; restore the markers or pass --no-doc")


def replace_block(doc: Path, block: str, markers: Markers, *, new_section: str | None = None) -> None:
    """Put ``block`` (its first line ``markers.begin``, its last ``markers.end``) in place of
    the first such block of ``doc``; the rest of the file stays as it is.

    Where ``doc`` has no such block: ``new_section`` (``{results}`` standing for the block)
    is appended if its first line is not in the file yet; otherwise this raises, since a
    block whose markers were edited away must not come back as a second copy at the end."""
    if not (block.startswith(markers.begin + "\n") and block.endswith("\n" + markers.end)):
        raise ValueError(f"a block must run from {markers.begin!r} to {markers.end!r}")
    text = doc.read_text(encoding="utf-8")
    start = text.find(markers.begin)
    stop = text.find(markers.end, start + len(markers.begin)) if start >= 0 else -1
    if stop >= 0:
        text = text[:start] + block + text[stop + len(markers.end):]
    elif new_section is not None and new_section.split("\n", 1)[0] not in text:
        text = text.rstrip("\n") + "\n\n" + new_section.replace("{results}", block) + "\n"
    else:
        raise RuntimeError(f"{doc}: no {markers.begin} ... {markers.end} block to replace; restore the markers")
    doc.write_text(text, encoding="utf-8")


def add_doc_arguments(parser: argparse.ArgumentParser, doc: Path) -> None:
    """``--no-doc`` and ``--doc FILE`` (default ``doc``; the smoke tests' copies)."""
    parser.add_argument("--no-doc", action="store_true", help=f"print only; do not write {doc.name}")
    parser.add_argument("--doc", type=Path, default=doc, metavar="FILE", help=f"write the results block into FILE instead of {doc}")


def write_results(doc: Path, markers: Markers, *, module: str, argv: Sequence[str], seconds: float,
                  load: tuple[str, str], workload: str, body: Sequence[str]) -> None:
    """Stamp ``body`` (the run's ``python -m module argv``) and put it in ``doc``'s block."""
    lines = stamp(command=command(module, argv), seconds=seconds, load=load, workload=workload)
    replace_block(doc, block(markers, [*lines, "", *body]), markers)
    print(f"wrote {doc}", file=sys.stderr)
