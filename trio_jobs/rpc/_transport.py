"""The trio side shared by server and client connections: one reader, one writer.

Theory of operation
-------------------
A connection owns a trio stream and a sans-IO protocol, and runs two tasks on them:

* the reader loops ``receive_some -> protocol.receive_data -> handle events -> flush``.
  The protocol takes at most ``frames_per_call`` frames per call; the reader yields
  between calls, so one connection's flood of small frames cannot hold the event loop,
  and it stops as soon as the protocol closed the connection (GOAWAY queued).
  Its flush waits until the answers it queued (PING/SETTINGS acks, RST_STREAMs) are
  written, so when the peer stops reading, the reader stops reading too and nothing
  queues without bound;
* the writer is the only task that calls ``send_all``. Other tasks queue frames in the
  protocol and wait in :meth:`Transport.flush` for the write round that carries them.
  A caller cancelled meanwhile (deadline, RST_STREAM, cancel scope) just stops waiting:
  a ``send_all`` cancelled half-way would break a ``trio.SSLStream`` for every call on
  the connection. Frames queued by many tasks during one ``send_all`` go out together in
  the next one.

Each stream has a :class:`StreamState`: the decoded messages not consumed yet (bounded by
the stream window because their flow-control credit is only returned on consumption),
whether the peer ended, and the error that ends it. Whoever waits on a stream - for a
message or for send window - is woken when the stream or the connection fails
(grpclib#8/#216): :meth:`Transport.connection_lost` fails every state, stops the writer
and releases every flush.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import ssl
from typing import TYPE_CHECKING, Final

import trio

from ._framing import PREFIX_SIZE, encode_message
from ._protocol import StreamGone
from ._status import RpcError, StatusCode

if TYPE_CHECKING:
    from ._protocol import GrpcProtocol

log: Final = logging.getLogger("trio_jobs.rpc")
_COPY_LIMIT: Final = 256 * 1024


class StreamState:
    """One stream as seen by the task that owns it. Not shared between tasks."""

    __slots__ = ("_wakeup", "ended", "error", "messages", "stream_id")

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
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


class Transport:
    """Base of the server and client connections (see module docstring)."""

    def __init__(self, stream: trio.abc.Stream, protocol: GrpcProtocol, read_size: int) -> None:
        self.stream = stream
        self.protocol = protocol
        self.read_size = read_size
        self.states: dict[int, StreamState] = {}
        self.lost: RpcError | None = None  # set once the connection is unusable
        self._want_write = trio.Event()
        self._round_done = trio.Event()  # set when the next write round has been written
        self._in_flight: trio.Event | None = None  # set when the current round is written
        self._writer_scope = trio.CancelScope()
        # trio.SSLStream.receive_some returns one TLS record (<= 16 KiB) per call and pays
        # a trip through the scheduler for each; see _decrypted_more().
        self._ssl_object: ssl.SSLObject | None = (
            stream._ssl_object if isinstance(stream, trio.SSLStream) else None
        )

    async def flush(self) -> None:
        """Have everything the protocol queued written; raises RpcError if the connection is gone.

        Only :meth:`writer` writes to the stream, so cancelling a caller never interrupts
        a ``send_all`` (which would break a ``trio.SSLStream`` for every call on it).
        Backpressure: the caller waits until the write round holding its frames is done,
        so a peer that does not read blocks every writer.
        """
        if self.lost is not None:
            raise RpcError(StatusCode.UNAVAILABLE, self.lost.message)
        if self.protocol.has_data_to_send:
            done = self._round_done
            self._want_write.set()
        elif self._in_flight is not None:  # our frames may be in the write under way
            done = self._in_flight
        else:
            return
        await done.wait()
        if self.lost is not None:
            raise RpcError(StatusCode.UNAVAILABLE, self.lost.message)

    async def writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The one task that writes; runs until the connection is lost (cancelled then)."""
        done: trio.Event | None = None
        with self._writer_scope:
            task_status.started()
            try:
                while True:
                    await self._want_write.wait()
                    self._want_write = trio.Event()
                    # Frames queued from now on belong to the next round.
                    done, self._round_done = self._round_done, trio.Event()
                    self._in_flight = done
                    # Everything queued meanwhile goes out too: concurrent calls share writes.
                    while data := self.protocol.data_to_send():
                        await self.stream.send_all(data)
                    self._in_flight = None
                    done.set()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.connection_lost(RpcError(StatusCode.UNAVAILABLE, "connection lost"))
            finally:
                # Cancelled or failed: nobody may wait for a round that will never end.
                if done is not None:
                    done.set()
                self._round_done.set()

    def kick(self) -> None:
        """Have the writer write what is queued, without waiting for it.

        Enough for DATA and stream-ending frames: what they can queue is bounded by the
        peer's flow-control windows, not by how fast we write. The reader uses
        :meth:`flush` instead, so that it stops reading when its answers cannot be written.
        """
        if self.protocol.has_data_to_send and self.lost is None:
            self._want_write.set()

    async def flush_quietly(self, limit: float) -> None:
        """Best-effort flush for cleanup paths: bounded, shielded, never raises."""
        with trio.move_on_after(limit, shield=True):
            with contextlib.suppress(RpcError):
                await self.flush()

    async def reader(self) -> None:
        """Pump bytes until EOF, a transport error or a fatal protocol error."""
        reason = RpcError(StatusCode.UNAVAILABLE, "connection closed by peer")
        try:
            while not self.protocol.closed:
                data = await self.stream.receive_some(self.read_size)
                if not data:
                    break
                if self._ssl_object is not None:
                    data = self._decrypted_more(data)
                events = self.protocol.receive_data(data)
                while True:
                    for event in events:
                        self.handle_event(event)
                    if not self.protocol.input_pending:  # (also False once closed)
                        break
                    # A read of many small frames (a flood) is processed in slices of
                    # frames_per_call, letting every other task run between them.
                    if self.protocol.has_data_to_send:
                        await self.flush()
                    else:
                        await trio.lowlevel.checkpoint()
                    events = self.protocol.receive_data(b"")
                if self.protocol.has_data_to_send:
                    await self.flush()
            else:
                reason = RpcError(StatusCode.UNAVAILABLE, "connection closed (protocol error)")
                await self.flush_quietly(1.0)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = RpcError(StatusCode.UNAVAILABLE, "connection lost")
        except RpcError as exc:
            reason = exc
        finally:
            self.connection_lost(reason)
            # Nothing useful can be written any more; closing also ends a write blocked
            # on a peer that stopped reading (see flush()).
            await trio.aclose_forcefully(self.stream)

    def _decrypted_more(self, data: bytes | bytearray) -> bytes | bytearray:
        """``data`` plus the TLS records already received and decryptable now, up to read_size.

        One transport read brings up to 64 KiB (four records); trio hands them out one per
        ``receive_some``, each with a scheduler round, which was most of a bulk stream's
        receive cost. Reading the SSL object directly is safe here: the reader is the only
        task that receives, and this never blocks, sends nor awaits. It stops at the first
        record not complete yet (SSLWantReadError) and at any other SSL condition (close
        notify, a corrupt record), which the next ``receive_some`` then reports properly.
        """
        assert self._ssl_object is not None
        total = len(data)
        if total >= self.read_size:
            return data
        parts = [data]
        while total < self.read_size:
            try:
                more = self._ssl_object.read(self.read_size - total)
            except ssl.SSLError:
                break
            if not more:
                break
            parts.append(more)
            total += len(more)
        return data if len(parts) == 1 else b"".join(parts)

    def handle_event(self, event: object) -> None:
        raise NotImplementedError

    def connection_lost(self, error: RpcError) -> None:
        """Fail every stream and wake every waiter; idempotent."""
        if self.lost is None:
            self.lost = error
        for state in self.states.values():
            state.fail(error)
        self._writer_scope.cancel()
        self._round_done.set()

    def wake_senders(self, stream_id: int) -> None:
        if stream_id == 0:
            for state in self.states.values():
                state.wake()
        elif (one := self.states.get(stream_id)) is not None:
            one.wake()

    async def send_message(
        self, state: StreamState, payload: bytes, *, end_stream: bool = False, kick: bool = True
    ) -> None:
        """Send one message, waiting for flow-control window as needed.

        At most one window of the message is handed to the protocol at a time, so a peer
        that does not read makes this wait instead of making us buffer. ``kick=False``
        leaves the frames queued for a later kick (to write several frames at once).
        Not a checkpoint when the window suffices: callers that loop must yield (the
        server-streaming ``send`` does, so the writer runs between messages).
        Cancel-safe in the sense that a cancelled send leaves a partial message: the
        caller must reset the stream (all callers do, since cancellation ends the call).
        """
        if len(payload) < _COPY_LIMIT:
            await self._send_view(state, memoryview(encode_message(payload)), end_stream)
        else:  # avoid copying a large payload: the prefix, then the body
            await self._send_view(state, memoryview(_prefix(payload)), False)
            await self._send_view(state, memoryview(payload), end_stream)
        if kick:
            self.kick()

    async def _send_view(self, state: StreamState, view: memoryview, end_stream: bool) -> None:
        while True:
            if state.error is not None:
                raise state.error
            try:
                n = self.protocol.send_data(state.stream_id, view, end_stream)
            except StreamGone:
                raise state.error or RpcError(StatusCode.CANCELLED, "stream closed") from None
            view = view[n:]
            if not view:
                return
            self.kick()
            await state.wait()


def _prefix(payload: bytes) -> bytes:
    return len(payload).to_bytes(PREFIX_SIZE, "big")
