"""The audit log: who did what, one JSON object per line (DESIGN §7 "Audit log").

Theory of operation
-------------------

:func:`audited` wraps the JobService handlers (``service.job_service_methods``): when a call
ends -- answered, refused, failed or cancelled -- the wrapper builds its record
(:func:`audit_record`) and appends it (:meth:`AuditLog.write`) *before* the answer or the
error goes back to the rpc layer, so a line is in the file before the response leaves. A
StreamOutput is logged once, when it is opened: the handler says so with
:func:`stream_opened` once the caller and the job are checked; failing that, at its first
message or its end. Successful reads (GetJobStatus, ListJobs) are logged only when the log
was made with ``reads=True`` (``serve --audit-reads``); refusals always are.

Writing is synchronous, on the event loop, on purpose. STYLE.md forbids blocking the loop on
file I/O; this is the one exception, and it is measured: one ``os.write`` of a ~250-byte
line to an ``O_APPEND`` descriptor lands in the page cache in ~1 µs here, while a
``trio.to_thread`` hop for the same write costs ~160 µs (half of a unary call's p50) and
would make every audited call wait for a thread. It also keeps the log exact under
cancellation: a cancelled call is recorded from its ``except`` path, where an ``await``
would need a shielded scope. The residual risk is a file system that stalls writes (a hung
network mount, writeback throttling on a saturated disk): put the log on a local disk. It is
never fsync'd: a server crash loses nothing, a power loss the last seconds (as syslog).

Each line is one ``os.write`` of the whole line with ``O_APPEND``, so lines never interleave.
A failed write (ENOSPC, EIO, any ``OSError``) never raises into the call: the line is
counted in :attr:`AuditLog.lost`, and a warning with the count is logged at most once per
``warn_interval`` seconds, when writing works again and at close, so every lost line is
reported. A partial write (a full disk in mid-line) is cut off again with ``ftruncate`` so
the file holds only whole lines; if even that fails, the next line starts with a newline.
A job's end never touches the log: records are written by calls, not by the worker.

Encoding: ``json`` with ``ensure_ascii``: every line is ASCII, control characters and
anything non-ASCII (lone surrogates included) are ``\\uXXXX`` escapes, so the strings are
exact, nothing can break a line, and ``cat audit.jsonl`` never sends a terminal a raw
control character. Free text is bounded: ``job_id`` and ``message`` at ``MAX_TEXT`` characters,
``command`` + ``args`` at ``MAX_ARGV_CHARS`` (a StartJob that big is refused anyway); a
record cut short says ``"truncated": true``.

The file: created 0600, opened ``O_NOFOLLOW`` (a planted symlink is refused, never
followed) and ``O_NONBLOCK`` (a planted FIFO is refused, never waited on); it must be a
regular file of the server's user, and a wider mode is narrowed to 0600.
:meth:`AuditLog.reopen` (SIGHUP, after logrotate renamed the file) opens the path again and
swaps descriptors; if the new file cannot be used it raises and the old descriptor is kept.
"""

from __future__ import annotations

import contextvars
import errno
import json
import logging
import os
import stat
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, final

import trio

from .rpc import RpcError, StatusCode
from .v1 import jobs_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
    from pathlib import Path
    from types import TracebackType

    from .rpc import Method, ServerContext

log = logging.getLogger(__name__)

AUDIT_FILE_NAME: Final = "audit.jsonl"
"""The log's name in ``TRIO_JOBS_HOME`` (``serve --audit-log PATH`` moves it)."""
READ_METHODS: Final = frozenset({"GetJobStatus", "ListJobs"})
"""Logged when they succeed only with ``reads=True``; their refusals always are."""
WARN_INTERVAL: Final = 60.0
"""Seconds between two warnings about lost lines (each says how many were lost)."""
MAX_TEXT: Final = 4096
"""Characters kept of ``job_id`` and ``message`` (a job id has 36)."""
MAX_ARGV_CHARS: Final = 1 << 20
"""Characters kept of ``command`` + ``args`` (the service refuses a StartJob over 1 MiB)."""
FILE_MODE: Final = 0o600
_CODE_NAMES: Final = {code: code.name for code in StatusCode}  # (an enum's .name is slow)
_OPEN_FLAGS: Final = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# check_circular off: a record is a flat dict of strings, None, True and a list of strings.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), check_circular=False)


