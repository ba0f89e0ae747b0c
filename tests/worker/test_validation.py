"""Bad input gets a clear InvalidJobSpec from start(), and no job record or output file."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from trio_jobs.worker import DEFAULT_LIMITS, InvalidJobSpec, JobSpec, Limits, RunAs

if TYPE_CHECKING:
    from trio_jobs.worker import Worker


def _files(tmp: Path) -> dict[str, str]:
    tmp.chmod(0o755)  # reachable by every user (pytest's base directory may not be: see below)
    text = tmp / "script.txt"
    text.write_text("echo no shebang\n")
    text.chmod(0o755)
    plain = tmp / "not-executable"
    plain.write_text("#!/bin/sh\necho hi\n")
    plain.chmod(0o644)
    nobody_only = tmp / "root-only"
    nobody_only.write_text("#!/bin/sh\necho hi\n")
    nobody_only.chmod(0o700)
    secret_dir = tmp / "secret"
    secret_dir.mkdir(mode=0o700)
    hidden = secret_dir / "tool"
    hidden.write_text("#!/bin/sh\necho hi\n")
    hidden.chmod(0o755)
    return {"text": str(text), "plain": str(plain), "root_only": str(nobody_only),
            "hidden": str(hidden), "secret_dir": str(secret_dir)}


CASES: dict[str, tuple[dict[str, object], str]] = {
    "empty command": ({"command": ""}, "command is empty"),
    "missing program": ({"command": "no-such-program-xyz"}, "not found"),
    "missing path": ({"command": "/no/such/program"}, "no such file"),
    "a directory": ({"command": "/usr"}, "is a directory"),
    "not executable": ({"command": "{plain}"}, "not executable"),
    "no #! and not ELF": ({"command": "{text}"}, "not an ELF binary"),
    "not executable by the run-as user": (
        {"command": "{root_only}", "run_as": RunAs(uid=65534, gid=65534, name="nobody")},
        "not executable by user nobody"),
    "hidden from the run-as user": (
        {"command": "{hidden}", "run_as": RunAs(uid=65534, gid=65534, name="nobody")},
        "no such file, or the job's user may not reach it"),
    "working dir hidden from the run-as user": (
        {"command": "echo", "working_dir": "{secret_dir}",
         "run_as": RunAs(uid=65534, gid=65534, name="nobody")},
        "does not exist or the job's user may not enter it"),
    "NUL in command": ({"command": "ec\0ho"}, "NUL"),
    "NUL in an argument": ({"command": "echo", "args": ("a", "b\0c")}, "argument 2 contains a NUL"),
    "NUL in an env value": ({"command": "echo", "env": {"A": "x\0"}}, "NUL"),
    "NUL in an env name": ({"command": "echo", "env": {"A\0B": "x"}}, "NUL"),
    "= in an env name": ({"command": "echo", "env": {"A=B": "x"}}, "contains '='"),
    "empty env name": ({"command": "echo", "env": {"": "x"}}, "name is empty"),
    "non-string argument": ({"command": "echo", "args": (1,)}, "must be a string"),
    "missing working dir": ({"command": "echo", "working_dir": "/no/such/dir"}, "working_dir"),
    "relative working dir": ({"command": "echo", "working_dir": "tmp"}, "absolute"),
    "working dir is a file": ({"command": "echo", "working_dir": "/etc/passwd"},
                              "not a directory"),
    "zero memory": ({"command": "echo", "limits": Limits(memory_bytes=0)}, "memory_bytes"),
    "negative cpu": ({"command": "echo", "limits": Limits(cpu_millis=-5)}, "cpu_millis"),
    "bool limit": ({"command": "echo", "limits": Limits(pids_max=True)}, "pids_max"),
    "empty owner": ({"command": "echo", "owner": ""}, "owner"),
    "huge argument": ({"command": "echo", "args": ("x" * 200_000,)}, "longer than"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_spec_is_refused_without_a_record(worker: Worker, tmp_path: Path,
                                                     case: str) -> None:
    if "run-as user" in case and os.geteuid() != 0:
        pytest.skip("needs root to own files that user nobody cannot execute or reach")
    fields, message = CASES[case]
    # tmp_path's parents must be reachable by nobody for the run-as cases to tell "not
    # executable" from "hidden": use a directory of our own under /tmp.
    base = Path(tempfile.mkdtemp(prefix="trio-jobs-validate-"))
    try:
        files = _files(base)
        kwargs: dict[str, object] = {"owner": "tester", **fields}
        for key in ("command", "working_dir"):
            value = kwargs.get(key)
            if isinstance(value, str) and "{" in value:
                kwargs[key] = value.format(**files)
        spec = JobSpec(**kwargs)  # type: ignore[arg-type]
        with pytest.raises(InvalidJobSpec, match=message):
            await worker.start(spec)
    finally:
        shutil.rmtree(base)
    assert await worker.list() == []
    assert os.listdir(tmp_path / "data" / "output") == []


async def test_a_valid_spec_with_limits_runs(worker: Worker) -> None:
    status = await worker.start(JobSpec(command="true", owner="o",
                                        limits=Limits(memory_bytes=1 << 30).merged_over(
                                            DEFAULT_LIMITS)))
    assert status.limits.memory_bytes == 1 << 30
    assert len(await worker.list()) == 1


@pytest.mark.parametrize(("command", "message"), [
    ("", "empty"), ("a\0b", "NUL"), ("x" * 5000, "not found"), ("/" + "x" * 5000, "cannot execute"),
])
def test_resolve_program_is_safe_on_any_input(command: str, message: str) -> None:
    from trio_jobs.worker.validate import JOB_PATH, resolve_program

    with pytest.raises(InvalidJobSpec, match=message):
        resolve_program(command, JOB_PATH, "/", None)


def test_resolve_program_finds_names_and_relative_paths(tmp_path: Path) -> None:
    from trio_jobs.worker.validate import JOB_PATH, resolve_program

    assert resolve_program("sh", JOB_PATH, "/", None) in ("/usr/bin/sh", "/bin/sh")
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    assert resolve_program("./run.sh", JOB_PATH, str(tmp_path), None) == str(script)
