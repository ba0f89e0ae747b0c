"""Checking a JobSpec before anything is created, and building the job's environment.

Everything here is synchronous file-system work (stat, open of 4 bytes); the worker runs it
in a thread (``trio.to_thread``) so that a slow or hung file system never blocks the loop.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Final

from .errors import InvalidJobSpec
from .limits import Limits

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .spec import JobSpec, RunAs

JOB_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# execve() refuses a single argument/variable longer than 32 pages (MAX_ARG_STRLEN) and a total
# of about a quarter of the stack limit; stay well inside both and say so clearly.
MAX_ARG_BYTES: Final = 128 * 1024 - 1
MAX_TOTAL_BYTES: Final = 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """A validated spec: the absolute program path to exec and the job's full environment."""

    program: str
    env: dict[str, str]


def _no_nul(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidJobSpec(f"{what} must be a string, not {type(value).__name__}")
    if "\0" in value:
        raise InvalidJobSpec(f"{what} contains a NUL byte, which no program can receive")
    if len(value.encode("utf-8", "surrogateescape")) > MAX_ARG_BYTES:
        raise InvalidJobSpec(f"{what} is longer than {MAX_ARG_BYTES} bytes")
    return value


def check_limits(limits: Limits) -> None:
    if not isinstance(limits, Limits):
        raise InvalidJobSpec(f"limits must be a Limits, not {type(limits).__name__}")
    for f in fields(limits):
        value = getattr(limits, f.name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidJobSpec(f"limit {f.name} must be an integer, not {value!r}")
        if value <= 0:
            raise InvalidJobSpec(
                f"limit {f.name} must be positive, not {value} (leave it unset for the default)"
            )


def job_environment(spec: JobSpec) -> dict[str, str]:
    """The clean environment (fixed PATH, LANG, the run-as user's HOME/USER/LOGNAME) + spec.env.

    The server's own environment never leaks into a job.
    """
    name, home = _user_name_home(spec.run_as)
    env = {"PATH": JOB_PATH, "LANG": "C.UTF-8", "HOME": home}
    if name:
        env["USER"] = env["LOGNAME"] = name
    env.update(spec.env)
    return env


def _user_name_home(run_as: RunAs | None) -> tuple[str, str]:
    if run_as is not None:
        return run_as.name, run_as.home
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return "", "/"
    return entry.pw_name, entry.pw_dir or "/"


def prepare(spec: JobSpec) -> Prepared:
    """Validate ``spec`` and resolve its program. Raises InvalidJobSpec saying what to fix."""
    _no_nul("command", spec.command)
    if not spec.command:
        raise InvalidJobSpec("command is empty: give a program name or path")
    if not isinstance(spec.args, tuple | list):
        raise InvalidJobSpec("args must be a sequence of strings")
    for i, arg in enumerate(spec.args):
        _no_nul(f"argument {i + 1}", arg)
    if not isinstance(spec.owner, str) or not spec.owner:
        raise InvalidJobSpec("owner must be a non-empty string")
    _check_env(spec.env)
    check_limits(spec.limits)
    env = job_environment(spec)
    total = sum(len(a) + 1 for a in (spec.command, *spec.args))
    total += sum(len(k) + len(v) + 2 for k, v in env.items())
    if total > MAX_TOTAL_BYTES:
        raise InvalidJobSpec(f"arguments and environment total {total} bytes (max {MAX_TOTAL_BYTES})")
    cwd = _no_nul("working_dir", spec.working_dir)
    if not os.path.isabs(cwd):
        raise InvalidJobSpec(f"working_dir {cwd!r} must be an absolute path")
    try:
        st = os.stat(cwd)
    except OSError as exc:
        raise InvalidJobSpec(f"working_dir {cwd!r} cannot be used: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidJobSpec(f"working_dir {cwd!r} is not a directory")
    # Looked up in the fixed PATH, never the PATH of spec.env (the policy checks the result).
    program = resolve_program(spec.command, JOB_PATH, cwd, spec.run_as)
    return Prepared(program=program, env=env)


def _check_env(env: Mapping[str, str]) -> None:
    if not hasattr(env, "items"):
        raise InvalidJobSpec("env must be a mapping of names to values")
    for key, value in env.items():
        _no_nul("environment variable name", key)
        if not key:
            raise InvalidJobSpec("environment variable name is empty")
        if "=" in key:
            raise InvalidJobSpec(f"environment variable name {key!r} contains '='")
        _no_nul(f"value of environment variable {key}", value)


def resolve_program(command: str, path: str, cwd: str, run_as: RunAs | None) -> str:
    """The absolute path ``command`` runs as: a path (relative to ``cwd``) or a PATH lookup.

    Like execvp(): a name without "/" is searched in ``path``; the first candidate that is an
    executable regular file wins. Raises InvalidJobSpec when there is none. Safe on any input
    (the service calls it directly, before :func:`prepare`, to check the policy).
    """
    _no_nul("command", command)
    _no_nul("working_dir", cwd)
    if not command:
        raise InvalidJobSpec("command is empty: give a program name or path")
    if "/" in command:
        candidate = os.path.normpath(os.path.join(cwd, command))
        problem = _not_executable(candidate, run_as)
        if problem:
            raise InvalidJobSpec(f"cannot execute {command!r}: {problem}")
        return candidate
    problems: list[str] = []
    for directory in path.split(":"):
        if not directory or not os.path.isabs(directory):
            continue  # an empty or relative PATH entry would depend on the cwd: ignore it
        candidate = os.path.join(directory, command)
        problem = _not_executable(candidate, run_as)
        if problem is None:
            return candidate
        if problem != "no such file":
            problems.append(f"{candidate}: {problem}")
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise InvalidJobSpec(f"program {command!r} not found or not executable in PATH {path}{detail}")


def _not_executable(candidate: str, run_as: RunAs | None) -> str | None:
    """Why ``candidate`` cannot be executed by the job's user, or None when it can."""
    try:
        st = os.stat(candidate)
    except FileNotFoundError:
        return "no such file"
    except (OSError, ValueError) as exc:  # ValueError: e.g. a path that is too long for stat
        return getattr(exc, "strerror", None) or str(exc)
    if stat.S_ISDIR(st.st_mode):
        return "is a directory"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not os.access(candidate, os.X_OK):  # also catches noexec mounts for the server's user
        return "not executable (no x permission or a noexec mount)"
    if run_as is not None and not _user_may_exec(st, run_as):
        return f"not executable by user {run_as.name or run_as.uid}"
    try:
        with open(candidate, "rb") as f:
            magic = f.read(4)
    except OSError:
        return None  # execute-only for us: let exec decide
    if not (magic.startswith(b"#!") or magic == b"\x7fELF"):
        # exec would fail with ENOEXEC; the shell would then run it as a script. Refuse instead.
        return "not an ELF binary or a #! script"
    return None


def _user_may_exec(st: os.stat_result, run_as: RunAs) -> bool:
    if run_as.uid == 0:
        return bool(st.st_mode & 0o111)
    if st.st_uid == run_as.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == run_as.gid or st.st_gid in run_as.groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)
