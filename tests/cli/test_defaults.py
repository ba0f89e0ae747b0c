"""The command line's defaults are the library's: what ``serve`` runs with when an option is
not given, and what every help text quotes (fed back to the option, it reads as the library's
value). Help is filled in only when shown, so it costs the one-shot commands nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import fields
from typing import TYPE_CHECKING

import pytest

from trio_jobs.calls import DEFAULT_SERVER
from trio_jobs.cli.common import DEFAULT_IDENTITY
from trio_jobs.cli.defaults import SERVE_OPTIONS, fill_serve_defaults
from trio_jobs.cli.main import build_parser, main
from trio_jobs.rpc import ServerLimits
from trio_jobs.server import ServerConfig
from trio_jobs.service import DEFAULT_MAX_STREAMS_PER_IDENTITY
from trio_jobs.worker import DEFAULT_LIMITS
from trio_jobs.worker.retention import DEFAULT_RETENTION

if TYPE_CHECKING:
    from collections.abc import Callable


def _config(name: str) -> object:
    return next(f.default for f in fields(ServerConfig) if f.name == name)


# (command, option, argparse dest, the library's value), read here independently of defaults.py
CASES: list[tuple[str, str, str, Callable[[], object]]] = [
    ("serve", "--host", "host", lambda: _config("host")),
    ("serve", "--port", "port", lambda: _config("port")),
    ("serve", "--retain-jobs", "retain_jobs", lambda: DEFAULT_RETENTION.max_jobs),
    ("serve", "--retain-output", "retain_output", lambda: DEFAULT_RETENTION.max_output_bytes),
    ("serve", "--retain-for", "retain_for", lambda: DEFAULT_RETENTION.max_age),
    ("serve", "--handshake-timeout", "handshake_timeout", lambda: ServerLimits().handshake_timeout),
    ("serve", "--max-connections", "max_connections", lambda: ServerLimits().max_connections),
    ("serve", "--max-connections-per-source", "max_connections_per_source",
     lambda: ServerLimits().max_connections_per_source),
    ("serve", "--max-handshakes-per-source", "max_handshakes_per_source",
     lambda: ServerLimits().max_handshakes_per_source),
    ("serve", "--idle-timeout", "idle_timeout", lambda: ServerLimits().idle_timeout),
    ("serve", "--max-streams-per-identity", "max_streams_per_identity", lambda: DEFAULT_MAX_STREAMS_PER_IDENTITY),
    ("start", "--cpus", "cpus", lambda: DEFAULT_LIMITS.cpu_millis),
    ("start", "--memory", "memory", lambda: DEFAULT_LIMITS.memory_bytes),
    ("start", "--pids", "pids", lambda: DEFAULT_LIMITS.pids_max),
    ("list", "--server", "server", lambda: DEFAULT_SERVER),
    ("list", "--identity", "identity", lambda: DEFAULT_IDENTITY),
]  # fmt: skip


def _help(command: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize(("command", "option", "dest", "library"), CASES, ids=[c[1] for c in CASES])
def test_the_help_quotes_the_library_default(
    command: str, option: str, dest: str, library: Callable[[], object],
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = _help(command, capsys, monkeypatch)
    # the option's line, and its help's line when the option is too long to share one
    block = re.search(rf"^  {option}\b[^\n]*(?:\n {{3,}}[^-\s][^\n]*)?", text, re.MULTILINE)
    assert block, text
    found = re.search(r"\bdefault (?:\$\w+ or )?([^;)\s]+)", block.group())
    assert found, block.group()
    quoted = found.group(1)
    args = build_parser(command).parse_args([command, f"{option}={quoted}"])
    assert getattr(args, dest) == library(), f"{option}: the help says {quoted!r}"


@pytest.mark.parametrize(("dest", "library"), [(c[2], c[3]) for c in CASES if c[0] == "serve"])
def test_serve_without_options_runs_with_the_library_defaults(dest: str, library: Callable[[], object]) -> None:
    args = build_parser("serve").parse_args(["serve"])
    assert getattr(args, dest) is None  # the parser has no default of its own
    fill_serve_defaults(args)
    assert getattr(args, dest) == library()


def test_every_serve_default_is_checked_here() -> None:
    assert sorted(SERVE_OPTIONS) == sorted(c[2] for c in CASES if c[0] == "serve")


def test_a_given_option_is_kept() -> None:
    args = build_parser("serve").parse_args(["serve", "--port", "0", "--retain-jobs", "5", "--idle-timeout", "2s"])
    fill_serve_defaults(args)
    assert (args.port, args.retain_jobs, args.idle_timeout) == (0, 5, 2.0)


HEAVY = ("trio", "cryptography", "trio_jobs.server", "trio_jobs.service", "trio_jobs.worker")
PROBE = f"""
import json, sys
from trio_jobs.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
sys.stderr.write(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)) + "\\n")
"""


@pytest.mark.parametrize("argv", [["--help"], ["list", "--help"], ["status", "--help"]])
def test_client_help_imports_no_server_side(argv: list[str]) -> None:
    """The client commands' help quotes the client's defaults without importing the rest."""
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60,
                          check=True)
    assert DEFAULT_SERVER in done.stdout
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []
