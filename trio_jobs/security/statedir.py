"""The server's state must be its own: checked before ``serve`` creates or reads anything.

Theory of operation (DESIGN section 3, issue #16). ``trio-jobs serve`` often runs as root, and
its state directory (``TRIO_JOBS_HOME``: ``pki/``, ``jobs.sqlite3``, ``output/``) is a path
that anyone may have reached first. A directory made by another user holds *their* PKI: a
root server that adopted it would trust their CA, so their ``admin`` certificate would be
admin. A symbolic link planted in it makes root read or write the file the link names.

Rules, checked with ``lstat`` (a symbolic link is looked at, never through, unless a rule
below says it may be followed):

- Every directory on the way to a configured directory (``TRIO_JOBS_HOME``, ``--data-dir``,
  ``--pki``) or TLS file belongs to root or the server's user and is not writable by group or
  others unless it is sticky (OpenSSH's StrictModes): nobody else can rename what we use away
  or put something else in its place. A symbolic link on that way is followed only when root
  or the server's user owns it: it sits in a directory that passed, so only they could have
  made it (in a sticky directory, only its owner can replace it) -- ``/var/run -> /run``.
- The configured directories themselves, and everything ``serve`` keeps in them
  (``output/``, ``pki/``, ``lock``, the database with its ``-wal``/``-shm``/``-journal``,
  ``final-records``, ``dynamic-users.json``, ``audit.jsonl`` and the files of the
  development PKI) belong to the server's user (its euid), have the expected type -- a
  symbolic link there is refused: trio-jobs never makes one -- files have one hard link
  (another name for a file elsewhere is as bad as a symlink), and nothing is writable by
  group or others; private keys are not readable by them either.
- Once a directory has passed, only root and the server's user can add, remove or replace
  what is in it, so checking once at start is enough; what the server opens in it later
  adds ``O_NOFOLLOW`` as a second line of defence.
- Nothing is created or changed before every check has passed. Missing directories are then
  created 0700 with ``mkdir`` (which never follows a symlink), outermost first; one that
  appeared since the check (someone else won a race in a sticky directory like /tmp) is
  checked again like any existing one, and refused if it is not ours.
- ``--pki D`` is a development PKI directory (``serve`` creates it if needed): it gets the
  rules of ``TRIO_JOBS_HOME/pki``. ``--cert/--key/--ca`` are the operator's files, often
  managed by other tools (``/etc/letsencrypt/live/X/privkey.pem`` links into
  ``../../archive``): symbolic links are followed under the first rule, and the file at the end
  must belong to root or the server's user and not be writable by group or others; the key
  must not be readable by others (group-readable is allowed: the ``ssl-cert`` group
  convention that lets a service user read a root-owned key).
- A private file other than a key (the database and its companions, ``final-records``,
  ``dynamic-users.json``, ``audit.jsonl``) that group or others may only *read* is tightened
  to 0600 and reported rather than refused (earlier releases made the database 0644; nobody
  else could have changed it).

Every refusal is a :class:`StateDirError` whose message is one line: the path, what is
wrong, and what to do.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .errors import SecurityError
from .pki import CA_STEM, DEV_IDENTITIES, SERVER_STEM

if TYPE_CHECKING:
    from collections.abc import Callable

# The layout of the data directory, as trio_jobs.worker keeps it (security/ may not import
# the worker; tests/hostile/test_state_dir.py checks that the names agree).
DB_NAME: Final = "jobs.sqlite3"
DB_FILES: Final = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal")
LOCK_NAME: Final = "lock"
OUTPUT_DIR: Final = "output"
PKI_DIR: Final = "pki"
AUDIT_NAME: Final = "audit.jsonl"  # = trio_jobs.audit.AUDIT_FILE_NAME, in TRIO_JOBS_HOME
DYNAMIC_USERS_NAME: Final = "dynamic-users.json"  # = security.dynamic_users.FILE_NAME, data dir
FINALS_NAME: Final = "final-records"  # = trio_jobs.worker.finals.FILE_NAME, in the data dir
MAX_SYMLINKS: Final = 40  # as the kernel, before ELOOP
DIR_MODE: Final = 0o700

_GO_WRITE: Final = stat.S_IWGRP | stat.S_IWOTH
_GO_ANY: Final = 0o077

StrPath = str | os.PathLike[str]


class StateDirError(SecurityError):
    """The state directory, or a file ``serve`` would use, may be someone else's. One line."""


def _show(path: StrPath) -> str:
    """A path for a one-line message, non-printable characters escaped: a planted name must
    not reach the operator's terminal raw (undecodable bytes are shown as ``\\xNN``)."""
    out = []
    for c in os.fspath(path):
        code = ord(c)
        if c.isprintable():
            out.append(c)
        elif code < 0x100 or 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd byte
            out.append(f"\\x{code & 0xFF:02x}")
        else:
            out.append(f"\\u{code:04x}")
    return "".join(out)


