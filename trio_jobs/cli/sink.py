"""Where ``tail`` (and ``start -f``) write the job's output: stdout, without blocking trio.

A blocking ``os.write`` to stdout (a pipe to a slow reader, a terminal) must not run in
trio's thread. Sending every received chunk (64 KiB) through ``trio.to_thread`` made that
hand-off the client's main cost: the profile of ``trio-jobs tail | ...`` showed a third of
its time in it, and the server waiting for the client (docs/benchmarks.md, "End to end").

When stdout is a pipe -- the common ``tail JOB | grep ...`` and the case a script reads --
we write in trio's own thread with ``pwritev2(RWF_NOWAIT)``: the kernel writes what fits in
the pipe and says EAGAIN instead of blocking, and trio waits for the pipe to become writable
(epoll works on pipes). The file's blocking mode is never changed (stdout may be shared
with the shell and other processes), and nothing is buffered here: a slow reader of the pipe
slows the stream down through the server's HTTP/2 flow control. Anything else (a regular
file, a terminal, a kernel without RWF_NOWAIT for pipes) keeps one thread hop per chunk.
A write error (EPIPE of ``| head``) is raised from the sink unchanged.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Final, final

import trio

_RWF_NOWAIT: Final = getattr(os, "RWF_NOWAIT", 0)
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ: Final = getattr(fcntl, "F_GETPIPE_SZ", 1032)
# errors that mean "this file or kernel does not do non-blocking writes this way"
_NO_NOWAIT: Final = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ESPIPE, errno.ENOSYS})


PIPE_SIZE: Final = 1 << 20
"""What stdout's pipe is grown to (Linux's default limit for unprivileged processes; the
default 64 KiB holds one chunk, so every chunk waited for the reader to be scheduled)."""


def _grow_pipe(fd: int) -> None:
    """Grow the pipe ``fd`` writes into to ``PIPE_SIZE``, if the kernel allows; never shrink it."""
    try:
        if fcntl.fcntl(fd, _F_GETPIPE_SZ) < PIPE_SIZE:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:  # over /proc/sys/fs/pipe-max-size, or the user's pipe quota: keep it
        pass


@final
class StdoutWriter:
    """An async sink that writes every byte it gets to the file descriptor ``fd``."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        try:
            is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        except OSError:
            is_pipe = False
        self._nowait = bool(_RWF_NOWAIT) and is_pipe
        if is_pipe:
            _grow_pipe(fd)

    @property
    def in_loop(self) -> bool:
        """True while writes are done in trio's thread (stdout is a pipe that supports it)."""
        return self._nowait

    async def write(self, data: bytes) -> None:
        """Write all of ``data``; a checkpoint. Raises OSError (e.g. BrokenPipeError)."""
        view = memoryview(data)
        if self._nowait:
            while view:
                try:
                    view = view[os.pwritev(self._fd, [view], -1, _RWF_NOWAIT) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._fd)
                except OSError as exc:
                    if exc.errno not in _NO_NOWAIT:
                        raise
                    self._nowait = False  # and write the rest from a thread below
                    break
            else:
                await trio.lowlevel.checkpoint()
                return
        await trio.to_thread.run_sync(_write_all, self._fd, view)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]
