"""Job records in SQLite (stdlib ``sqlite3``), kept off the event loop.

One connection, used by one thread at a time: every operation runs in ``trio.to_thread``
while holding a ``trio.Lock``, so calls are serialised and the loop never waits on the disk.
Thread hops are not cancellable (the statement completes), so a record is never half written.
The database is in WAL mode; ``synchronous=NORMAL`` is durable against a process crash
(what LOST recovery needs), not necessarily against power loss.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import trio

from .errors import WorkerClosed, WorkerError
from .leftovers import start_time
from .limits import Limits, Usage
from .spec import JobState, JobStatus

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL UNIQUE,
    owner TEXT NOT NULL,
    command TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    signal INTEGER,
    stopped_by_user INTEGER NOT NULL,
    oom_killed INTEGER NOT NULL,
    stopped_by_shutdown INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    ended_at TEXT,
    limits TEXT NOT NULL,
    usage TEXT NOT NULL,
    output_bytes INTEGER NOT NULL,
    output_truncated INTEGER NOT NULL,
    pid INTEGER,
    pid_start INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner, seq);
"""
COLUMNS: Final = (
    "job_id", "owner", "command", "args", "state", "exit_code", "signal", "stopped_by_user",
    "oom_killed", "stopped_by_shutdown", "created_at", "ended_at", "limits", "usage",
    "output_bytes", "output_truncated",
)


T = TypeVar("T")


def _to_row(s: JobStatus) -> tuple[Any, ...]:
    return (
        s.job_id, s.owner, s.command, json.dumps(list(s.args)), s.state.value, s.exit_code,
        s.signal, int(s.stopped_by_user), int(s.oom_killed), int(s.stopped_by_shutdown),
        s.created_at.isoformat(), s.ended_at.isoformat() if s.ended_at else None,
        json.dumps(asdict(s.limits)), json.dumps(asdict(s.usage)), s.output_bytes,
        int(s.output_truncated),
    )


def _from_row(row: sqlite3.Row) -> JobStatus:
    return JobStatus(
        job_id=row["job_id"], owner=row["owner"], command=row["command"],
        args=tuple(json.loads(row["args"])), state=JobState(row["state"]),
        exit_code=row["exit_code"], signal=row["signal"],
        stopped_by_user=bool(row["stopped_by_user"]), oom_killed=bool(row["oom_killed"]),
        stopped_by_shutdown=bool(row["stopped_by_shutdown"]),
        created_at=datetime.fromisoformat(row["created_at"]),
        ended_at=datetime.fromisoformat(row["ended_at"]) if row["ended_at"] else None,
        limits=Limits(**json.loads(row["limits"])), usage=Usage(**json.loads(row["usage"])),
        output_bytes=row["output_bytes"], output_truncated=bool(row["output_truncated"]),
    )


# SQLite primary result codes (sqlite3.h) that deserve an explanation at start-up.
_BUSY: Final = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
_DAMAGED: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
_FULL: Final = 13  # SQLITE_FULL
_READONLY: Final = 8  # SQLITE_READONLY


def _open_error(path: Path, exc: sqlite3.Error) -> str:
    """One clear line saying what is wrong with the database and what to do about it."""
    code = getattr(exc, "sqlite_errorcode", -1) & 0xFF
    if code in _BUSY:
        return (f"the job database {path} is locked by another process ({exc}); is another "
                "trio-jobs server using this data directory?")
    if code in _DAMAGED:
        return (f"the job database {path} is damaged ({exc}); move it aside (with its -wal and "
                "-shm files) to start with an empty job history, or restore a backup")
    if code == _FULL:
        return f"cannot open the job database {path}: the disk is full ({exc})"
    if code == _READONLY:
        return f"cannot open the job database {path}: it is read-only ({exc})"
    return f"cannot open the job database {path}: {exc}"


def utcnow() -> datetime:
    return datetime.now(UTC)


@final
class JobStore:
    """Persistent job records. Open with :meth:`open`, close with :meth:`aclose`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = trio.Lock()
        self._closed = False

    @classmethod
    async def open(cls, path: Path) -> JobStore:
        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            try:
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA busy_timeout=5000")
                conn.executescript(SCHEMA)
                have = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
                for column in ("pid", "pid_start"):  # added after the first release
                    if column not in have:
                        conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} INTEGER")
                # Prove we can write now (a locked or read-only database fails here, at start,
                # not at the first job): take the write lock, waiting up to busy_timeout.
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("COMMIT")
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await trio.to_thread.run_sync(connect)
        except sqlite3.Error as exc:
            raise WorkerError(_open_error(path, exc)) from exc
        return cls(conn)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        async with self._lock:
            if self._closed:
                raise WorkerClosed("the worker is closed")
            try:
                return await trio.to_thread.run_sync(fn, self._conn)
            except sqlite3.Error as exc:
                raise WorkerError(f"job store error: {exc}") from exc

    @property
    def closed(self) -> bool:
        return self._closed

    async def insert(self, status: JobStatus, *, pid: int | None = None) -> None:
        """Add a new record; ``pid``: the job's main process (its start time is noted too,
        so that a later run can kill what an unclean stop left, see ``leftovers``)."""
        columns = (*COLUMNS, "pid", "pid_start")
        marks = ", ".join("?" * len(columns))
        sql = f"INSERT INTO jobs ({', '.join(columns)}) VALUES ({marks})"
        row = _to_row(status)

        def insert(c: sqlite3.Connection) -> None:
            started = None if pid is None else start_time(pid)
            c.execute(sql, (*row, pid if started is not None else None, started))

        await self._run(insert)

    async def running_processes(self) -> list[tuple[str, int, int]]:
        """(job id, main pid, its start time) of every RUNNING record that has them."""
        def select(c: sqlite3.Connection) -> list[tuple[str, int, int]]:
            rows = c.execute("SELECT job_id, pid, pid_start FROM jobs WHERE state = ? AND pid "
                             "IS NOT NULL AND pid_start IS NOT NULL ORDER BY seq",
                             (JobState.RUNNING.value,)).fetchall()
            return [(r["job_id"], r["pid"], r["pid_start"]) for r in rows]

        return await self._run(select)

    async def update(self, status: JobStatus) -> None:
        sets = ", ".join(f"{c} = ?" for c in COLUMNS[1:])
        row = _to_row(status)
        await self._run(lambda c: c.execute(f"UPDATE jobs SET {sets} WHERE job_id = ?",
                                            (*row[1:], row[0])))

    async def get(self, job_id: str) -> JobStatus | None:
        def get(c: sqlite3.Connection) -> JobStatus | None:
            row = c.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return None if row is None else _from_row(row)

        return await self._run(get)

    async def list(self, owner: str | None = None) -> list[JobStatus]:
        def select(c: sqlite3.Connection) -> list[JobStatus]:
            if owner is None:
                rows = c.execute("SELECT * FROM jobs ORDER BY seq").fetchall()
            else:
                rows = c.execute("SELECT * FROM jobs WHERE owner = ? ORDER BY seq",
                                 (owner,)).fetchall()
            return [_from_row(r) for r in rows]

        return await self._run(select)

    async def aclose(self) -> None:
        """Close the database. Idempotent; waits for a running statement to finish."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        with trio.CancelScope(shield=True):  # closing is quick and must happen
            async with self._lock:
                self._closed = True
                await trio.to_thread.run_sync(self._conn.close)