def _user(uid: int) -> str:
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(frozen=True)
class _Role:
    """What a path is to the operator, and how they would choose another one."""

    name: str  # "TRIO_JOBS_HOME", "--data-dir", ...
    elsewhere: str  # "set TRIO_JOBS_HOME to another directory"


_HOME: Final = _Role("TRIO_JOBS_HOME", "set TRIO_JOBS_HOME to another directory")
_DATA: Final = _Role("--data-dir", "pass another --data-dir")
_PKI: Final = _Role("--pki", "pass another --pki")


@dataclass(frozen=True)
class _Found:
    """Where a path leads: the final component's physical path and ``lstat`` (None if it does
    not exist; then ``missing`` lists the directories to create for it, outermost first)."""

    path: str
    st: os.stat_result | None
    missing: tuple[str, ...] = ()


@dataclass
class _Plan:
    """Phase one collects what to create and tighten; phase two (:meth:`apply`) does it."""

    euid: int
    create: dict[str, Callable[[str, os.stat_result], None]] = field(default_factory=dict)
    tighten: list[tuple[str, os.stat_result]] = field(default_factory=list)

    # -- the way to a path ---------------------------------------------------------------

    def walk(self, target: StrPath, role: _Role) -> _Found:
        """Resolve ``target`` as the kernel would, checking every directory passed through
        and every symbolic link followed (the last component's too)."""
        text = os.fspath(target)
        if not os.path.isabs(text):
            text = os.path.join(os.getcwd(), text)  # not abspath: it would drop ".." lexically
        todo = list(reversed(Path(text).parts[1:]))
        cur = "/"
        self.check_passage(cur, self.lstat(cur), role, target)
        links = 0
        while todo:
            name = todo.pop()
            if name == "..":
                cur = os.path.dirname(cur)  # cur is physical: its parent passed already
                continue
            path = os.path.join(cur, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                rest = list(reversed(todo))
                if ".." in rest:
                    raise StateDirError(f"{role.name} {_show(target)} goes through the missing "
                                        f"directory {_show(path)} and then '..': give a path "
                                        "without '..'") from None
                missing = [path]
                for part in rest:
                    missing.append(os.path.join(missing[-1], part))
                return _Found(missing[-1], None, tuple(missing))
            except OSError as exc:
                raise StateDirError(f"cannot look at {_show(path)} (on the way to {role.name} "
                                    f"{_show(target)}): {exc.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                if st.st_uid not in (0, self.euid):
                    where = (f"{role.name} {_show(path)}" if path == text else
                             f"{_show(path)} (on the way to {role.name} {_show(target)})")
                    raise StateDirError(
                        f"{where} is a symbolic link owned by {_user(st.st_uid)}, who could "
                        f"point it anywhere: remove it or {role.elsewhere}")
                links += 1
                if links > MAX_SYMLINKS:
                    raise StateDirError(f"{role.name} {_show(target)}: too many levels of "
                                        "symbolic links")
                try:
                    link = os.readlink(path)
                except OSError as exc:
                    raise StateDirError(f"cannot read the symbolic link {_show(path)}: "
                                        f"{exc.strerror}") from None
                if os.path.isabs(link):
                    cur = "/"
                todo.extend(reversed(Path(link).parts[1:] if os.path.isabs(link)
                                     else Path(link).parts))
                continue
            if not todo:
                return _Found(path, st)
            self.check_passage(path, st, role, target)
            cur = path
        return _Found(cur, self.lstat(cur))  # the path ended in ".." or a link to a parent

    def lstat(self, path: str) -> os.stat_result:
        try:
            return os.lstat(path)
        except OSError as exc:
            raise StateDirError(f"cannot look at {_show(path)}: {exc.strerror}") from None

    def check_passage(self, path: str, st: os.stat_result, role: _Role, target: StrPath) -> None:
        """A directory on the way: root's or ours, and nobody else may rename its entries."""
        where = f"(on the way to {role.name} {_show(target)})"
        if not stat.S_ISDIR(st.st_mode):
            raise StateDirError(f"{_show(path)} {where} is not a directory: {role.elsewhere}")
        if st.st_uid not in (0, self.euid):
            raise StateDirError(
                f"{_show(path)} {where} belongs to {_user(st.st_uid)}, who could move what is "
                f"in it away and put their own in its place: use a path whose directories "
                f"belong to root or {_user_name(self.euid)}, or {role.elsewhere}")
        if st.st_mode & _GO_WRITE and not st.st_mode & stat.S_ISVTX:
            raise StateDirError(
                f"{_show(path)} {where} is writable by group/others without the sticky bit "
                f"(mode {stat.S_IMODE(st.st_mode):04o}), so anyone could move what is in it "
                f"away: run `chmod go-w {_show(path)}` (or `chmod +t`), or {role.elsewhere}")

    # -- what we own ---------------------------------------------------------------------

    def check_own(self, path: str, st: os.stat_result, role: _Role, *, directory: bool,
                  key: bool = False, private: bool = False, top: str | None = None) -> None:
        """A directory or file of the state: ours, the right type, nobody else may change
        it; keys unreadable by others; a database only others can read is to be tightened.
        ``top``: the configured directory it is in (for the chown advice)."""
        shown = _show(path)
        if stat.S_ISLNK(st.st_mode):
            raise StateDirError(f"{shown} is a symbolic link; trio-jobs never makes one there, "
                                f"so someone planted it: remove it (and check what else was "
                                f"changed), or {role.elsewhere}")
        kind = "directory" if directory else "regular file"
        if not (stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)):
            raise StateDirError(f"{shown} is not a {kind}: move it aside, or {role.elsewhere}")
        me = _user_name(self.euid)
        if st.st_uid != self.euid:
            chown = f"chown -R {me} {_show(top)}" if top else f"chown {me} {shown}"
            raise StateDirError(
                f"{shown} belongs to {_user(st.st_uid)}, not to {me} who runs this server (its "
                f"keys and records could be theirs): if it really is yours, `{chown}`; "
                f"otherwise move it aside, or {role.elsewhere}")
        if not directory and st.st_nlink != 1:
            raise StateDirError(f"{shown} has {st.st_nlink} hard links, so it may be another "
                                f"file linked here: remove it, or {role.elsewhere}")
        mode = stat.S_IMODE(st.st_mode)
        if mode & _GO_WRITE:
            raise StateDirError(f"{shown} is writable by group/others (mode {mode:04o}): run "
                                f"`chmod go-w {shown}` if nobody changed it, or {role.elsewhere}")
        if key and mode & _GO_ANY:
            raise StateDirError(
                f"{shown} is a private key readable by group/others (mode {mode:04o}), who "
                f"may have copied it: make new keys (`trio-jobs certs init --force`), or, if "
                f"nobody could have read it, `chmod 600 {shown}`")
        if private and mode & _GO_ANY:
            self.tighten.append((path, st))

    def own_dir(self, target: StrPath, role: _Role) -> _Found:
        """A configured directory: its way checked, itself ours (or missing: to create)."""
        found = self.walk(target, role)
        if found.st is None:
            for i, path in enumerate(found.missing):
                last = i == len(found.missing) - 1
                self.create.setdefault(path, self._recheck(role, target, top=last))
        else:
            self.check_own(found.path, found.st, role, directory=True, top=found.path)
        return found

    def entry(self, parent: _Found, name: str, role: _Role, *, directory: bool,
              key: bool = False, private: bool = False) -> _Found:
        """Something ``serve`` keeps in a configured directory (never through a symlink)."""
        path = os.path.join(parent.path, name)
        if parent.st is None:
            st = None
        else:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                raise StateDirError(f"cannot look at {_show(path)}: {exc.strerror}") from None
        if st is None:
            if directory:
                self.create.setdefault(path, self._recheck(role, path, top=True))
            return _Found(path, None)
        self.check_own(path, st, role, directory=directory, key=key, private=private)
        return _Found(path, st)

    def _recheck(self, role: _Role, target: StrPath,
                 *, top: bool) -> Callable[[str, os.stat_result], None]:
        """What a directory someone created between our check and our mkdir must pass."""
        def check(path: str, st: os.stat_result) -> None:
            if top:
                self.check_own(path, st, role, directory=True)
            else:
                self.check_passage(path, st, role, target)
        return check

    # -- operator's TLS files ------------------------------------------------------------

    def tls_file(self, flag: str, target: StrPath, *, key: bool) -> None:
        role = _Role(flag, f"pass another {flag}")
        found = self.walk(target, role)
        if found.st is None:
            return  # loading it says that it does not exist
        st = found.st
        shown = _show(target)
        if found.path != os.fspath(target):
            shown += f" (-> {_show(found.path)})"
        if not stat.S_ISREG(st.st_mode):
            raise StateDirError(f"{flag} {shown} is not a regular file")
        if st.st_uid not in (0, self.euid):
            raise StateDirError(
                f"{flag} {shown} belongs to {_user(st.st_uid)}, who could replace it: use a "
                f"file owned by root or {_user_name(self.euid)}")
        mode = stat.S_IMODE(st.st_mode)
        if mode & _GO_WRITE:
            raise StateDirError(f"{flag} {shown} is writable by group/others (mode {mode:04o}): "
                                f"run `chmod go-w {_show(found.path)}` if nobody changed it")
        if key and mode & stat.S_IRWXO:
            raise StateDirError(
                f"{flag} {shown} is a private key readable by others (mode {mode:04o}), who may "
                f"have copied it: issue a new key, or, if nobody could have read it, "
                f"`chmod o-rwx {_show(found.path)}`")

    # -- phase two -----------------------------------------------------------------------

    def apply(self) -> list[str]:
        for path, recheck in self.create.items():
            try:
                os.mkdir(path, DIR_MODE)
            except FileExistsError:
                recheck(path, self.lstat(path))  # appeared since the check: refused unless ours
                continue
            except OSError as exc:
                raise StateDirError(f"cannot create the directory {_show(path)}: "
                                    f"{exc.strerror}") from None
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    os.fchmod(fd, DIR_MODE)  # mkdir's mode went through the umask; be exact
                finally:
                    os.close(fd)
            except OSError as exc:
                raise StateDirError(f"cannot make {_show(path)} private: {exc.strerror}") from None
        notes = []
        for path, st in self.tighten:
            mode = stat.S_IMODE(st.st_mode) & ~_GO_ANY
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                try:
                    now = os.fstat(fd)
                    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                        raise StateDirError(f"{_show(path)} changed while trio-jobs was checking "
                                            "it: is another program using this directory?")
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
            except FileNotFoundError:
                continue  # a -wal/-shm removed by its last user meanwhile
            except OSError as exc:
                raise StateDirError(f"cannot make {_show(path)} private: {exc.strerror}") from None
            notes.append(f"{_show(path)} was readable by group/others (mode "
                         f"{stat.S_IMODE(st.st_mode):04o}): made it {mode:04o}")
        return notes


def prepare_state(
    *,
    home: StrPath,
    data_dir: StrPath,
    pki_dir: StrPath | None = None,
    cert: StrPath | None = None,
    key: StrPath | None = None,
    ca: StrPath | None = None,
    euid: int | None = None,
) -> list[str]:
    """Check the server's state, then create its missing directories (0700).

    ``home`` is ``TRIO_JOBS_HOME`` (with ``audit.jsonl``); ``data_dir`` holds the database,
    ``lock``, ``output/`` and the other files the worker keeps; ``pki_dir`` the development PKI (None when ``cert``/``key``/``ca``, the
    operator's files, are used instead; those given are checked). ``euid`` defaults to the
    process's. Blocking file-system calls: call it before the event loop or in a thread.

    Returns notes for the operator (private files whose modes were tightened). Raises
    :class:`StateDirError` (one line) before anything was created or changed if a check fails.
    """
    plan = _Plan(os.geteuid() if euid is None else euid)
    home_found = plan.own_dir(home, _HOME)
    same = os.fspath(data_dir) == os.fspath(home)
    role = _HOME if same else _DATA
    data_found = home_found if same else plan.own_dir(data_dir, _DATA)
    plan.entry(data_found, OUTPUT_DIR, role, directory=True)
    for name in DB_FILES:
        plan.entry(data_found, name, role, directory=False, private=True)
    plan.entry(data_found, LOCK_NAME, role, directory=False)
    plan.entry(data_found, DYNAMIC_USERS_NAME, role, directory=False, private=True)
    plan.entry(data_found, FINALS_NAME, role, directory=False, private=True)
    plan.entry(home_found, AUDIT_NAME, _HOME, directory=False, private=True)  # unless --audit-log
    if pki_dir is not None:
        if Path(pki_dir) == Path(home) / PKI_DIR:
            pki_found = plan.entry(home_found, PKI_DIR, _HOME, directory=True)
            pki_role = _HOME
        else:
            pki_found = plan.own_dir(pki_dir, _PKI)
            pki_role = _PKI
        for stem in (CA_STEM, SERVER_STEM, *DEV_IDENTITIES):
            plan.entry(pki_found, f"{stem}.crt", pki_role, directory=False)
            plan.entry(pki_found, f"{stem}.key", pki_role, directory=False, key=True)
    for flag, path, is_key in (("--cert", cert, False), ("--key", key, True), ("--ca", ca, False)):
        if path is not None:
            plan.tls_file(flag, path, key=is_key)
    return plan.apply()


__all__ = [
    "AUDIT_NAME",
    "DB_FILES",
    "DB_NAME",
    "DYNAMIC_USERS_NAME",
    "FINALS_NAME",
    "LOCK_NAME",
    "OUTPUT_DIR",
    "PKI_DIR",
    "StateDirError",
    "prepare_state",
]
