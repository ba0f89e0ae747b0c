"""certs-gen / certs_cli.main: exit codes, one-line errors, default directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from trio_jobs.security.certs_cli import main
from trio_jobs.security.pki import load_pair

REPO = Path(__file__).resolve().parents[2]


def test_init_then_issue(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = tmp_path / "pki"
    assert main(["init", "--dir", str(pki), "--san", "jobs.example.org"]) == 0
    assert str(pki) in capsys.readouterr().out
    assert main(["issue", "carol", "--dir", str(pki)]) == 0
    assert load_pair(pki, "carol").cert.subject.rfc4514_string() == "CN=carol"
    assert main(["issue", "--server", "--san", "10.0.0.7", "--dir", str(pki), "--force"]) == 0


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        ([], 2, "required"),
        (["bogus"], 2, "invalid choice"),
        (["issue"], 2, "needs a NAME"),
        (["issue", "x", "--server"], 2, "takes no NAME"),
        (["issue", "x", "--san", "a.example"], 2, "server certificates only"),
        (["init", "--san", "bad name"], 1, "invalid subject alternative name"),
        (["issue", "../x"], 1, "invalid identity"),
        (["issue", "carol"], 1, "certs-gen init"),  # no CA yet
    ],
)
def test_errors_are_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    status: int,
    message: str,
) -> None:
    full = [*argv, "--dir", str(tmp_path / "pki")] if argv and argv[0] != "bogus" else argv
    assert main(full) == status
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1
    assert err.startswith("certs-gen: error: ")


def test_refuses_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", "--dir", str(tmp_path)]) == 0
    assert main(["init", "--dir", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["init", "--dir", str(tmp_path), "--force"]) == 0


def test_script_uses_trio_jobs_home(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_STATE_HOME",)}
    env["TRIO_JOBS_HOME"] = str(tmp_path / "home")
    done = subprocess.run(
        [sys.executable, str(REPO / "certs-gen"), "init"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    key = tmp_path / "home" / "pki" / "alice.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert os.access(REPO / "certs-gen", os.X_OK)
