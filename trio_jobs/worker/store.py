"""Job records in SQLite (stdlib ``sqlite3``), kept off the event loop.

One connection, used by one thread at a time: every operation holds a ``threading.Lock``
while it runs, in a worker thread -- either its own ``trio.to_thread`` call (the async
methods) or the job start's one thread call (``insert_blocking``, see ``launch.py``), so calls
are serialised and the loop never waits on the disk. Thread hops are not cancellable (the
statement completes), so a record is never half written.
The database is in WAL mode; ``synchronous=NORMAL`` is durable against a process crash
(what LOST recovery needs), not necessarily against power loss.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import trio

from .errors import WorkerClosed, WorkerError
from .leftovers import START_CLOCK
from .limits import Limits, Usage
from .spec import JobState, JobStatus

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
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
-- covering indexes: listing ids (start order, all or one owner's) reads no table rows
CREATE INDEX IF NOT EXISTS jobs_seq_id ON jobs (seq, job_id);
CREATE INDEX IF NOT EXISTS jobs_owner_id ON jobs (owner, seq, job_id);
DROP INDEX IF EXISTS jobs_owner;
"""
COLUMNS: Final = (
    "job_id", "owner", "command", "args", "state", "exit_code", "signal", "stopped_by_user",
    "oom_killed", "stopped_by_shutdown", "created_at", "ended_at", "limits", "usage",
    "output_bytes", "output_truncated",
)
_INSERT: Final = (f"INSERT INTO jobs ({', '.join((*COLUMNS, 'pid', 'pid_start'))}) "
                  f"VALUES ({', '.join('?' * (len(COLUMNS) + 2))})")
_UPDATE: Final = f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in COLUMNS[1:])} WHERE job_id = ?"
_IN_BATCH: Final = 500  # ids per "IN (...)": under SQLite's oldest variable limit (999)


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
        self._lock = threading.Lock()  # held by the thread that uses the connection
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

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the connection; blocking (call it in a worker thread)."""
        with self._lock:
            if self._closed:
                raise WorkerClosed("the worker is closed")
            try:
                return fn(self._conn)
            except sqlite3.Error as exc:
                raise WorkerError(f"job store error: {exc}") from exc

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await trio.to_thread.run_sync(self._call, fn)

    @property
    def closed(self) -> bool:
        return self._closed

    def insert_blocking(
        self, status: JobStatus, *, pid: int | None = None, forked: tuple[int, int] = (0, -1)
    ) -> None:
        """Add a new record; ``pid``: the job's main process (its start time is noted too,
        so that a later run can kill what an unclean stop left, see ``leftovers``), forked
        between ``boot_ticks()`` readings ``forked`` if they are known.

        Blocking: for a worker thread (the job start's, see ``launch.py``)."""
        row = _to_row(status)
        started = None if pid is None else START_CLOCK.of(pid, *forked)

        def insert(c: sqlite3.Connection) -> None:
            c.execute(_INSERT, (*row, pid if started is not None else None, started))

        self._call(insert)

    async def insert(self, status: JobStatus, *, pid: int | None = None) -> None:
        """:meth:`insert_blocking` in a thread of its own."""
        await trio.to_thread.run_sync(lambda: self.insert_blocking(status, pid=pid))

    async def running_processes(self) -> list[tuple[str, int, int]]:
        """(job id, main pid, its start time) of every RUNNING record that has them."""
        def select(c: sqlite3.Connection) -> list[tuple[str, int, int]]:
            rows = c.execute("SELECT job_id, pid, pid_start FROM jobs WHERE state = ? AND pid "
                             "IS NOT NULL AND pid_start IS NOT NULL ORDER BY seq",
                             (JobState.RUNNING.value,)).fetchall()
            return [(r["job_id"], r["pid"], r["pid_start"]) for r in rows]

        return await self._run(select)

    def update_blocking(self, status: JobStatus) -> None:
        """Rewrite a record (e.g. the final status); blocking, for a worker thread."""
        row = _to_row(status)
        self._call(lambda c: c.execute(_UPDATE, (*row[1:], row[0])))

    async def update(self, status: JobStatus) -> None:
        """:meth:`update_blocking` in a thread of its own."""
        await trio.to_thread.run_sync(self.update_blocking, status)

    async def get(self, job_id: str) -> JobStatus | None:
        def get(c: sqlite3.Connection) -> JobStatus | None:
            row = c.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return None if row is None else _from_row(row)

        return await self._run(get)

    async def job_page(self, owner: str | None, after: int, limit: int) -> list[tuple[int, str]]:
        """(seq, id) of at most ``limit`` records (of ``owner``, or all) with ``seq > after``,
        in insertion order: one index range scan, whatever the size of the history."""
        def select(c: sqlite3.Connection) -> list[tuple[int, str]]:
            cur = c.cursor()
            cur.row_factory = None
            if owner is None:
                cur.execute("SELECT seq, job_id FROM jobs WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit))
            else:
                cur.execute("SELECT seq, job_id FROM jobs WHERE owner = ? AND seq > ? ORDER BY seq LIMIT ?",
                            (owner, after, limit))
            return cur.fetchall()

        return await self._run(select)

    async def get_many(self, job_ids: Sequence[str]) -> dict[str, JobStatus]:
        """The records of these ids (ids without one are left out), in one thread call."""
        def select(c: sqlite3.Connection) -> dict[str, JobStatus]:
            found: dict[str, JobStatus] = {}
            for i in range(0, len(job_ids), _IN_BATCH):
                batch = job_ids[i:i + _IN_BATCH]
                marks = ", ".join("?" * len(batch))
                for row in c.execute(f"SELECT * FROM jobs WHERE job_id IN ({marks})", batch):
                    found[row["job_id"]] = _from_row(row)
            return found

        if not job_ids:
            await trio.lowlevel.checkpoint()
            return {}
        return await self._run(select)

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

        def close() -> None:
            with self._lock:
                if not self._closed:
                    self._closed = True
                    self._conn.close()

        with trio.CancelScope(shield=True):  # closing is quick and must happen
            await trio.to_thread.run_sync(close)
