"""Starting a job's process inside its cgroup before it executes the user's program.

Placement (DESIGN §2; Python 3.11's ``subprocess`` has no ``CLONE_INTO_CGROUP``): the child
is ``/bin/sh -c WRAPPER PROGRAM ARGS...`` whose stdin is the read end of a "go" pipe. The
wrapper blocks in ``read`` until the worker has moved its pid into the job's cgroup
(:meth:`JobCgroup.add_process`) and written ``go``; then it ``exec``s the program with stdin
from /dev/null. The pid stays the same across ``exec``, so the program and everything it forks
start inside the cgroup. If the worker never says go (placement failed, or it died), the
wrapper reads EOF and exits 125 without running anything.

The user's program was resolved and validated in Python first (``validate.prepare``), so
"cannot be executed" is an InvalidJobSpec of start, not a job. Remaining edge cases, which
become a job that exits 126/127 with the shell's message as its output: the file is removed
or changed between the check and the exec; a run-as user lacks search permission on a
directory of the path; exec fails for a reason a stat cannot see (e.g. a missing ELF
interpreter, an unreadable #! interpreter). ``argv[0]`` of the program is its resolved path
(POSIX sh cannot set argv[0] separately), and dash exports ``PWD`` (= the working dir).

The child runs through CPython's C-level fork/exec (no ``preexec_fn``, which is unsafe with
threads): ``start_new_session`` (own session and process group), ``cwd``, ``close_fds``. stdout
and stderr are the same pipe, so their interleaving is exact. CPython takes its fast
``vfork`` path for this (~0.1 ms), but not when it is asked to switch users
(``user``/``group``/``extra_groups``): then it forks, copying the page tables of the whole
server -- 5-10 ms for a server of 100 MB here, for every job of a run-as user. So a run-as job
is started, on the vfork path, as util-linux ``setpriv --regid G --reuid U --groups ...``
(:data:`SETPRIV`, a fixed root-owned path), which sets real, effective and saved ids and the
groups exactly as CPython would, and then execs the wrapper as that user; only without
``setpriv`` does CPython switch users itself. (A ``setpriv`` that fails exits 127 with its
message as the job's output, like a failed exec.)

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

WRAPPER: Final = 'IFS= read -r go && [ "$go" = go ] || exit 125; exec "$0" "$@" </dev/null'
SHELL: Final = "/bin/sh"
SETPRIV: str | None = next((p for p in ("/usr/bin/setpriv", "/bin/setpriv") if os.access(p, os.X_OK)), None)
"""util-linux setpriv, to switch a run-as job's user without leaving the vfork path (None: none)."""
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


def spawn_blocking(program: str, args: tuple[str, ...], *, env: dict[str, str], cwd: str,
                   run_as: RunAs | None) -> Spawned:
    """Start the held wrapper. Raises InvalidJobSpec when the OS refuses (cwd, user, E2BIG).

    Blocking (a fork and exec: ~0.1 ms with CPython's vfork path), for the job start's worker
    thread; on any error nothing is left running and every fd is closed.
    """
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    # A bigger pipe means fewer, larger reads and file writes (one thread hop each) for a
    # chatty job. Best effort: an unprivileged user may be held to the default 64 KiB.
    with contextlib.suppress(OSError):
        fcntl.fcntl(out_r, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    argv = [SHELL, "-c", WRAPPER, program, *args]
    kwargs: dict[str, object] = {}
    if run_as is not None and SETPRIV is not None:
        groups = ",".join(str(g) for g in run_as.groups)
        argv = [SETPRIV, f"--regid={run_as.gid}", f"--reuid={run_as.uid}",
                f"--groups={groups}" if groups else "--clear-groups", "--", *argv]
    elif run_as is not None:
        kwargs = {"user": run_as.uid, "group": run_as.gid, "extra_groups": list(run_as.groups)}
    try:
        try:
            before = boot_ticks()
            popen = subprocess.Popen(
                argv, executable=argv[0], stdin=go_r, stdout=out_w, stderr=out_w, env=env,
                cwd=cwd, start_new_session=True, close_fds=True,
                **kwargs,  # type: ignore[call-overload]
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
