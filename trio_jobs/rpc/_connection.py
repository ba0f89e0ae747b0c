"""The trio side shared by server and client connections: one reader, one writer.

Theory of operation
-------------------
A connection owns a :class:`~._transport.Transport` (lean TLS on a socket, or any trio stream) and a
sans-IO protocol, and runs two tasks on them:

* the reader loops ``receive_into -> protocol.received -> handle events -> flush`` (the
  transport decrypts into the protocol's receive buffer: no copy of its own).
  The protocol takes at most ``frames_per_call`` frames per call; the reader yields
  between calls, so one connection's flood of small frames cannot hold the event loop,
  and it stops as soon as the protocol closed the connection (GOAWAY queued).
  Its flush waits until the answers it queued (PING/SETTINGS acks, RST_STREAMs) are
  handed to the kernel, so when the peer stops reading, the reader stops reading too
  and nothing queues without bound;
* writing: whoever queued frames moves them into the transport (encrypting them at once) and
  tries a non-blocking send (:meth:`Connection.kick`); this never awaits, so frames of
  concurrent tasks never interleave, and a call whose answer the kernel takes at once
  costs no scheduler round for writing. What the socket does not take at once is left
  to the writer task, the only one that waits for the socket to become writable. While
  several calls run on the connection, ``kick`` leaves the send to the writer, so the
  frames of calls finishing in the same scheduler batch go out in one write.
  Callers that must know their bytes left wait in :meth:`Connection.flush`; a caller
  cancelled meanwhile just stops waiting, the bytes stay queued in the transport.

Send buffering is bounded on purpose: the bytes written to the transport and not handed to
the kernel yet stay below :data:`SEND_HIGH_WATER` (plus one chunk) for every message
sent through :meth:`Connection.send_message`, which waits for the writer instead. Without
it a server stream to a client with a large window queued the whole window (1 MiB per
follower) in h2's outbound buffer plus its ciphertext.

Each stream has one record, a :class:`CallState` (the protocol's ``Stream`` with the I/O
side added; the protocol creates it through ``new_stream`` and removes it at ``release``,
nowhere else): the decoded messages not consumed yet (bounded by the stream window because
their flow-control credit is only returned on consumption), whether the peer ended, and the
error that ends it. Whoever waits on a stream - for a
message or for send window - is woken when the stream or the connection fails
(grpclib#8/#216): :meth:`Connection.connection_lost` fails every state, stops the writer
and releases every flush.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from typing import TYPE_CHECKING, Final, cast

import trio

from ._messages import PREFIX_SIZE
from ._protocol import Stream, StreamGone
from ._status import RpcError, StatusCode

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ._protocol import GrpcProtocol
    from ._transport import Transport

log: Final = logging.getLogger("trio_jobs.rpc")
_LINGER_TIME: Final = 1.0  # seconds of discarding input after a GOAWAY for a protocol error
_BATCH_BYTES: Final = 8 * 1024
"""With several calls on the connection, frames are left to the writer (one write for a
whole scheduler batch) until this many bytes wait: then they go at once, so the peer
starts on the first answers while we produce the rest (less lockstep at c=64)."""
SEND_HIGH_WATER: Final = 256 * 1024
"""Bytes of one connection written and not handed to the kernel yet above which a
sender waits for the writer (the policy: wait, never buffer more)."""


class CallState(Stream):
    """A stream's record as the task that owns the call sees it (module docstring)."""

    __slots__ = ("_wakeup", "ended", "error", "messages")

    def __init__(self, stream_id: int, max_message: int) -> None:
        super().__init__(stream_id, max_message)
        self.messages: collections.deque[tuple[bytes, int]] = collections.deque()
        self.ended = False
        self.error: RpcError | None = None
        self._wakeup = trio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    async def wait(self) -> None:
        """Sleep until :meth:`wake` is called (returns at once if it was meanwhile)."""
        event = self._wakeup
        await event.wait()
        if event is self._wakeup:
            self._wakeup = trio.Event()

    def fail(self, error: RpcError) -> None:
        if self.error is None:
            self.error = error
        self.wake()


