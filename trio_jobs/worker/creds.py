"""Looking at the file system as the job's user, from one thread of a root server.

Why: every check of a user-given path (the working directory, the program) must answer what
the job's user would get, never what root can see (DESIGN §3). A root server that ``stat``\\ s
``/root/secret/x`` for ``nobody`` would otherwise tell "no such file" from "permission denied"
and open directories ``nobody`` cannot enter.

How: Linux checks file access against a thread's *file-system* ids (fsuid, fsgid) and its
supplementary groups, and these are per thread at the system-call level. :func:`as_user`
switches only the calling thread: ``setfsgid``/``setfsuid`` (glibc's wrappers are plain
per-thread calls) and the raw ``setgroups`` system call (glibc's ``setgroups()`` would change
every thread of the process). Moving the fsuid away from 0 also clears the file-system
capabilities (``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``, ``CAP_FOWNER``...) from the
thread's effective set, and moving it back restores them (capabilities(7), "Effect of user ID
changes on capabilities"), so inside the block the thread is, for every path lookup, open and
permission check, exactly the job's user. The ids are restored before the block returns or
raises; the thread is one of trio's worker threads and goes back to its pool clean.

Nothing else of the process changes: the other threads (the event loop among them) keep root's
view. Only the start thread uses this, around its checks (``validate.prepare``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
from typing import TYPE_CHECKING, Final

from .errors import WorkerError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .spec import RunAs

# The raw setgroups system call (not glibc's, which changes every thread), by architecture.
_SYS_SETGROUPS: Final = {"x86_64": 116, "aarch64": 159, "riscv64": 159, "ppc64le": 81, "s390x": 206}

_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def needs_switch(run_as: RunAs | None) -> bool:
    """Whether checks for ``run_as`` must switch ids (a root server, a job of another user)."""
    return run_as is not None and os.geteuid() == 0 and (run_as.uid, run_as.gid) != (0, 0)


def supported() -> str | None:
    """None when :func:`as_user` works on this host, else why not (for the server's start)."""
    if platform.machine() not in _SYS_SETGROUPS:
        return f"no known setgroups system call number for {platform.machine()}"
    try:
        _lib()
    except OSError as exc:
        return f"cannot load the C library: {exc}"
    return None


def _setgroups(groups: tuple[int, ...]) -> None:
    number = _SYS_SETGROUPS.get(platform.machine())
    if number is None:
        raise WorkerError(f"cannot check paths as the job's user: {supported()}")
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    if _lib().syscall(ctypes.c_long(number), ctypes.c_size_t(len(groups)), array) != 0:
        err = ctypes.get_errno()
        raise WorkerError(f"cannot switch the checking thread's groups: {os.strerror(err)}")


def _set_fs_ids(uid: int, gid: int) -> None:
    libc = _lib()
    libc.setfsgid(ctypes.c_uint(gid))
    libc.setfsuid(ctypes.c_uint(uid))
    # setfsuid/setfsgid return the previous id and never fail loudly: a second call (a no-op
    # when the first one worked) returns the id in force, which must be the one we asked for.
    now_gid = libc.setfsgid(ctypes.c_uint(gid))
    now_uid = libc.setfsuid(ctypes.c_uint(uid))
    if (now_uid, now_gid) != (uid, gid):
        raise WorkerError(f"cannot switch the checking thread to uid {uid} (still {now_uid})")


@contextlib.contextmanager
def as_user(run_as: RunAs | None) -> Iterator[None]:
    """Make the calling thread's file-system accesses those of ``run_as`` inside the block.

    A no-op unless :func:`needs_switch`. Blocking-thread code only: never use it on the event
    loop's thread (it would give the loop the user's view of the file system meanwhile).
    """
    if not needs_switch(run_as):
        yield
        return
    assert run_as is not None
    own_ids, own_groups = (os.geteuid(), os.getegid()), tuple(os.getgroups())
    _setgroups(tuple(run_as.groups) or (run_as.gid,))
    try:
        _set_fs_ids(run_as.uid, run_as.gid)
        try:
            yield
        finally:
            _set_fs_ids(*own_ids)
    finally:
        _setgroups(own_groups)
