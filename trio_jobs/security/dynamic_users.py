"""A Unix user of its own for each identity, allocated on first use (like systemd's ``DynamicUser=``).

Why: two identities that share a Unix user (``nobody``, say) can signal, ptrace and read the
environment of each other's jobs: the kernel knows users, not certificates. So on a root
server each non-admin identity whose policy names no ``run_as`` user runs its jobs as a uid/gid
pair of its own, from a reserved range that no account uses (DESIGN §3).

- The range (:data:`UID_RANGE`) lies above systemd's container ranges (524288-1879048191) and
  below 2^31, so no signed 32-bit uid in any tool overflows; it holds 65536 ids.
- An identity's id is the first free one from a hash of its name (so a lost file usually gives
  the same ids again), and is stored in a small JSON file in the state directory, so it is
  stable across restarts whatever accounts are created meanwhile: files a job left in ``/tmp``
  stay its own.
- "Free" means: no account (``getpwuid``), no group (``getgrgid``) and no other identity has it.
- The user has no passwd entry (``id -un`` says so), no home (``HOME=/``) and only its own group.

The file is written atomically (a new file, fsync, rename), 0600; it is read once at start.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, final

from trio_jobs.security.errors import PkiError, PolicyError
from trio_jobs.security.pki import write_file_atomic

if TYPE_CHECKING:
    from pathlib import Path

UID_RANGE: Final = range(0x7A6A0000, 0x7A6A0000 + 0x10000)
FILE_NAME: Final = "dynamic-users.json"


@dataclass(frozen=True, kw_only=True)
class DynamicUser:
    identity: str
    uid: int  # == gid

    @property
    def name(self) -> str:
        """Shown in messages and as the job's USER/LOGNAME."""
        return f"trio-jobs-{self.uid - UID_RANGE.start}"


def _taken_by_host(uid: int) -> bool:
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
        except KeyError:
            continue
        return True
    return False


def _first_choice(identity: str) -> int:
    """Where the search for the identity's id starts (stable: a hash of the name)."""
    return int.from_bytes(hashlib.sha256(identity.encode("utf-8", "surrogateescape")).digest()[:8])


@final
class DynamicUsers:
    """identity -> :class:`DynamicUser`, persisted in ``path`` (None: in memory only, for
    embedding and tests). Thread-safe: starts look users up from worker threads."""

    def __init__(self, path: Path | None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._users: dict[str, int] = self._load() if path is not None else {}

    def _load(self) -> dict[str, int]:
        assert self._path is not None
        try:
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise PolicyError(f"cannot read {self._path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw)
            users = data["users"]
            if not isinstance(users, dict) or not all(
                isinstance(k, str) and type(v) is int and v in UID_RANGE for k, v in users.items()
            ):
                raise ValueError("users must map identities to ids of the reserved range")
            if len(set(users.values())) != len(users):
                raise ValueError("two identities share an id")
        except (ValueError, KeyError, TypeError) as exc:
            raise PolicyError(
                f"{self._path} is damaged ({exc}); restore it from a backup (removing it gives "
                "identities new ids, and their old files other owners)"
            ) from None
        return dict(users)

    def get(self, identity: str) -> DynamicUser:
        """The identity's user, allocated (and saved) on first use. Raises PolicyError when
        the range is full or the file cannot be written."""
        with self._lock:
            uid = self._users.get(identity)
            if uid is None:
                uid = self._allocate(identity)
                users = {**self._users, identity: uid}
                self._save(users)
                self._users = users
        return DynamicUser(identity=identity, uid=uid)

    def _allocate(self, identity: str) -> int:
        used = set(self._users.values())
        size = len(UID_RANGE)
        start = _first_choice(identity) % size
        for step in range(size):
            uid = UID_RANGE.start + (start + step) % size
            if uid not in used and not _taken_by_host(uid):
                return uid
        raise PolicyError(f"no free id left for identity {identity!r} in {UID_RANGE}")

    def _save(self, users: dict[str, int]) -> None:
        if self._path is None:
            return
        data = json.dumps({"version": 1, "users": users}, indent=1, sort_keys=True).encode()
        try:
            write_file_atomic(self._path, data, mode=0o600, force=True)
        except PkiError as exc:
            raise PolicyError(f"cannot save the dynamic users: {exc}") from None
