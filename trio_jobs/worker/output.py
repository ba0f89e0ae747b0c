"""The output log of a job: append-only, spooled to a file, followed by offset.

Theory of operation
-------------------
A job's stdout+stderr arrive through one pipe; a single writer (the job's pump, a thread of
its own: worker/pump.py) writes the bytes to the job's spool file and then, on the event
loop, calls :meth:`OutputLog.publish` (:meth:`OutputLog.append` does both for in-loop
writers). A slow disk never blocks the event loop; while it is slow the pump does not read
the pipe, so the *job* is what waits -- the backpressure goes to the producer, never to a
follower. Publishing copies the newest bytes into a fixed-size ring (the in-memory tail), then
advances ``size`` and wakes the followers. So every byte below ``size`` is in the file, and
the last ``tail_size`` of them are also in memory.

A follower (:class:`OutputReader`) holds only an offset (plus, lazily, its own read-only file
descriptor). To get bytes at its offset it copies them from the ring when they are still
there, otherwise it reads the file: first ``preadv2(RWF_NOWAIT)`` in the loop, which only
succeeds for data in the page cache (a memcpy, microseconds), and only if that would block
does it go to a thread. Memory therefore does not grow with the output size (the ring is
fixed) nor with the number of followers (an offset, a descriptor, one chunk in flight).

Waiting is event driven: ``_changed`` is a ``trio.Event`` that the writer sets (and replaces)
after every append and at the end; a follower with nothing to read waits on the event it saw
before checking, so no wakeup is lost and nothing polls. The writer never waits for followers:
setting an event only reschedules them.

The per-job cap: once ``cap`` bytes were accepted, further output is counted as dropped,
``truncated`` becomes True and the pump keeps draining the pipe (a job blocked on a full pipe
would never end). A follower ends exactly when the job has ended (:meth:`finish`) and it has
read up to the final ``size``.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Final, final

import trio

from .errors import InvalidArgument, JobNotFound, WorkerError
from .spec import OutputChunk

if TYPE_CHECKING:
    from pathlib import Path
    from typing import Self

DEFAULT_TAIL_SIZE: Final = 256 * 1024
DEFAULT_MAX_CHUNK: Final = 64 * 1024
MAX_CHUNK_LIMIT: Final = 4 * 1024 * 1024  # a follower asks for at most this much at once


@final
class OutputLog:
    """One job's output. One writer (append/finish), any number of readers."""

    def __init__(
        self, path: Path, *, cap: int, tail_size: int = DEFAULT_TAIL_SIZE, size: int = 0,
        truncated: bool = False, ended: bool = False, write_fd: int | None = None,
    ) -> None:
        if tail_size < 1 or cap < 0:
            raise ValueError("tail_size must be >= 1 and cap >= 0")
        self.path = path
        self.cap = cap
        self._tail_size = tail_size
        self._ring: bytearray | None = None  # allocated on the first append
        self._size = size
        self._truncated = truncated
        self._ended = ended
        self._write_fd = write_fd
        self._changed = trio.Event()
        self._readers = 0  # open OutputReaders (a debug surface: a dead client frees its own)
        self._readers_changed = trio.Event()

    @classmethod
    async def create(cls, path: Path, *, cap: int, tail_size: int = DEFAULT_TAIL_SIZE) -> Self:
        """A new, empty log whose spool file is created at ``path`` (which must not exist)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = await trio.to_thread.run_sync(os.open, path, flags, 0o600)
        return cls(path, cap=cap, tail_size=tail_size, write_fd=fd)

    @classmethod
    def ended_log(cls, path: Path, *, size: int) -> Self:
        """A read-only view of the log of a job that has ended (e.g. in an earlier run)."""
        return cls(path, cap=size, tail_size=1, size=size, ended=True)

    @property
    def size(self) -> int:
        """Bytes accepted so far (every one of them is in the file)."""
        return self._size

    @property
    def tail_size(self) -> int:
        """How many of the newest bytes are kept in memory."""
        return self._tail_size

    @property
    def truncated(self) -> bool:
        return self._truncated

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def readers(self) -> int:
        """How many readers of this log are open now (created and not yet closed)."""
        return self._readers

    async def wait_readers(self, at_most: int) -> None:
        """Return once at most ``at_most`` readers are open (event driven)."""
        while self._readers > at_most:
            await self._readers_changed.wait()

    def _count_reader(self, delta: int) -> None:
        self._readers += delta
        self._readers_changed.set()
        self._readers_changed = trio.Event()

    def mark_truncated(self) -> None:
        """Accept no more output (e.g. the disk is full) and say that some was lost."""
        self.cap = self._size
        self._truncated = True

    async def append(self, data: bytes) -> None:
        """Add ``data`` at the end. Single writer only. Waits for the disk, never for readers.

        Not cancellable while the file write runs (the thread finishes it), so ``size``
        always matches the file.
        """
        if self._ended:
            raise RuntimeError("append after finish")
        room = self.cap - self._size
        if len(data) > room:
            self._truncated = True
            data = data[: max(room, 0)]
        if not data:
            return
        await trio.to_thread.run_sync(write_all, self.write_fd, data)
        self.publish(data, dropped=False)

    @property
    def write_fd(self) -> int:
        """The spool file's descriptor, for a writer in another thread (see worker/pump.py)."""
        if self._write_fd is None:
            raise RuntimeError("the log has ended")
        return self._write_fd

    def publish(self, data: bytes, *, dropped: bool, written: int | None = None) -> None:
        """Make the bytes just written to the file at offset ``size`` visible to readers.

        The second half of an append, for a writer that wrote the file itself; ``dropped``
        says it dropped bytes at the cap. ``data`` is what it wrote, or, when ``written``
        says how many bytes that was, at least their last ``tail_size`` bytes (all the
        in-memory tail keeps). Single writer, on the event loop.
        """
        n = len(data) if written is None else written
        if not min(n, self._tail_size) <= len(data) <= n:
            raise ValueError(f"publish of {n} bytes needs their last {self._tail_size}, got {len(data)}")
        if dropped:
            self._truncated = True
        if n:
            self._ring_store(data, self._size + n)
            self._size += n
            self._wake()

    def finish(self) -> None:
        """The job has ended: no more output. Followers end once they have read everything."""
        if self._ended:
            return
        self._ended = True
        if self._write_fd is not None:
            fd, self._write_fd = self._write_fd, None
            os.close(fd)  # closing a regular file does not wait for the disk
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self, seen: trio.Event) -> None:
        """Wait until something happened after ``seen`` was current (see the module doc)."""
        await seen.wait()

    def _ring_store(self, data: bytes, end: int) -> None:
        """Keep the end of ``data``, whose last byte is at absolute offset ``end - 1``."""
        cap = self._tail_size
        if self._ring is None:
            self._ring = bytearray(cap)
        view = memoryview(data)[-cap:]
        start = end - len(view)  # absolute offset of view[0]
        pos = start % cap
        first = min(len(view), cap - pos)
        self._ring[pos : pos + first] = view[:first]
        if first < len(view):
            self._ring[: len(view) - first] = view[first:]

    def tail_read(self, offset: int, n: int) -> bytes | None:
        """Up to ``n`` bytes at ``offset`` from memory, or None when no longer in the tail."""
        if self._ring is None or offset < self._size - self._tail_size or offset >= self._size:
            return None
        n = min(n, self._size - offset)
        cap = self._tail_size
        pos = offset % cap
        first = min(n, cap - pos)
        ring = memoryview(self._ring)
        if first == n:
            return bytes(ring[pos : pos + n])
        return bytes(ring[pos:]) + bytes(ring[: n - first])

    def follow(self, offset: int = 0, *, wait: bool = True, max_chunk: int = DEFAULT_MAX_CHUNK,
               fd: int | None = None) -> OutputReader:
        """A reader from ``offset``; ``fd``: the spool file already open for reading, which
        the reader then owns (so a file unlinked later is still read to its end)."""
        return OutputReader(self, offset, wait=wait, max_chunk=max_chunk, fd=fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


_nowait_supported = True  # flipped once if the kernel or file system rejects RWF_NOWAIT


@final
class OutputReader:
    """Async iterator of :class:`OutputChunk` from ``offset`` on. One task at a time.

    With ``wait=True`` it waits for more output and ends right after the job has ended and the
    last byte was delivered; with ``wait=False`` it ends at the end that existed when it was
    created. ``aclose()`` is idempotent; cancelling ``__anext__`` loses no bytes (the offset
    only advances when a chunk is returned).
    """

    def __init__(self, log: OutputLog, offset: int, *, wait: bool, max_chunk: int,
                 fd: int | None = None) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgument(f"offset must be a non-negative integer, not {offset!r}")
        if isinstance(max_chunk, bool) or not isinstance(max_chunk, int) or max_chunk < 1:
            raise InvalidArgument(f"max_chunk must be a positive integer, not {max_chunk!r}")
        self._log = log
        self._offset = offset
        self._wait = wait
        self._stop_at = None if wait else log.size
        self._max_chunk = min(max_chunk, MAX_CHUNK_LIMIT)
        self._fd: int | None = fd  # owned from here on (the caller closes it if we raised)
        self._closed = False
        self._busy = False
        self._scope = trio.CancelScope()
        log._count_reader(+1)

    @property
    def offset(self) -> int:
        """The offset of the next byte this reader will return."""
        return self._offset

    def __aiter__(self) -> OutputReader:
        return self

    async def __anext__(self) -> OutputChunk:
        if self._busy:
            raise trio.BusyResourceError("another task is reading this OutputReader")
        self._busy = True
        self._scope = trio.CancelScope()
        try:
            chunk = None
            with self._scope:  # aclose() from another task cancels a waiting read
                chunk = await self._next()
        finally:
            self._busy = False
            if self._closed:
                self._close_fd()
        if chunk is None:
            await self.aclose()
            raise StopAsyncIteration
        return chunk

    async def _next(self) -> OutputChunk | None:
        log = self._log
        while not self._closed:
            seen = log._changed
            end = log.size if self._stop_at is None else self._stop_at
            if self._offset < end:
                n = min(self._max_chunk, end - self._offset)
                data = log.tail_read(self._offset, n)
                if data is None:
                    data = await self._read_file(self._offset, n)
                chunk = OutputChunk(offset=self._offset, data=data)
                self._offset += len(data)
                return chunk
            if log.ended or not self._wait:
                return None
            await log.wait_changed(seen)
        return None

    async def _read_file(self, offset: int, n: int) -> bytes:
        global _nowait_supported
        if self._fd is None:
            try:
                # O_NOFOLLOW: a symlink in place of the spool file is refused, not read as root
                fd = await trio.to_thread.run_sync(os.open, self._log.path,
                                                   os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError as exc:  # retention deleted the job before we needed it
                raise JobNotFound(f"the output of job {self._log.path.stem} was deleted "
                                  "(retention: see the server's --retain-* options)") from exc
            except OSError as exc:  # e.g. EMFILE with very many followers
                raise WorkerError(f"cannot open output file {self._log.path}: {exc}") from exc
            if self._closed:
                os.close(fd)
                raise trio.ClosedResourceError("OutputReader was closed")
            self._fd = fd
        buf = bytearray(n)
        got = 0
        if _nowait_supported:
            try:
                got = os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
            except BlockingIOError:
                got = 0  # not in the page cache: read it in a thread
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise WorkerError(f"cannot read output file {self._log.path}: {exc}") from exc
                _nowait_supported = False
        if got == 0:
            try:
                got = await trio.to_thread.run_sync(os.preadv, self._fd, [buf], offset)
            except OSError as exc:
                raise WorkerError(f"cannot read output file {self._log.path}: {exc}") from exc
        if got == 0:
            raise WorkerError(
                f"output file {self._log.path} is shorter ({offset} bytes) than recorded"
            )
        return bytes(memoryview(buf)[:got])

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    async def aclose(self) -> None:
        """Stop reading and release the file descriptor. Idempotent; safe while reading."""
        if not self._closed:
            self._log._count_reader(-1)
        self._closed = True
        if self._busy:
            self._scope.cancel()
        else:
            self._close_fd()
        await trio.lowlevel.checkpoint()
