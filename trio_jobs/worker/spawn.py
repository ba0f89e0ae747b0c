"""Starting a job's process inside its cgroup, as its user, before it executes the user's program.

Theory of operation. The request is hostile (DESIGN §3): its environment, working directory
and program must not touch anything that runs with the server's privileges, nor anything that
runs before the process is inside the job's cgroup. So the job process goes through a fixed
chain, each step of which sees only what it must:

1. ``setpriv`` (util-linux, :data:`SETPRIV`, a fixed root-owned path), run with the job's
   *base* environment (``validate.base_environment``: PATH, LANG, HOME, USER, LOGNAME, all
   chosen by the server, nothing from the request: ``LD_PRELOAD`` & co. cannot reach it),
   drops to the job's user: real, effective and saved uid and gid, the supplementary groups,
   ``no_new_privs`` (setuid/setgid bits and file capabilities no longer grant anything) and
   empty bounding and inheritable capability sets. Then it executes
2. ``/bin/sh -c WRAPPER`` -- as the job's user, still with the base environment -- which blocks
   in ``read`` on its stdin, the read end of a "go" pipe, until the worker has moved its pid
   into the job's cgroup (:meth:`JobCgroup.add_process`) and written ``go``. If the worker
   never says go (placement failed, or it died), it reads EOF and exits 125 without running
   anything. Then, as the user, it enters the working directory (``cd -P``: so a directory the
   user may not enter stays closed, whatever root could do; the shell then exports ``PWD``),
   and executes
3. when the request set variables, ``/usr/bin/env -i -- PWD=... NAME=VALUE... PROGRAM
   ARGS...``, which replaces the whole environment with the job's (the base one plus the
   request's) and executes the program: the request's variables are arguments until this
   last exec, so the first and only code that runs with them is the user's program, as the
   user, inside its cgroup. When the request set none (the common case), the shell executes
   the program itself: its environment is already the job's, and one exec (~0.5 ms of CPU
   per job, measured as +10% on the start p50 of back-to-back starts on 2 CPUs) is saved.

The pid stays the same across every exec, so the program and everything it forks start inside
the cgroup (Python 3.11's ``subprocess`` has no ``CLONE_INTO_CGROUP``). A job that runs as
uid 0 (an admin's job on a root server, or a policy's ``run_as = "root"``) skips step 1: the
policy gave it root, and removing root's capabilities would only pretend otherwise. A server
that is not root runs step 1 with ``no_new_privs`` only (it has no capabilities to drop).

The program was resolved, opened and checked as the job's user in Python first
(``validate.prepare``), so "cannot be executed" is an InvalidJobSpec of start, not a job;
when the policy restricts programs, the path executed is the policy's own (see
``Policy.check_program``). Remaining edge cases become a job that exits 126/127 with the
shell's or env's message as its output: the working directory or the file is changed between
the check and the exec; exec fails for a reason a stat cannot see (e.g. a missing ELF
interpreter). ``argv[0]`` of the program is its resolved path.

The first exec runs through CPython's C-level fork/exec (no ``preexec_fn``, which is unsafe
with threads; no ``user=``/``cwd=``, which would make CPython fork instead of vfork and enter
the directory as root): ``start_new_session`` (own session and process group), ``close_fds``.
stdout and stderr are the same pipe, so their interleaving is exact.

The main process is watched with a pidfd (:meth:`Spawned.wait_exited`) which becomes readable
at exit *without reaping*: the zombie keeps the pid (and process-group id) reserved until
:meth:`Spawned.reap`, which is what makes signalling the group safe until then.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

import trio

from .errors import InvalidJobSpec, WorkerError
from .leftovers import boot_ticks

if TYPE_CHECKING:
    import resource

    from .spec import RunAs

_HOLD: Final = (
    'IFS= read -r go && [ "$go" = go ] || exit 125; cd -P -- "$1" || exit 126; shift; unset OLDPWD; '
)
WRAPPER: Final = _HOLD + 'exec "$@" </dev/null'
"""The held step (2. in the module doc). Arguments: the working directory, the program, its
arguments."""
WRAPPER_ENV: Final = _HOLD + 'exec /usr/bin/env -i -- PWD="$PWD" "$@" </dev/null'
"""The held step when the request set variables. Arguments: the working directory, then
env's: NAME=VALUE..., the program, its arguments."""
SHELL: Final = "/bin/sh"
SETPRIV: str | None = next((p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.access(p, os.X_OK)), None)
"""util-linux setpriv: drops to the job's user, no_new_privs, no capabilities (None: none)."""
PIPE_SIZE: Final = 1024 * 1024  # the default /proc/sys/fs/pipe-max-size


@dataclass(frozen=True, kw_only=True)
class ExitInfo:
    returncode: int  # >= 0: exit code; < 0: killed by signal -returncode
    rusage: resource.struct_rusage | None  # None when the status was lost