class Connection:
    """Base of the server and client connections (see module docstring)."""

    def __init__(self, transport: Transport, protocol: GrpcProtocol, read_size: int) -> None:
        self.transport = transport
        self.protocol = protocol
        self.read_size = read_size
        # The calls on this connection: the protocol's own dictionary of records (made by
        # ``new_stream``, removed by ``release``), seen with the I/O side's type.
        self.states = cast("dict[int, CallState]", protocol.streams)
        self.lost: RpcError | None = None  # set once the connection is unusable
        self.peak_unsent = 0  # the most bytes ever waiting in the transport (for tests)
        self._want_write = trio.Event()
        self._sent = trio.Event()  # set (and replaced) when bytes left or the connection died
        self._sent_waiters = 0
        self._writer_scope = trio.CancelScope()

    def _pull(self) -> None:
        """Move the protocol's pending frames into the transport (encrypted at once)."""
        self.transport.write_pieces(self.protocol.take_output())
        unsent = self.transport.buffered
        if unsent > self.peak_unsent:
            self.peak_unsent = unsent

    def _progress(self) -> None:
        if self._sent_waiters:
            event, self._sent = self._sent, trio.Event()
            event.set()

    async def _wait_sent(self) -> None:
        self._sent_waiters += 1
        try:
            await self._sent.wait()
        finally:
            self._sent_waiters -= 1

    def kick(self) -> None:
        """Write what the protocol queued, without waiting: at once if the socket takes it.

        Never awaits and never raises. What is not sent at once is left to the writer;
        so is everything while other calls run on the connection: they are likely to
        queue frames in the same scheduler batch, and the writer sends them all in one
        write (one TLS record, one segment) instead of one each, up to _BATCH_BYTES.
        Enough for DATA and stream-ending frames: what they can queue is bounded by the
        peer's windows and :data:`SEND_HIGH_WATER`. The reader uses :meth:`flush` instead,
        so that it stops reading when its answers cannot be written.
        """
        if self.lost is not None:
            return
        if self.protocol.has_output():
            self._pull()
        transport = self.transport
        if not transport.buffered:
            return
        if (len(self.states) > 1 and transport.buffered < _BATCH_BYTES) or not transport.send_nowait():
            self._want_write.set()
        else:
            self._progress()

    def want_write(self) -> None:
        """Have the writer send what is queued at its next round (no write now)."""
        if self.protocol.has_output() or self.transport.buffered:
            self._want_write.set()

    async def flush(self) -> None:
        """Have everything queued so far handed to the kernel; RpcError if the connection is gone.

        Backpressure: the caller waits until its bytes have been sent, so a peer that does
        not read blocks every flush. Cancel-safe: the bytes stay queued.
        """
        if self.lost is not None:
            raise RpcError(StatusCode.UNAVAILABLE, self.lost.message)
        if self.protocol.has_output():
            self._pull()
        transport = self.transport
        target = transport.queued_total
        if transport.sent_total >= target:
            return
        if transport.send_nowait():
            self._progress()
            return
        self._want_write.set()
        while transport.sent_total < target and self.lost is None:
            await self._wait_sent()
        if self.lost is not None:
            raise RpcError(StatusCode.UNAVAILABLE, self.lost.message)

    async def writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The one task that waits to write; runs until the connection is lost (cancelled then)."""
        transport = self.transport
        with self._writer_scope:
            task_status.started()
            try:
                while True:
                    await self._want_write.wait()
                    self._want_write = trio.Event()
                    while True:
                        if self.protocol.has_output():
                            self._pull()
                        if not transport.buffered:
                            break
                        await transport.send_some()
                        self._progress()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.connection_lost(RpcError(StatusCode.UNAVAILABLE, "connection lost"))
            finally:
                # Cancelled or failed: nobody may wait for bytes that will never leave.
                self._sent.set()

    async def flush_quietly(self, limit: float) -> None:
        """Best-effort flush for cleanup paths: bounded, shielded, never raises."""
        with trio.move_on_after(limit, shield=True):
            with contextlib.suppress(RpcError):
                await self.flush()

    async def reader(self) -> None:
        """Pump bytes until EOF, a transport error or a fatal protocol error."""
        reason = RpcError(StatusCode.UNAVAILABLE, "connection closed by peer")
        transport = self.transport
        try:
            while not self.protocol.closed:
                n = await transport.receive_into(self.protocol.receive_buffer, self.read_size)
                if not n:
                    break
                events = self.protocol.received(n)
                while True:
                    for event in events:
                        self.handle_event(event)
                    if not self.protocol.input_pending:  # (also False once closed)
                        break
                    # A read of many small frames (a flood) is processed in slices of
                    # frames_per_call, letting every other task run between them.
                    if self.protocol.has_output():
                        await self.flush()
                    else:
                        await trio.lowlevel.checkpoint()
                    events = self.protocol.receive_data(b"")
                if self.protocol.has_output() or transport.buffered:
                    await self.flush()
            else:
                reason = RpcError(StatusCode.UNAVAILABLE, "connection closed (protocol error)")
                await self.flush_quietly(1.0)
                # The GOAWAY is out; a peer still sending must get it before any reset.
                self.connection_lost(reason)
                await self.transport.linger(_LINGER_TIME)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = RpcError(StatusCode.UNAVAILABLE, "connection lost")
        except RpcError as exc:
            reason = exc
        finally:
            self.connection_lost(reason)
            # Nothing useful can be written any more; closing also ends a write blocked
            # on a peer that stopped reading (see flush()).
            await self.transport.aclose()

    def handle_event(self, event: object) -> None:
        raise NotImplementedError

    def connection_lost(self, error: RpcError) -> None:
        """Fail every stream and wake every waiter; idempotent."""
        if self.lost is None:
            self.lost = error
        for state in self.states.values():
            state.fail(error)
        self._writer_scope.cancel()
        self._sent.set()

    def wake_senders(self, stream_id: int) -> None:
        if stream_id == 0:
            for state in self.states.values():
                state.wake()
        elif (one := self.states.get(stream_id)) is not None:
            one.wake()

    async def send_message(
        self,
        state: CallState,
        payload: bytes | Sequence[bytes],
        *,
        end_stream: bool = False,
        kick: bool = True,
    ) -> None:
        """Send one message, waiting for flow-control window and for the writer as needed.

        ``payload`` is the serialized message, or its parts in order (joined by nobody:
        the 5-byte prefix and the parts go to the TLS layer as pieces).
        At most one window of the message is handed to the protocol at a time, so a peer
        that does not read makes this wait instead of making us buffer; and no more than
        :data:`SEND_HIGH_WATER` bytes of the connection wait in the transport, so a slow socket
        does the same. ``kick=False`` leaves the frames queued for a later kick (to write
        several frames at once).
        Not a checkpoint when the window suffices: callers that loop must yield (the
        server-streaming ``send`` does, so the writer runs between messages).
        Cancel-safe in the sense that a cancelled send leaves a partial message: the
        caller must reset the stream (all callers do, since cancellation ends the call).
        """
        if isinstance(payload, bytes):
            size = len(payload)
            parts = [memoryview(_prefix(size)), memoryview(payload)]
        else:
            size = sum(map(len, payload))
            parts = [memoryview(_prefix(size)), *(memoryview(p) for p in payload if p)]
        await self._send_parts(state, parts, PREFIX_SIZE + size, end_stream)
        if kick:
            self.kick()

    async def _send_parts(
        self, state: CallState, parts: list[memoryview], left: int, end_stream: bool
    ) -> None:
        """Send ``parts`` (``left`` bytes in all), as the windows and the writer allow."""
        while True:
            if state.error is not None:
                raise state.error
            room = SEND_HIGH_WATER - self.transport.buffered - self.protocol.pending_bytes()
            if room <= 0:  # the writer has enough to do: wait until the socket took some
                self.kick()
                if SEND_HIGH_WATER - self.transport.buffered - self.protocol.pending_bytes() <= 0:
                    self._want_write.set()
                    await self._wait_sent()
                    if self.lost is not None:
                        raise state.error or RpcError(StatusCode.UNAVAILABLE, self.lost.message)
                continue
            batch = parts if room >= left else _first(parts, room)
            try:
                n = self.protocol.send_data(state.stream_id, batch, end_stream and room >= left)
            except StreamGone:
                raise state.error or RpcError(StatusCode.CANCELLED, "stream closed") from None
            left -= n
            if not left:
                return
            parts = _after(parts, n)
            self.kick()
            if n == 0:  # no window: wait for a WINDOW_UPDATE (or the end of the stream)
                await state.wait()


def _first(parts: list[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of ``parts`` (views, no copy)."""
    out: list[memoryview] = []
    for p in parts:
        if n <= 0:
            break
        out.append(p[:n])
        n -= len(p)
    return out


def _after(parts: list[memoryview], n: int) -> list[memoryview]:
    """``parts`` without their first ``n`` bytes (views, no copy)."""
    i = 0
    while n and n >= len(parts[i]):
        n -= len(parts[i])
        i += 1
    rest = parts[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


def _prefix(size: int) -> bytes:
    """The gRPC message prefix: not compressed, ``size`` bytes."""
    return size.to_bytes(PREFIX_SIZE, "big")
