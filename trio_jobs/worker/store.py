"""Job records in SQLite (stdlib ``sqlite3``), kept off the event loop.

One connection, used by one thread at a time: every operation holds a ``threading.Lock``
while it runs, in a worker thread -- either its own ``trio.to_thread`` call (the async
methods) or the job start's one thread call (``insert_blocking``, see ``launch.py``), so calls
are serialised and the loop never waits on the disk. Thread hops are not cancellable (the
statement completes), so a record is never half written.
The database is in WAL mode; ``synchronous=NORMAL`` is durable against a process crash
(what LOST recovery needs), not necessarily against power loss.

Schema versions (``PRAGMA user_version``): 0 is the first release's (the table and the
listing indexes); 1 adds what keeps a restart and retention independent of the history's
length: a partial index of the RUNNING rows (a restart reads only those), a partial index
of the ended rows by end time (oldest-first deletion), and ``ended_totals``, the count and
output bytes of the ended jobs, kept exact by triggers in the same transactions as the rows
(retention reads one row instead of summing the history). :func:`_migrate` upgrades an older
database in one transaction when it is opened.

A final record the database refuses (a full disk) goes to the reserved slots of
``finals.FinalJournal`` instead (:meth:`JobStore.finalize_blocking`); :meth:`JobStore.open`
replays them before the worker marks anything LOST.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar, final

import trio

from .errors import WorkerClosed, WorkerError
from .finals import END_COLUMNS, FILE_NAME, FinalJournal, end_row
from .leftovers import START_CLOCK
from .limits import Limits, Usage
from .spec import JobState, JobStatus

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from pathlib import Path

log = logging.getLogger("trio_jobs.worker")

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
_REPLAY: Final = (f"UPDATE jobs SET {', '.join(f'{c} = ?' for c in END_COLUMNS)} "
                  "WHERE job_id = ? AND state = 'RUNNING'")

SCHEMA_VERSION: Final = 1
_ENDED: Final = "state != 'RUNNING'"
_MIGRATIONS: Final = {
    1: f"""
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (seq) WHERE state = 'RUNNING';
-- oldest ended first; covering what retention reads (seq is the rowid)
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs (ended_at, seq, job_id, output_bytes) WHERE {_ENDED};
CREATE TABLE IF NOT EXISTS ended_totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    jobs INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
DELETE FROM ended_totals;
INSERT INTO ended_totals
    SELECT 0, COUNT(*), COALESCE(SUM(output_bytes), 0) FROM jobs WHERE {_ENDED};
CREATE TRIGGER IF NOT EXISTS ended_totals_insert AFTER INSERT ON jobs WHEN NEW.{_ENDED}
BEGIN
    UPDATE ended_totals SET jobs = jobs + 1, bytes = bytes + NEW.output_bytes;
END;
CREATE TRIGGER IF NOT EXISTS ended_totals_update AFTER UPDATE ON jobs
WHEN OLD.{_ENDED} OR NEW.{_ENDED}
BEGIN
    UPDATE ended_totals SET
        jobs = jobs + (NEW.{_ENDED}) - (OLD.{_ENDED}),
        bytes = bytes + (CASE WHEN NEW.{_ENDED} THEN NEW.output_bytes ELSE 0 END)
                      - (CASE WHEN OLD.{_ENDED} THEN OLD.output_bytes ELSE 0 END);
END;
CREATE TRIGGER IF NOT EXISTS ended_totals_delete AFTER DELETE ON jobs WHEN OLD.{_ENDED}
BEGIN
    UPDATE ended_totals SET jobs = jobs - 1, bytes = bytes - OLD.output_bytes;
