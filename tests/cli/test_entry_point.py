"""The console script's exit (``trio_jobs.cli.main.run``): a command other than ``serve``
runs the exit handlers, flushes its output and leaves without the interpreter's teardown.
Run as real processes, since that is what the exit is about."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from trio_jobs.cli.common import print_line
from trio_jobs.cli.errors import EXIT_BROKEN_PIPE, EXIT_CONFIG, EXIT_ERROR, EXIT_USAGE, CliError
from trio_jobs.cli.main import _exit_status, _flushed

if TYPE_CHECKING:
    from pathlib import Path

# A finalizer that only the interpreter's teardown of modules would run: its line on stderr
# tells the usual exit from the quick one.
PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("atexit handler ran\\n"))
class Torn:
    def __del__(self):
        sys.stderr.write("module teardown ran\\n")
sys.modules["__main__"].torn = Torn()
sys.argv = ["trio-jobs", *sys.argv[1:]]
from trio_jobs.cli.main import run
run()
"""


def _run(*argv: str, env_home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRIO_JOBS_SERVER": "127.0.0.1:1"}
    if env_home is not None:
        env["TRIO_JOBS_HOME"] = str(env_home)
    return subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_version_is_printed_whole_and_exit_handlers_run_without_teardown() -> None:
    done = _run("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("trio-jobs ")
    assert done.stdout.endswith("\n")
    assert "atexit handler ran" in done.stderr
    assert "module teardown ran" not in done.stderr


def test_usage_error_keeps_argparse_status_and_message() -> None:
    done = _run("list", "--no-such-flag")
    assert done.returncode == EXIT_USAGE
    assert "unrecognized arguments: --no-such-flag" in done.stderr
    assert "Traceback" not in done.stderr


def test_command_failure_keeps_its_status_and_one_line(tmp_path: Path) -> None:
    done = _run("status", "00000000-0000-4000-8000-000000000000", env_home=tmp_path)
    assert done.returncode == EXIT_CONFIG  # no PKI in an empty TRIO_JOBS_HOME
    lines = [line for line in done.stderr.splitlines() if line != "atexit handler ran"]
    assert len(lines) == 1
    assert lines[0].startswith("trio-jobs: error: no client certificate at ")


def test_serve_exits_the_usual_way() -> None:
    done = _run("serve", "--port", "not-a-port")
    assert done.returncode == EXIT_USAGE
    assert "module teardown ran" in done.stderr


@pytest.mark.parametrize("closed", [1, 2])
def test_a_stream_closed_at_start_is_no_traceback(closed: int) -> None:
    # `trio-jobs --version >&-`: Python starts with sys.stdout (or stderr) None
    done = subprocess.run(["sh", "-c", f'exec "$0" -c "$1" --version {closed}>&-', sys.executable, PROBE],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "trio-jobs " in done.stdout + done.stderr  # argparse prints to the one left


class _Stdout:
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.flushed = False

    def flush(self) -> None:
        self.flushed = True
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize(("error", "code", "status"), [
    (None, 0, 0), (None, 3, 3),
    (BrokenPipeError(), 0, EXIT_BROKEN_PIPE),  # `trio-jobs list | head -1`: as main says it
    (OSError(28, "No space left on device"), 0, 120),  # as Python's own exit says it
    (OSError(28, "No space left on device"), 3, 3),
    (ValueError("I/O operation on closed file"), 0, 120),
])
def test_output_is_flushed_before_the_quick_exit(
    monkeypatch: pytest.MonkeyPatch, error: Exception | None, code: int, status: int
) -> None:
    out = _Stdout(error)
    monkeypatch.setattr(sys, "stdout", out)
    assert _flushed(code) == status
    assert out.flushed


@pytest.mark.parametrize(("code", "status", "printed"), [
    (None, 0, ""), (0, 0, ""), (3, 3, ""), ("bye", 1, "bye\n"),
])
def test_exit_status_is_what_sys_exit_would_give(
    code: object, status: int, printed: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exit_status(code) == status
    assert capsys.readouterr().err == printed


def test_printing_to_a_closed_stdout_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(CliError, match="standard output is closed") as caught:
        print_line("job-id")
    assert caught.value.exit_code == EXIT_ERROR
