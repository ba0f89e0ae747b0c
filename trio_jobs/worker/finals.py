"""The final records a full disk kept out of the database, in space reserved beforehand.

Why. A job's final record (state, exit code, usage, end time) is an UPDATE of its RUNNING
row. SQLite needs free disk space for it: WAL frames are appended, a page may split, the
end-time index gets an entry. On a full disk the UPDATE fails; the worker then keeps the
status in memory and retries (before each start, after each retention pass, at shutdown),
but a crash -- or a shutdown while the disk is still full -- would turn the job into LOST
at the next start: the record of a job that ended would be lost.

How. :class:`FinalJournal` is a file of ``SLOTS`` fixed-size slots, written full of zeros
when the worker opens (real writes, not ``fallocate``: the blocks then exist, and
overwriting an allocated block of a regular file needs no new space on ext4, xfs or tmpfs).
A final record the database refuses is written into the next free slot (``pwrite`` +
``fdatasync``, no size change). The next :class:`~trio_jobs.worker.store.JobStore` open
replays the slots into the database (only onto rows that are still RUNNING, so replaying
twice, or a record saved meanwhile, changes nothing) before anything is marked LOST, and
zeroes them. At run time, once every unsaved record has reached the database, the slots in
use are zeroed too (again in place).

Limits, stated: ``SLOTS`` (1024) final records can wait here at once; past that a record
is only in memory (logged as an error). A copy-on-write file system (btrfs, zfs) may need
new blocks even to overwrite, so there the reserve is best effort. A slot is protected by a
CRC32, so a torn write (power loss) is skipped, never misread.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import zlib
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final, final

from .errors import WorkerError

if TYPE_CHECKING:
    from pathlib import Path

    from .spec import JobStatus

FILE_NAME: Final = "final-records"
SLOT_SIZE: Final = 512
SLOTS: Final = 1024
_MAGIC: Final = b"TJF1"
_HEAD: Final = struct.Struct("<4sIH")  # magic, crc32 of the payload, payload length
_MAX_PAYLOAD: Final = SLOT_SIZE - _HEAD.size

END_COLUMNS: Final = (
    "state", "exit_code", "signal", "stopped_by_user", "oom_killed", "stopped_by_shutdown",
    "ended_at", "usage", "output_bytes", "output_truncated",
)
"""The columns a job's end changes (everything else was written by its start)."""


def end_row(status: JobStatus) -> tuple[Any, ...]:
    """The values of ``END_COLUMNS`` for ``status``, as the store writes them."""
    return (
        status.state.value, status.exit_code, status.signal, int(status.stopped_by_user),
        int(status.oom_killed), int(status.stopped_by_shutdown),
        status.ended_at.isoformat() if status.ended_at else None,
        json.dumps(asdict(status.usage)), status.output_bytes, int(status.output_truncated),
    )


def encode(status: JobStatus) -> bytes | None:
    """One slot holding the end of ``status``; None if it does not fit (it always does:
    ~300 bytes with 19-digit numbers)."""
    payload = json.dumps([status.job_id, *end_row(status)], separators=(",", ":")).encode()
    if len(payload) > _MAX_PAYLOAD:
        return None
    head = _HEAD.pack(_MAGIC, zlib.crc32(payload), len(payload))
    return (head + payload).ljust(SLOT_SIZE, b"\0")


def decode(slot: bytes) -> tuple[str, tuple[Any, ...]] | None:
    """(job id, end row) of a slot written by :func:`encode`; None for an empty, torn or
    foreign one."""
    if len(slot) < _HEAD.size:
        return None
    magic, crc, length = _HEAD.unpack_from(slot)
    payload = slot[_HEAD.size : _HEAD.size + length]
    if magic != _MAGIC or length > _MAX_PAYLOAD or zlib.crc32(payload) != crc:
        return None
    try:
        values = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(values, list) or len(values) != 1 + len(END_COLUMNS) or not isinstance(values[0], str):
        return None
    return values[0], tuple(values[1:])


@final
class FinalJournal:
    """The reserved slots (see the module doc). Not thread-safe: the store calls it under
    its lock. Open with :meth:`open_blocking`."""

    def __init__(self, fd: int, path: Path, ids: list[str]) -> None:
        self._fd = fd
        self.path = path
        self._ids = ids  # the job of each slot in use; slots [len(ids), SLOTS) are zero

    @classmethod
    def open_blocking(cls, path: Path) -> tuple[FinalJournal, list[tuple[str, tuple[Any, ...]]]]:
        """Open (creating it full of zeros if missing or of another size) and return the
        journal and the records it holds. WorkerError with one clear line on failure (e.g.
        no space to create it)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise WorkerError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise WorkerError(f"{path} is not a regular file; move it aside")
            size = SLOTS * SLOT_SIZE
            records: list[tuple[str, tuple[Any, ...]]] = []
            ids: list[str] = []
            if info.st_size == size:
                data = os.pread(fd, size, 0)
                for i in range(SLOTS):
                    record = decode(data[i * SLOT_SIZE : (i + 1) * SLOT_SIZE])
                    if record is not None:
                        records.append(record)
                        ids[len(ids):] = [""] * (i - len(ids)) + [record[0]]
            else:  # new (or damaged): reserve the space now, while there is some
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, bytes(size), 0)
                    os.fsync(fd)
                except OSError as exc:
                    raise WorkerError(f"cannot reserve {size} bytes for final records in {path}: "
                                      f"{exc.strerror}; free some space in the data directory") from exc
            return cls(fd, path, ids), records
        except BaseException:
            os.close(fd)
            raise

    @property
    def used(self) -> int:
        """Slots that may hold a record (0 once cleared)."""
        return len(self._ids)

    @property
    def job_ids(self) -> list[str]:
        """The jobs whose final records the slots in use hold ("" for a torn slot)."""
        return list(self._ids)

    def append_blocking(self, status: JobStatus) -> bool:
        """Keep ``status``'s end in the next free slot, durably. False (nothing written) if
        every slot is taken; OSError if the write fails."""
        slot = encode(status)
        if slot is None or len(self._ids) >= SLOTS:
            return False
        os.pwrite(self._fd, slot, len(self._ids) * SLOT_SIZE)
        os.fdatasync(self._fd)
        self._ids.append(status.job_id)
        return True

    def clear_blocking(self) -> None:
        """Zero the slots in use, in place (their records are in the database now)."""
        if self._ids:
            os.pwrite(self._fd, bytes(len(self._ids) * SLOT_SIZE), 0)
            os.fdatasync(self._fd)
            self._ids = []

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)