END;
""",
}
"""Version -> the script that brings version - 1 to it (run in one transaction)."""


T = TypeVar("T")


def _to_row(s: JobStatus) -> tuple[Any, ...]:
    """The values of COLUMNS; the end columns exactly as a final record's slot holds them
    (``finals.end_row``, one formatter for both)."""
    values = dict(zip(END_COLUMNS, end_row(s), strict=True))
    values.update(job_id=s.job_id, owner=s.owner, command=s.command, args=json.dumps(list(s.args)),
                  created_at=s.created_at.isoformat(), limits=json.dumps(asdict(s.limits)))
    return tuple(values[c] for c in COLUMNS)


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


def _create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it: SQLite gives its -wal and -shm
    files the database's mode, and the umask is not ours to change (jobs inherit it).
    ``O_NOFOLLOW``: a symlink planted in the data directory is refused, never followed."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise WorkerError(f"cannot open the job database {path}: {exc.strerror}") from exc


def utcnow() -> datetime:
    return datetime.now(UTC)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to ``SCHEMA_VERSION``, one transaction per step (a failed step
    leaves the database at the version before it)."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    for target in range(version + 1, SCHEMA_VERSION + 1):
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{_MIGRATIONS[target]}\n"
                               f"PRAGMA user_version = {target};\nCOMMIT;")
        except BaseException:
            if conn.in_transaction:
                conn.rollback()
            raise


def _replay_finals(conn: sqlite3.Connection, records: list[tuple[str, tuple[Any, ...]]]) -> int:
    """Write the final records a full disk kept in the journal (rows still RUNNING only)."""
    if not records:
        return 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        applied = sum(conn.execute(_REPLAY, (*row, job_id)).rowcount for job_id, row in records)
        conn.execute("COMMIT")
    except BaseException:
        conn.rollback()
        raise
    return applied


@final
class JobStore:
    """Persistent job records. Open with :meth:`open`, close with :meth:`aclose`."""

    def __init__(self, conn: sqlite3.Connection, finals: FinalJournal | None = None) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # held by the thread that uses the connection
        self._closed = False
        self._finals = finals  # where a final record goes when the database refuses it

    @classmethod
    async def open(cls, path: Path, *, finals: Path | None = None) -> JobStore:
        """Open (creating, or upgrading an older schema) the database at ``path`` and the
        final-record journal at ``finals`` (default: ``final-records`` beside it), whose
        records are written to the database first. WorkerError with one clear line."""
        finals_path = path.parent / FILE_NAME if finals is None else finals

        def connect() -> tuple[sqlite3.Connection, FinalJournal]:
            _create_private(path)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            journal: FinalJournal | None = None
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
                _migrate(conn)
                journal, records = FinalJournal.open_blocking(finals_path)
                applied = _replay_finals(conn, records)
                if records:
                    log.warning("wrote %d final record(s) kept in %s while the disk was full",
                                applied, finals_path)
                    journal.clear_blocking()
                # Prove we can write now (a locked or read-only database fails here, at start,
                # not at the first job): take the write lock, waiting up to busy_timeout.
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("COMMIT")
            except BaseException:
                if journal is not None:
                    journal.close()
                conn.close()
                raise
            return conn, journal

        try:
            conn, journal = await trio.to_thread.run_sync(connect)
        except sqlite3.Error as exc:
            raise WorkerError(_open_error(path, exc)) from exc
        except OSError as exc:
            raise WorkerError(f"cannot clear {finals_path}: {exc.strerror}") from exc
        return cls(conn, journal)

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

    def insert_many_blocking(self, statuses: Iterable[JobStatus]) -> None:
        """Add many records in one transaction (an import, a benchmark's history); blocking."""
        def insert(c: sqlite3.Connection) -> None:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany(_INSERT, ((*_to_row(s), None, None) for s in statuses))
                c.execute("COMMIT")
            except BaseException:
                c.rollback()
                raise

        self._call(insert)

    async def running_records(self) -> list[JobStatus]:
        """The records still RUNNING (at open: the jobs a stopped server left), in start
        order. One scan of a partial index: the cost does not grow with the history."""
        def select(c: sqlite3.Connection) -> list[JobStatus]:
            return [_from_row(r) for r in
                    c.execute("SELECT * FROM jobs WHERE state = 'RUNNING' ORDER BY seq")]

        return await self._run(select)

    async def running_processes(self) -> list[tuple[str, int, int]]:
        """(job id, main pid, its start time) of every RUNNING record that has them."""
        def select(c: sqlite3.Connection) -> list[tuple[str, int, int]]:
            rows = c.execute("SELECT job_id, pid, pid_start FROM jobs WHERE state = 'RUNNING' "
                             "AND pid IS NOT NULL AND pid_start IS NOT NULL ORDER BY seq").fetchall()
            return [(r["job_id"], r["pid"], r["pid_start"]) for r in rows]

        return await self._run(select)

    def update_blocking(self, status: JobStatus) -> None:
        """Rewrite a record (e.g. the final status); blocking, for a worker thread."""
        row = _to_row(status)
        self._call(lambda c: c.execute(_UPDATE, (*row[1:], row[0])))

    async def update(self, status: JobStatus) -> None:
        """:meth:`update_blocking` in a thread of its own."""
        await trio.to_thread.run_sync(self.update_blocking, status)

    def finalize_blocking(self, status: JobStatus) -> bool:
        """Write a job's final record; blocking, for the job's end thread. True once it is
        in the database. If the database refuses it (a full disk, an I/O error), the end is
        kept in the reserved slots of the final-record journal, which the next open replays
        (see ``finals``), and False says that the caller should keep the status and retry
        :meth:`update` later. Logs what failed. WorkerClosed if the store is closed."""
        row = _to_row(status)
        with self._lock:
            if self._closed:
                raise WorkerClosed("the worker is closed")
            try:
                self._conn.execute(_UPDATE, (*row[1:], row[0]))
                return True
            except sqlite3.Error as exc:
                error = exc
            if self._conn.in_transaction:  # SQLite may leave it open after SQLITE_FULL
                with contextlib.suppress(sqlite3.Error):
                    self._conn.rollback()
            kept = "in memory only (the final-record journal is full)"
            try:
                if self._finals is not None and self._finals.append_blocking(status):
                    kept = f"in the space reserved in {self._finals.path}"
            except OSError as exc:
                kept = f"in memory only (cannot write {self._finals.path if self._finals else ''}: {exc})"
        log.error("job %s: cannot store the final status (%s); kept %s, stored later",
                  status.job_id, error, kept)
        return False

    async def clear_finals(self) -> bool:
        """Zero the final-record journal's slots if every record they hold is in the
        database now (no row of theirs is still RUNNING). Checked here, under the store's
        lock, rather than trusted from the caller: a job's end may be journaling a record
        at this very moment. True if the journal is empty afterwards."""
        def clear(c: sqlite3.Connection) -> bool:
            journal = self._finals
            if journal is None or not journal.used:
                return True
            ids = [i for i in journal.job_ids if i]
            for i in range(0, len(ids), _IN_BATCH):
                batch = ids[i:i + _IN_BATCH]
                marks = ", ".join("?" * len(batch))
                if c.execute(f"SELECT 1 FROM jobs WHERE job_id IN ({marks}) AND state = 'RUNNING' "
                             "LIMIT 1", batch).fetchone():
                    return False
            try:
                journal.clear_blocking()
            except OSError as exc:  # harmless: a replay changes nothing; retried next time
                log.warning("cannot clear %s: %s", journal.path, exc)
                return False
            return True

        return await self._run(clear)

    @property
    def finals_pending(self) -> int:
        """Slots of the final-record journal in use (0 when nothing waits there)."""
        return 0 if self._finals is None else self._finals.used

    def ended_oldest_blocking(self, limit: int) -> tuple[tuple[int, int], list[tuple[int, str, str | None, int]]]:
        """((ended jobs, their output bytes), the ``limit`` oldest ended records as
        (seq, job id, ended_at, output bytes), oldest end first). Two index reads, whatever
        the size of the history; blocking (retention's thread)."""
        def select(c: sqlite3.Connection) -> tuple[tuple[int, int], list[tuple[int, str, str | None, int]]]:
            cur = c.cursor()
            cur.row_factory = None
            totals = cur.execute("SELECT jobs, bytes FROM ended_totals").fetchone()
            rows = cur.execute(f"SELECT seq, job_id, ended_at, output_bytes FROM jobs WHERE {_ENDED} "
                               "ORDER BY ended_at, seq LIMIT ?", (limit,)).fetchall()
            return (totals[0], totals[1]) if totals else (0, 0), rows

        return self._call(select)

    def delete_blocking(self, seqs: Sequence[int]) -> int:
        """Delete these records if they have ended (a RUNNING one is never deleted); how
        many were. One statement (one transaction) per ``_IN_BATCH``; blocking."""
        def delete(c: sqlite3.Connection) -> int:
            done = 0
            for i in range(0, len(seqs), _IN_BATCH):
                batch = seqs[i:i + _IN_BATCH]
                marks = ", ".join("?" * len(batch))
                done += c.execute(f"DELETE FROM jobs WHERE seq IN ({marks}) AND {_ENDED}", batch).rowcount
            return done

        return self._call(delete) if seqs else 0

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
                    if self._finals is not None:
                        self._finals.close()

        with trio.CancelScope(shield=True):  # closing is quick and must happen
            await trio.to_thread.run_sync(close)
