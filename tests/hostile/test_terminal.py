"""Terminal spoofing (issue #16, item 7; DESIGN §3): what a user puts in a job's arguments
cannot draw, erase, move or reorder anything on an admin's terminal.

alice starts jobs through the real CLI whose arguments carry the payloads (a fake row that
looks like an admin's job, cursor movement and line erasure, a carriage return, bidi
overrides, a C1 CSI, invisible characters, the text of an escape); then the admin's real
``trio-jobs list --all``, ``status JOB`` and error lines are captured: not one raw control,
bidi or invisible character (but the newline that ends each line), one line per job, and
``--json`` still carries the exact arguments.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import TYPE_CHECKING, Final

import pytest
from cli.test_escape import dangerous

if TYPE_CHECKING:
    from e2e.conftest import Host

pytestmark = pytest.mark.slow

FAKE_ID: Final = "0b5a9d2c-7e41-4f3a-9c1e-2d6f8a4b1c00"
FAKE_ROW: Final = f"{FAKE_ID}  admin  running   2026-01-01 00:00:00 UTC  3d  /usr/sbin/sshd -D"
PAYLOADS: Final = {
    "fake row on a new line": f"x\n{FAKE_ROW}",
    "erase the real row, write a fake one": f"\r\x1b[2K{FAKE_ROW}",
    "cursor up, erase the rows above": "\x1b[1A\x1b[2K\x1b[1A\x1b[2K\x1b[H\x1b[J",
    "carriage return": "harmless\rrm -rf --no-preserve-root /",
    "bidi overrides": "\u202etxt.exe\u202c \u2066evil\u2069 \u200f\u061c\u200e",
    "C1 CSI and OSC": "\x9b1A\x9b2K\x9d0;pwned\x9c",
    "invisible and look-alike spaces": "ad\u200bmin\u00a0\u3164\ufeff",
    "tab and the text of an escape": "a\tb \\x1b[2K",
}


def visible(text: str) -> None:
    """``text`` is lines of safe characters, each ended by a newline."""
    assert text.endswith("\n"), text
    bad = sorted({c for c in text[:-1].replace("\n", "") if dangerous(c)})
    assert not bad, f"raw {[hex(ord(c)) for c in bad]} in {text!r}"


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode != 0
    assert result.stdout == b""
    err = result.stderr.decode()  # strict: the line is UTF-8 (the bytes that were not are escaped)
    visible(err)
    assert err.count("\n") == 1, err
    assert err.startswith("trio-jobs: error: ")
    return err


def bash_argv(line: str) -> list[str]:
    """What bash makes of a command line shown by ``status`` (it is meant to paste back)."""
    bash = shutil.which("bash")
    assert bash is not None
    out = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", "printf '%s\\0' " + line],
        capture_output=True, check=True, timeout=30, env={"LC_ALL": "C.UTF-8"},
    ).stdout
    return out.decode().split("\0")[:-1]


def test_job_arguments_cannot_spoof_the_admins_terminal(served: Host) -> None:
    jobs = {served.start("echo", payload, identity="alice"): payload for payload in PAYLOADS.values()}

    listing = served.run("list", "--all", identity="admin").stdout.decode()
    visible(listing)
    header, *rows = listing[:-1].split("\n")
    assert len(rows) == len(jobs), listing  # one line per job: no injected line
    assert header.split()[:3] == ["JOB", "ID", "OWNER"]
    owner_at = header.index("OWNER")
    for row, job_id in zip(rows, jobs, strict=True):  # oldest first
        assert row.startswith(job_id + " ")  # no row begins with the fake id ...
        assert row[owner_at:].startswith("alice ")  # ... and the columns still line up
    assert FAKE_ID in listing  # (it is there, in plain sight, inside alice's command)

    exact = json.loads(served.run("list", "--all", "--json", identity="admin").stdout)
    assert {j["job_id"]: j["args"] for j in exact["jobs"]} == {job_id: [p] for job_id, p in jobs.items()}

    for job_id, payload in jobs.items():
        status = served.run("status", job_id, identity="admin").stdout.decode()
        visible(status)
        lines = status[:-1].split("\n")
        assert len(lines) == 10, status
        assert lines[0] == f"job      {job_id}"
        assert lines[1] == "owner    alice"
        command = json.loads(served.run("status", job_id, "--json", identity="admin").stdout)["command"]
        shown = lines[2].removeprefix("command  ")
        assert bash_argv(shown) == [command, payload]


def test_error_lines_cannot_spoof_the_terminal(served: Host) -> None:
    job_id = served.start("true", identity="alice")
    payload = f"\r\x1b[2K\x1b[1A{FAKE_ROW}\n\u202eok\x9b2K"
    # the server's refusals quote the attacker's text: a program that does not exist, a job id
    err = one_error_line(served.run("start", "--", f"/nonexistent/{payload}", identity="alice", check=False))
    assert "/nonexistent/" in err
    one_error_line(served.run("status", payload, identity="admin", check=False))
    one_error_line(served.run("stop", payload, identity="admin", check=False))
    # the CLI's own errors quote the words it was given: argparse, a certificate path
    err = one_error_line(served.run("list", payload, identity="admin", check=False))
    assert "unrecognized arguments" in err
    err = one_error_line(served.run("status", "--cert", f"/tmp/{payload}", job_id, identity="admin", check=False))
    assert "\\x1b[2K\\x1b[1A" in err  # escaped, in the notation the module documents
    # a word that is not UTF-8 (surrogateescape'd by Python) is a usage error, shown escaped
    bad = served.run("start", "--", "echo", "\udcff\x1b[2K", identity="alice", check=False)
    assert bad.returncode == 2
    err = one_error_line(bad)
    assert "argument 1 '\\xff\\x1b[2K' is not valid UTF-8" in err
    # nothing a client sent reaches the server's own stderr raw either
    log = served.server_stderr()
    assert not [c for c in log.replace("\n", "") if dangerous(c)], log


@pytest.mark.parametrize(("number", "shown"), [(15, "SIGTERM"), (39, "signal 39")])
def test_a_job_choosing_the_signal_that_ends_it_gets_one_plain_state_line(
    served: Host, number: int, shown: str
) -> None:
    # the signal's name is looked up only when such a status is printed (cli/output.py): a
    # real-time signal has no name in Python's table and is shown by number
    job_id = served.start("python3", "-c", f"import os; os.kill(os.getpid(), {number})", identity="alice")
    served.run("tail", job_id, identity="alice", check=False)  # until it has ended
    done = served.run("status", job_id, identity="admin")
    status = done.stdout.decode()
    visible(status)
    state = next(line for line in status.split("\n") if line.startswith("state "))
    assert state.removeprefix("state").strip().startswith(f"killed {shown}"), status
    assert done.stderr == b""
