"""Copying a job's pipe into its output log from a dedicated thread.

Why a thread: a job must never wait for its followers (DESIGN §2), yet the event loop that
would read the pipe also does the followers' work (TLS encryption of their streams). With
the copy on the loop, every chunk needed a turn of a loop busy with that work, and a job
writing at full speed was slowed by its own follower. Here a thread blocks in ``poll(2)`` on
the pipe (and a stop pipe), reads up to a pipe's worth, appends it to the spool file, and
hands the bytes to the loop with ``run_sync_soon`` -- a FIFO, so order is kept -- where
:meth:`OutputLog.publish` puts them in the in-memory tail, advances ``size`` and wakes the
followers. Only the loop touches the log's state; the thread only writes the file (bytes
beyond ``size`` are invisible to readers until published).

Backpressure: at most ``MAX_IN_FLIGHT`` chunks (each at most a pipe's worth) wait for the
loop -- a semaphore the loop releases as it publishes. That bounds the memory, and it is the
only way a saturated loop can slow the job. A slow disk still slows the job (the thread
does not read the pipe while it writes), which is the intended backpressure.

Memory: a read allocates exactly what it got, except while the job writes in bulk (reads of
``read_size`` came back full): then the pipe is read into one buffer the thread keeps and
reuses until the job goes quiet, and only the last ``tail_size`` bytes of a read are copied
out for the loop (the spool file has the rest). A fresh 1 MiB object per read cost the
kernel ~100,000 page faults per GiB copied, which was a third of the pump's CPU.

The per-job cap is applied here, on bytes written; ``OutputLog.cap`` may be lowered by the
loop (``mark_truncated`` after a write error), which the thread sees on its next chunk.
Cancellation (e.g. an escaped process holds the pipe open after the job ended) writes to
the stop pipe; the thread returns at once and the caller waits for it before closing
anything the thread uses.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from typing import TYPE_CHECKING, Final

import trio

if TYPE_CHECKING:
    import outcome

    from .output import OutputLog

log = logging.getLogger(__name__)

MAX_IN_FLIGHT: Final = 8  # chunks handed to the loop and not yet published
MIN_READ_SIZE: Final = 64 * 1024


async def pump_pipe(fd: int, output: OutputLog, *, read_size: int, name: str) -> None:
    """Copy the pipe ``fd`` into ``output`` until EOF; closes ``fd``.

    Cancel-safe: on cancellation the copying thread is told to stop and waited for (it stops
    within one ``poll``), then ``fd`` is closed and Cancelled propagates.
    """
    token = trio.lowlevel.current_trio_token()
    stop_r, stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    slots = threading.Semaphore(MAX_IN_FLIGHT)
    finished = trio.Event()
    results: list[outcome.Outcome[None]] = []

    def publish(tail: bytes, written: int, dropped: bool, error: OSError | None) -> None:  # on the loop
        if error is not None:
            # Disk full or similar: keep draining (a job blocked on a full pipe would
            # never end) but accept no more output.
            log.error("%s: cannot write output: %s", name, error)
            output.mark_truncated()
        try:
            output.publish(tail, dropped=dropped, written=written)
        finally:
            slots.release()

    def copy() -> None:  # in the thread
        write_fd = output.write_fd
        tail_size = output.tail_size
        accepted = output.size
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(stop_r, select.POLLIN)
        # Read size adapts: 64 KiB for a chatty job (os.read allocates the full size first),
        # doubling up to ``read_size`` while reads come back full; at ``read_size`` the job
        # writes in bulk and reads go into ``bulk`` until one comes back short of 64 KiB.
        size = min(MIN_READ_SIZE, read_size)
        bulk: bytearray | None = None
        while True:
            ready = {ready_fd for ready_fd, _ in poller.poll()}
            if stop_r in ready:
                return
            own: bytes | None = None  # the read's own object, or None when it went into ``bulk``
            if bulk is None:
                own = os.read(fd, size)
                data = memoryview(own)
            else:
                data = memoryview(bulk)[: os.readv(fd, [bulk])]
            if not data:
                return  # EOF: every writer has closed the pipe
            if bulk is not None:
                if len(data) < MIN_READ_SIZE:
                    bulk, size = None, min(MIN_READ_SIZE, read_size)
            elif len(data) < size:
                size = min(MIN_READ_SIZE, read_size)
            elif size < read_size:
                size = min(read_size, size * 2)
            else:
                bulk = bytearray(read_size)
            room = max(output.cap - accepted, 0)
            kept = data[:room]
            error: OSError | None = None
            written = 0
            try:
                while written < len(kept):
                    written += os.write(write_fd, kept[written:])
            except OSError as exc:  # e.g. the disk is full: keep what made it to the file
                error = exc
            accepted += written
            if own is not None and written == len(own):
                tail = own  # written whole and never reused: no copy
            else:  # ``bulk`` is overwritten by the next read: copy out what the tail keeps
                tail = bytes(data[max(written - tail_size, 0) : written])
            slots.acquire()  # the loop always runs our callbacks while we are awaited
            token.run_sync_soon(publish, tail, written, written < len(data), error)

    def deliver(result: outcome.Outcome[None]) -> None:
        results.append(result)
        token.run_sync_soon(finished.set)

    try:
        trio.lowlevel.start_thread_soon(copy, deliver, name=f"trio-jobs pump {name}")
        try:
            await finished.wait()
        except BaseException:
            os.write(stop_w, b"x")
            with trio.CancelScope(shield=True):
                await finished.wait()
            raise
        # publish() callbacks queued before finished.set ran before it (FIFO): all visible.
        results[0].unwrap()
    finally:
        os.close(stop_r)
        os.close(stop_w)
        os.close(fd)
