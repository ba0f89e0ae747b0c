"""The command line: flags, defaults, JOB/--job, one-line usage errors, exit codes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from trio_jobs.cli import common
from trio_jobs.cli.errors import EXIT_USAGE, CliError
from trio_jobs.cli.main import build_parser, main

if TYPE_CHECKING:
    import argparse


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_start_flags_and_command() -> None:
    args = parse(
        "start", "--cpus", "1.5", "--memory", "512M", "--pids", "64", "--io-read-bps", "10M",
        "--io-write-bps", "1G", "--io-read-iops", "10k", "--io-write-iops", "500",
        "-e", "A=1", "-e", "B=x=y", "--cwd", "/tmp", "-f", "--", "sh", "-c", "echo --memory",
    )
    limits = common.limits_of(args)
    assert limits.cpu_millis == 1500
    assert limits.memory_bytes == 512 << 20
    assert limits.pids_max == 64
    assert limits.io_read_bps == 10 << 20
    assert limits.io_write_bps == 1 << 30
    assert limits.io_read_iops == 10_000
    assert limits.io_write_iops == 500
    assert common.env_of(args.env) == {"A": "1", "B": "x=y"}
    assert args.cwd == "/tmp"
    assert args.follow
    assert [a for a in args.argv if a != "--"] == ["sh", "-c", "echo --memory"]


def test_unset_limits_stay_unset() -> None:
    limits = common.limits_of(parse("start", "--", "true"))
    assert limits.to_proto().ListFields() == []


@pytest.mark.parametrize("argv", [["stop", "J"], ["stop", "--job", "J"], ["stop", "J", "--job", "J"]])
def test_job_positional_or_option(argv: list[str]) -> None:
    assert common.job_id_of(parse(*argv)) == "J"


def test_two_different_jobs_is_a_usage_error() -> None:
    with pytest.raises(CliError) as info:
        common.job_id_of(parse("status", "A", "--job", "B"))
    assert info.value.exit_code == EXIT_USAGE


def test_grace_forms() -> None:
    assert parse("stop", "J", "--grace", "5s").grace == 5.0
    assert parse("stop", "J", "--grace", "0").grace == 0.0
    assert parse("stop", "J", "--grace", "500ms").grace == 0.5
    assert parse("stop", "J").grace is None


def test_bad_env_pair() -> None:
    with pytest.raises(CliError, match="NAME=VALUE"):
        common.env_of(["NOEQUALS"])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["start", "--memory", "much", "--", "x"], "invalid size"),
        (["stop", "J", "--grace", "soon"], "invalid duration"),
        (["bogus"], "invalid choice"),
        ([], "required"),
        (["tail", "J", "--offset", "-4"], "offset"),
        (["stop", "J", "--grace", "-1s"], "duration '-1s' is negative"),
        (["stop", "J", "--grace=-1s"], "duration '-1s' is negative"),
        (["stop", "--grace", "-1s", "J"], "duration '-1s' is negative"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("trio-jobs: error: ")
    assert err.count("\n") == 1
    assert needle in err


def test_help_lists_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit codes:" in out
    assert "TRIO_JOBS_HOME" in out


def test_missing_pki_is_a_config_error(tmp_path: object, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TRIO_JOBS_HOME", str(tmp_path))
    assert main(["list"]) == 8
    err = capsys.readouterr().err
    assert err.startswith("trio-jobs: error: no client certificate")
    assert err.count("\n") == 1


def test_bad_identity_and_server(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--identity", "../etc"]) == EXIT_USAGE
    assert main(["list", "--server", "nohostport"]) == EXIT_USAGE
    err = capsys.readouterr().err.splitlines()
    assert "invalid identity" in err[0]
    assert "HOST:PORT" in err[1]


def test_start_without_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start", "--cpus", "1"]) == EXIT_USAGE
    assert "no command given" in capsys.readouterr().err


def test_certs_delegates(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["certs", "init", "--dir", f"{tmp_path}/pki"]) == 0
    assert "created" in capsys.readouterr().out


def test_a_negative_value_after_the_commands_double_dash_is_the_jobs() -> None:
    """Only the CLI's own options are joined with a value that looks negative."""
    from trio_jobs.cli.main import _join_signed_values

    assert _join_signed_values(["stop", "J", "--grace", "-1s"]) == ["stop", "J", "--grace=-1s"]
    job = ["start", "--", "sleep", "--grace", "-1"]
    assert _join_signed_values(job) == job
    assert _join_signed_values(["stop", "J", "--grace", "--json"]) == ["stop", "J", "--grace", "--json"]
