"""Checking a JobSpec before anything is created, and building the job's environment.

Everything here is synchronous file-system work (stat, open of 4 bytes); the worker runs it
in a thread (``trio.to_thread``) so that a slow or hung file system never blocks the loop.
"""

from __future__ import annotations

import os
import pwd
import stat
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Final

from .creds import as_user
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
class ProgramFile:
    """The executable a command resolved to, as the job's user found and opened it.

    ``path`` is absolute (a name looked up on the job's PATH, or a path joined to the working
    directory, symlinks not resolved: it is the job's ``argv[0]``); ``dev``/``ino`` identify the
    very file that was open when it was checked, for the policy to compare.
    """

    path: str
    dev: int
    ino: int


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """A validated spec: the absolute program path to exec, the working directory, and the
    job's full environment."""

    program: str
    cwd: str
    env: dict[str, str]  # the job's: base_env + the request's variables
    base_env: dict[str, str]  # the server's part alone (what the launch chain runs with)


Authorize = Callable[[ProgramFile], str]
"""A policy hook for :func:`prepare`: refuse the program (raise) or return the path to exec."""


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


def base_environment(spec: JobSpec) -> dict[str, str]:
    """The clean environment: fixed PATH and LANG, the run-as user's HOME/USER/LOGNAME.
    Chosen by the server alone (no request data), so the launch chain may run with it; the
    job's shell adds PWD. The server's own environment never leaks into a job."""
    name, home = _user_name_home(spec.run_as)
    env = {"PATH": JOB_PATH, "LANG": "C.UTF-8", "HOME": home}
    if name:
        env["USER"] = env["LOGNAME"] = name
    return env


def _user_name_home(run_as: RunAs | None) -> tuple[str, str]:
    if run_as is not None:
        return run_as.name, run_as.home
    try:
        entry = pwd.getpwuid(os.getuid())
    except KeyError:
        return "", "/"
    return entry.pw_name, entry.pw_dir or "/"


def prepare(spec: JobSpec, authorize: Authorize | None = None) -> Prepared:
    """Validate ``spec`` and resolve its program. Raises InvalidJobSpec saying what to fix.

    Blocking (a few opens and stats), for the start's worker thread. Every check of a path
    the request named runs as the job's user (:func:`creds.as_user`): what the user may not
    see looks exactly like what does not exist. ``authorize`` (the policy) sees the opened
    program file and returns the path to execute; whatever it raises propagates.
    """
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
    base_env = base_environment(spec)
    env = {**base_env, **spec.env}
    total = sum(len(a) + 1 for a in (spec.command, *spec.args))
    total += sum(len(k) + len(v) + 2 for k, v in env.items())
    if total > MAX_TOTAL_BYTES:
        raise InvalidJobSpec(f"arguments and environment total {total} bytes (max {MAX_TOTAL_BYTES})")
    cwd = _no_nul("working_dir", spec.working_dir)
    if not os.path.isabs(cwd):
        raise InvalidJobSpec(f"working_dir {cwd!r} must be an absolute path")
    with as_user(spec.run_as):
        _check_working_dir(cwd)
        # Looked up in the fixed PATH, never the PATH of spec.env (the policy checks the result).
        found = open_program(spec.command, JOB_PATH, cwd, spec.run_as)
    program = authorize(found) if authorize is not None else found.path
    if "=" in program:
        # The job's environment is applied by `env -i NAME=VALUE... PROGRAM` (spawn.py), which
        # would take such a path for one more variable.
        raise InvalidJobSpec(f"cannot run {program!r}: a program path must not contain '='")
    return Prepared(program=program, cwd=cwd, env=env, base_env=base_env)