class AuditLogError(OSError):
    """The audit log cannot be opened; the message says which file and why. An OSError,
    so a caller that handles file errors (``reload``) handles this one too."""


# -- records -------------------------------------------------------------------------------


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def rfc3339(ns: int) -> str:
    """``ns`` nanoseconds since the epoch as RFC 3339 in UTC with microseconds
    (``2026-12-02T13:25:00.123456Z``)."""
    global _second  # a cache of one: calls come in bursts within a second
    secs, frac = divmod(ns, 1_000_000_000)
    cached, text = _second
    if cached != secs:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
        _second = (secs, text)  # one assignment: another thread sees the old or the new pair
    return f"{text}.{frac // 1000:06d}Z"


def _cut(text: str, limit: int) -> tuple[str, bool]:
    return (text, False) if len(text) <= limit else (text[:limit], True)


def audit_record(
    *,
    when_ns: int,
    identity: str | None,
    peer: str | None,
    method: str,
    code: StatusCode,
    job_id: str | None = None,
    command: str | None = None,
    args: Sequence[str] | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """One line's object, keys in the documented order; absent fields are left out
    (``identity`` and ``peer`` are always there, null when unknown)."""
    record: dict[str, Any] = {
        "time": rfc3339(when_ns),
        "identity": identity,
        "peer": peer,
        "method": method,
        "code": _CODE_NAMES[code],
    }
    truncated = False
    if job_id:
        record["job_id"], cut = _cut(job_id, MAX_TEXT)
        truncated |= cut
    if command is not None:
        record["command"], cut = _cut(command, MAX_ARGV_CHARS)
        truncated |= cut
        budget = MAX_ARGV_CHARS - len(record["command"])
        kept: list[str] = []
        for arg in args or ():
            if len(arg) > budget:
                truncated = True
                break
            kept.append(arg)
            budget -= len(arg)
        record["args"] = kept
    if code != StatusCode.OK and message is not None:
        record["message"], cut = _cut(message, MAX_TEXT)
        truncated |= cut
    if truncated:
        record["truncated"] = True
    return record


def encode_line(record: Mapping[str, Any]) -> bytes:
    """The record as one ASCII line, newline included (see the module head)."""
    return (_ENCODER.encode(record) + "\n").encode("ascii")


# -- the file --------------------------------------------------------------------------------


def _open_file(path: Path) -> int:
    """A descriptor to append to ``path`` (see the module head); raises AuditLogError."""
    try:
        fd = os.open(path, _OPEN_FLAGS, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            why = "it is a symbolic link (refused: the audit log is never opened through one)"
        elif exc.errno == errno.ENXIO:
            why = "it is a FIFO or socket, not a regular file"
        else:
            why = exc.strerror or str(exc)
        raise AuditLogError(f"cannot open the audit log {path}: {why}") from None
    try:
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != FILE_MODE:
                os.fchmod(fd, FILE_MODE)
            os.set_blocking(fd, True)  # O_NONBLOCK was for the open only (a FIFO fails, never waits)
        except OSError as exc:
            raise AuditLogError(f"cannot use the audit log {path}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode):
            raise AuditLogError(f"cannot use the audit log {path}: it is not a regular file")
        if st.st_uid != os.geteuid():
            raise AuditLogError(
                f"cannot use the audit log {path}: it belongs to uid {st.st_uid}, not to the server's user "
                f"(uid {os.geteuid()}); remove it or give it to that user"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


@final
class AuditLog:
    """An append-only JSON-lines file; see the module head.

    Not open when made: :func:`trio_jobs.server.serve` enters it (``async with``) for the
    server's lifetime. :meth:`write` and :meth:`reopen` are synchronous; :meth:`write`
    never raises. Both may be called from any thread, at any time (before :meth:`open` and
    after :meth:`aclose` they do nothing), but not from a ``signal.signal`` handler (use a
    trio signal receiver, as ``serve`` does).
    """

    def __init__(self, path: Path, *, reads: bool = False, warn_interval: float = WARN_INTERVAL) -> None:
        self.path = path
        self.reads = reads
        self._warn_interval = warn_interval
        self._fd: int | None = None
        self._closed = False
        # Serialises the descriptor's use and swap: a reopen() from another thread must not
        # close the descriptor a write() is using (its number could be reused meanwhile).
        self._lock = threading.Lock()
        self._written = 0
        self._lost = 0
        self._unreported = 0  # lost lines no warning has mentioned yet
        self._last_warning = -float("inf")  # time.monotonic() of the last one
        self._last_error = ""
        self._newline_owed = False  # a fragment of a line could not be cut off

    # -- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Open the file (synchronous: one ``open`` and ``fstat``); raises AuditLogError."""
        with self._lock:
            if self._fd is not None or self._closed:
                raise RuntimeError("an AuditLog is opened once")
            self._fd = _open_file(self.path)

    async def __aenter__(self) -> AuditLog:
        await trio.to_thread.run_sync(self.open)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the file (idempotent; a close of a local file does not block)."""
        self.close()
        await trio.lowlevel.checkpoint_if_cancelled()

    def close(self) -> None:
        with self._lock:
            fd, self._fd, self._closed = self._fd, None, True
            if fd is not None:
                os.close(fd)
            self._report_lost(final=True)

    def reopen(self) -> None:
        """Open the path again (logrotate renamed the file; SIGHUP) and write there from now
        on. Synchronous: one ``open`` and ``fstat``; may run in a thread (``reload`` does).
        Does nothing if the log is not open. Raises :class:`AuditLogError` (an ``OSError``)
        if the new file cannot be used; the old descriptor then stays in use, so no line is
        lost, and the caller says why."""
        if self._fd is None:
            return
        # Opened before the lock: the event loop's writes take the lock, and must never
        # wait on a file system's open (reopen runs in a thread).
        fd = _open_file(self.path)
        with self._lock:
            old = self._fd
            if old is not None:
                self._fd = fd
                self._newline_owed = False  # a new file, or one a whole line is appended to
        os.close(fd if old is None else old)  # closed meanwhile: the new one is not needed

    # -- writing --------------------------------------------------------------------------

    @property
    def written(self) -> int:
        """Lines written since the log was made."""
        return self._written

    @property
    def lost(self) -> int:
        """Lines that could not be written since the log was made."""
        return self._lost

    def write(self, record: Mapping[str, Any]) -> bool:
        """Append ``record`` as one line; True if written. Never raises for the file."""
        return self.write_line(encode_line(record))

    def write_line(self, line: bytes) -> bool:
        with self._lock:
            fd = self._fd
            if fd is None:
                if self._closed:  # a call that ends after shutdown closed the log
                    self._lose("the audit log is closed")
                return False
            data = b"\n" + line if self._newline_owed else line
            try:
                done = os.write(fd, data)
            except OSError as exc:
                self._lose(exc.strerror or str(exc))
                return False
            if done < len(data):
                self._cut_fragment(fd, done)
                self._lose("no space left for a whole line (partial write)")
                return False
            self._newline_owed = False
            self._written += 1
            if self._unreported:
                self._report_lost(final=False, recovered=True)
            return True

    def _cut_fragment(self, fd: int, size: int) -> None:
        """Remove the ``size`` bytes a partial write appended, so no half line stays."""
        try:
            end = os.lseek(fd, 0, os.SEEK_CUR)  # O_APPEND: the offset is the end we wrote
            os.ftruncate(fd, end - size)
        except OSError:
            self._newline_owed = True

    def _lose(self, why: str) -> None:
        self._lost += 1
        self._unreported += 1
        self._last_error = why
        now = time.monotonic()
        if now - self._last_warning >= self._warn_interval:
            self._report_lost(final=False)

    def _report_lost(self, *, final: bool, recovered: bool = False) -> None:
        if not self._unreported:
            return
        state = "writing again" if recovered else ("closed" if final else "writes are failing")
        log.warning(
            "audit log %s: %d line(s) could not be written (%s); %d lost since the server started; %s",
            self.path, self._unreported, self._last_error, self._lost, state,
        )  # fmt: skip
        self._unreported = 0
        self._last_warning = time.monotonic()


# -- the service boundary ----------------------------------------------------------------------

_OPENED: Final[contextvars.ContextVar[Callable[[], None] | None]] = contextvars.ContextVar(
    "trio_jobs_audit_stream_opened", default=None
)


def stream_opened() -> None:
    """Called by a streaming handler once it has accepted its call (caller checked, job
    found), before its first message: the audit wrapper logs the call now, not at its first
    byte (a follower of a quiet job may wait hours for one). A no-op outside an audited call."""
    opened = _OPENED.get()
    if opened is not None:
        opened()


def _details(request: object, response: object) -> tuple[str | None, str | None, Sequence[str] | None]:
    """(job_id, command, args) of a JobService call, as far as there are any."""
    if isinstance(request, pb.StartJobRequest):
        job_id = response.job_id if isinstance(response, pb.StartJobResponse) else None
        return job_id, request.command, request.args
    if isinstance(request, pb.StopJobRequest | pb.GetJobStatusRequest | pb.StreamOutputRequest):
        return request.job_id, None, None
    return None, None, None


def _failure(exc: BaseException, ctx: ServerContext) -> tuple[StatusCode, str]:
    """The status the rpc layer will send for ``exc`` raised by a handler."""
    if isinstance(exc, RpcError):
        return exc.code, exc.message
    if isinstance(exc, trio.Cancelled):
        if ctx.deadline is not None and trio.current_time() >= ctx.deadline:
            return StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
        return StatusCode.CANCELLED, "the call ended before its answer (the client went away, or the server is shutting down)"
    return StatusCode.UNKNOWN, "internal error in the handler"


def audited(methods: Iterable[Method], audit: AuditLog) -> list[Method]:
    """``methods`` with handlers that log each call to ``audit`` (see the module head)."""
    return [replace(m, handler=(_audit_stream if m.server_streaming else _audit_unary)(m, audit),
                    refused=_audit_refused(m, audit)) for m in methods]


def _audit_refused(method: Method, audit: AuditLog) -> Callable[[ServerContext, RpcError], None]:
    """Calls the rpc layer refuses before the handler (a request that does not parse)."""
    name = method.path.rsplit("/", 1)[-1]

    def refused(ctx: ServerContext, exc: RpcError) -> None:
        _record(audit, ctx, name, exc.code, exc.message, None)

    return refused


def _record(audit: AuditLog, ctx: ServerContext, method: str, code: StatusCode, message: str | None,
            request: object, response: object = None) -> None:  # fmt: skip
    job_id, command, args = _details(request, response)
    audit.write(audit_record(
        when_ns=time.time_ns(), identity=ctx.peer_identity, peer=ctx.peer, method=method, code=code,
        job_id=job_id, command=command, args=args, message=message,
    ))  # fmt: skip


def _audit_unary(method: Method, audit: AuditLog) -> Callable[[Any, ServerContext], Awaitable[Any]]:
    name = method.path.rsplit("/", 1)[-1]
    inner = method.handler
    log_success = audit.reads or name not in READ_METHODS

    async def handler(request: Any, ctx: ServerContext) -> Any:
        try:
            response = await inner(request, ctx)  # type: ignore[call-arg]
        except BaseException as exc:
            _record(audit, ctx, name, *_failure(exc, ctx), request)
            raise
        if log_success:
            _record(audit, ctx, name, StatusCode.OK, None, request, response)
        return response

    return handler


def _audit_stream(
    method: Method, audit: AuditLog
) -> Callable[[Any, ServerContext, Callable[[Any], Awaitable[None]]], Awaitable[None]]:
    name = method.path.rsplit("/", 1)[-1]
    inner = method.handler

    async def handler(request: Any, ctx: ServerContext, send: Callable[[Any], Awaitable[None]]) -> None:
        logged = False

        def opened() -> None:
            nonlocal logged
            if not logged:
                logged = True
                _record(audit, ctx, name, StatusCode.OK, None, request)

        async def audited_send(message: Any) -> None:
            if not logged:
                opened()
            await send(message)

        token = _OPENED.set(opened)
        try:
            await inner(request, ctx, audited_send)  # type: ignore[call-arg]
        except BaseException as exc:
            if not logged:
                logged = True
                _record(audit, ctx, name, *_failure(exc, ctx), request)
            raise
        finally:
            _OPENED.reset(token)
        opened()

    return handler