@final
class Spawned:
    """A started (held or released) job process. Owns its pidfd, output pipe and go pipe."""

    def __init__(self, popen: subprocess.Popen[bytes], pidfd: int, output_fd: int,
                 go_fd: int, *, forked: tuple[int, int] = (0, -1)) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.forked = forked  # boot_ticks() before and after the fork (leftovers.StartClock)
        self._pidfd: int | None = pidfd
        self.output_fd: int | None = output_fd  # handed to the pump, which closes it
        self._go_fd: int | None = go_fd
        self.exit_info: ExitInfo | None = None

    def release(self) -> None:
        """Let the wrapper exec the program (call after placement)."""
        if self._go_fd is None:
            raise RuntimeError("already released")
        fd, self._go_fd = self._go_fd, None
        try:
            os.write(fd, b"go\n")  # 3 bytes into an empty pipe: never blocks
        except BrokenPipeError:
            pass  # the wrapper already died (e.g. killed); wait_exited will see it
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Make a held wrapper exit 125 without exec (closing the go pipe gives it EOF)."""
        if self._go_fd is not None:
            fd, self._go_fd = self._go_fd, None
            os.close(fd)

    def kill(self) -> None:
        """SIGKILL the main process through its pidfd (never a possibly recycled pid)."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def has_exited(self) -> bool:
        """Whether the main process has exited (not reaped yet, or already reaped)."""
        if self.exit_info is not None:
            return True
        try:
            result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped behind our back (someone called wait(-1))
            return True
        return result is not None

    async def wait_exited(self) -> None:
        """Return when the main process has exited; it stays an unreaped zombie."""
        if self._pidfd is None:
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.wait_readable(self._pidfd)

    def reap(self) -> ExitInfo:
        """Collect the exit status of a process that has exited. Idempotent."""
        if self.exit_info is None:
            try:
                _, status, rusage = os.wait4(self.pid, 0)  # a zombie: returns at once
            except ChildProcessError:
                # Reaped behind our back (e.g. by a wait(-1) elsewhere in the process): the
                # status is lost; report the job as killed rather than invent an exit code.
                self.popen.returncode = -signal.SIGKILL
                self.exit_info = ExitInfo(returncode=-signal.SIGKILL, rusage=None)
                self._close_pidfd()
                return self.exit_info
            code = os.waitstatus_to_exitcode(status)
            self.popen.returncode = code  # keep Popen consistent (no "still running" warning)
            self.exit_info = ExitInfo(returncode=code, rusage=rusage)
            self._close_pidfd()
        return self.exit_info

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            fd, self._pidfd = self._pidfd, None
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def close_pipes(self) -> None:
        self.abort()
        if self.output_fd is not None:
            fd, self.output_fd = self.output_fd, None
            os.close(fd)


def launch_argv(program: str, args: tuple[str, ...], *, env: dict[str, str], base_env: dict[str, str],
                cwd: str, run_as: RunAs | None) -> list[str]:
    """The argv of the chain in the module doc (steps 1-3) for a job whose environment is
    ``env`` and whose launch runs with ``base_env``. Raises WorkerError when this host cannot
    drop to ``run_as`` (no setpriv)."""
    if env == base_env:
        chain = [SHELL, "-c", WRAPPER, "trio-jobs-job", cwd, program, *args]
    else:
        chain = [SHELL, "-c", WRAPPER_ENV, "trio-jobs-job", cwd, *(f"{k}={v}" for k, v in env.items()),
                 program, *args]
    euid = os.geteuid()
    if euid == 0 and (run_as is None or (run_as.uid, run_as.gid) == (0, 0)):
        return chain  # root's job: nothing to drop (see the module doc)
    if SETPRIV is None:
        if euid != 0:
            return chain  # same user; no no_new_privs without setpriv (the server warns)
        raise WorkerError("cannot run jobs as another user: util-linux setpriv is not installed")
    if euid != 0:
        return [SETPRIV, "--no-new-privs", "--", *chain]
    assert run_as is not None
    groups = ",".join(str(g) for g in run_as.groups)
    return [SETPRIV, f"--regid={run_as.gid}", f"--reuid={run_as.uid}",
            f"--groups={groups}" if groups else "--clear-groups",
            "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", "--", *chain]


def spawn_blocking(program: str, args: tuple[str, ...], *, env: dict[str, str],
                   base_env: dict[str, str], cwd: str, run_as: RunAs | None) -> Spawned:
    """Start the held chain. Raises InvalidJobSpec when the OS refuses (E2BIG), WorkerError
    when this host cannot run it.

    Blocking (a fork and exec: ~0.1 ms with CPython's vfork path), for the job start's worker
    thread; on any error nothing is left running and every fd is closed.
    """
    argv = launch_argv(program, args, env=env, base_env=base_env, cwd=cwd, run_as=run_as)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    # A bigger pipe means fewer, larger reads and file writes (one thread hop each) for a
    # chatty job. Best effort: an unprivileged user may be held to the default 64 KiB.
    with contextlib.suppress(OSError):
        fcntl.fcntl(out_r, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            before = boot_ticks()
            popen = subprocess.Popen(
                argv, executable=argv[0], stdin=go_r, stdout=out_w, stderr=out_w,
                env=base_env, cwd="/", start_new_session=True, close_fds=True,
            )
            after = boot_ticks()
        finally:
            os.close(out_w)
            os.close(go_r)
    except BaseException as exc:
        os.close(out_r)
        os.close(go_w)
        if isinstance(exc, OSError):
            what = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
            raise InvalidJobSpec(f"cannot start the job: {what}") from None
        raise
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError as exc:  # EMFILE and friends; the child is unreaped, so its pid is ours
        os.close(out_r)
        os.close(go_w)  # the wrapper reads EOF and exits 125 without exec
        popen.wait()
        raise WorkerError(f"cannot watch the job process: {exc}") from exc
    return Spawned(popen, pidfd, out_r, go_w, forked=(before, after))