def _check_working_dir(cwd: str) -> None:
    """The job's user can enter ``cwd`` (call inside :func:`creds.as_user`). Looking up
    ``cwd/.`` needs search (x) permission on every directory of the path and on ``cwd``
    itself, as chdir does; ``O_PATH`` opens nothing else (no FIFO can block it)."""
    try:
        os.close(os.open(os.path.join(cwd, "."), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    except NotADirectoryError:
        raise InvalidJobSpec(f"working_dir {cwd!r} is not a directory") from None
    except (OSError, ValueError):
        raise InvalidJobSpec(
            f"working_dir {cwd!r} does not exist or the job's user may not enter it"
        ) from None


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


_HIDDEN: Final = "no such file, or the job's user may not reach it"


def open_program(command: str, path: str, cwd: str, run_as: RunAs | None) -> ProgramFile:
    """The executable ``command`` runs as: a path (relative to ``cwd``) or a PATH lookup.

    Like execvp(): a name without "/" is searched in ``path``; the first candidate that is an
    executable regular file wins. Each candidate is opened (``O_PATH``: no FIFO or device can
    block us) and checked through that descriptor, so what is checked is one file, whatever
    happens to the path meanwhile. Call it as the job's user (:func:`creds.as_user`). Raises
    InvalidJobSpec when there is none. Safe on any input.
    """
    _no_nul("command", command)
    _no_nul("working_dir", cwd)
    if not command:
        raise InvalidJobSpec("command is empty: give a program name or path")
    if "/" in command:
        # Joined, not normalized: "a/../b" means what the kernel will make of it from cwd.
        relative = command
        while relative.startswith("./"):
            relative = relative[2:].lstrip("/")
        candidate = command if command.startswith("/") else os.path.join(cwd, relative)
        found = _open_executable(candidate, run_as)
        if isinstance(found, str):
            raise InvalidJobSpec(f"cannot execute {command!r}: {found}")
        return found
    problems: list[str] = []
    for directory in path.split(":"):
        if not directory or not os.path.isabs(directory):
            continue  # an empty or relative PATH entry would depend on the cwd: ignore it
        candidate = os.path.join(directory, command)
        found = _open_executable(candidate, run_as)
        if not isinstance(found, str):
            return found
        if found != _HIDDEN:
            problems.append(f"{candidate}: {found}")
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise InvalidJobSpec(f"program {command!r} not found or not executable in PATH {path}{detail}")


def resolve_program(command: str, path: str, cwd: str, run_as: RunAs | None) -> str:
    """The absolute path of :func:`open_program`, checked as the job's user."""
    with as_user(run_as):
        return open_program(command, path, cwd, run_as).path


def _open_executable(candidate: str, run_as: RunAs | None) -> ProgramFile | str:
    """The file at ``candidate`` if the job's user can execute it, else why not."""
    try:
        fd = os.open(candidate, os.O_PATH | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return _HIDDEN
    except (OSError, ValueError) as exc:  # ELOOP, ENAMETOOLONG; ValueError: an unusable path
        return getattr(exc, "strerror", None) or str(exc)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return "is a directory"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if not _may_exec(st, run_as):
            who = f"user {run_as.name or run_as.uid}" if run_as is not None else "the server's user"
            return f"not executable by {who} (no x permission)"
        if os.fstatvfs(fd).f_flag & os.ST_NOEXEC:
            return "on a file system mounted noexec"
        try:
            # Reopen the checked file itself (never the path again) to read its first bytes.
            rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            magic = None  # execute-only for the job's user: let exec decide
        else:
            try:
                magic = os.read(rfd, 4)
            except OSError:
                magic = None
            finally:
                os.close(rfd)
        if magic is not None and not (magic.startswith(b"#!") or magic == b"\x7fELF"):
            # exec would fail with ENOEXEC; a shell would then run it as a script. Refuse.
            return "not an ELF binary or a #! script"
        return ProgramFile(path=candidate, dev=st.st_dev, ino=st.st_ino)
    finally:
        os.close(fd)


def _may_exec(st: os.stat_result, run_as: RunAs | None) -> bool:
    if run_as is None:
        uid, gid, groups = os.geteuid(), os.getegid(), tuple(os.getgroups())
    else:
        uid, gid, groups = run_as.uid, run_as.gid, tuple(run_as.groups)
    if uid == 0:
        return bool(st.st_mode & 0o111)
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid or st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)
