"""Sans-IO core shared by the gRPC server and client protocols.

Theory of operation
-------------------
:class:`GrpcProtocol` wraps one ``h2.connection.H2Connection``. ``receive_data(bytes)``
returns our own events (``_events.py``); every method that produces frames leaves them in
``data_to_send()``. No I/O, no clock reads except through the injected ``clock``.

Flow control (receive side): the credit of a DATA frame (its flow-controlled length) is
returned to the peer

* when the application consumed the message the frame completed: every
  ``MessageReceived`` must be passed back through :meth:`acknowledge` (its ``ack`` is
  the credit attributed to it, possibly 0);
* for a frame that completes no message: at once while the application has no
  unconsumed message on the stream (the bytes sit in the stream's
  :class:`MessageDecoder`, bounded by the max message size, and holding them back would
  deadlock a message larger than the window); otherwise they are held too, and returned
  when the application has caught up.

So the decoded-but-unconsumed data of a stream is at most one stream window plus one
message: that is the backpressure policy. Credit still held is returned at
:meth:`release`, and data on discarded, refused or unknown streams is credited at once,
so the connection window never leaks (grpclib#67).

Send side: :meth:`send_data` writes only what the peer's windows allow and returns the
count; the I/O layer waits for :class:`WindowUpdated` before sending the rest, so nothing
is buffered beyond what the peer granted.

GOAWAY: h2 moves its connection state machine to CLOSED on any GOAWAY, after which it
refuses to send or receive anything, which makes graceful shutdown impossible. We install
a state machine whose GOAWAY transitions keep the connection open and track GOAWAY state
ourselves.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ClassVar, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

from . import _events as ev
from ._frames import FrameBuffer
from ._framing import FramingError, MessageDecoder
from ._h2glue import (
    _QUIET,
    _GoAwayTolerantStateMachine,
    data_fast_stream,
    forget_closed_stream,
    headers_fast_stream,
    receive_data_fast,
    receive_headers_fast,
    request_fast_ok,
    send_data_fast,
    send_headers_fast,
    start_stream_fast,
)
from ._hpack import HeaderChecker, MemoDecoder, MemoEncoder
from ._status import StatusCode

if TYPE_CHECKING:
    from collections.abc import Callable

    from h2.stream import H2Stream

DEFAULT_WINDOW: Final = 65_535
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_END_STREAM: Final = 0x1
DEFAULT_FRAMES_PER_CALL: Final = 32
_HEADER_EVENTS: Final = (
    h2.events.RequestReceived,
    h2.events.ResponseReceived,
    h2.events.InformationalResponseReceived,
    h2.events.TrailersReceived,
    h2.events.PushedStreamReceived,
)


CLOSED_STREAMS_KEPT: Final = 1024
"""Closed streams h2 remembers per connection (to tell a late frame on a stream that was
reset, which is ignored, from one on a stream that ended normally). h2 keeps 65,536, ~300
bytes each on each side: a long-lived channel grew by ~20 MB over its first 65,536 calls, and
the server by as much for each such client. Late frames arrive within a round trip, during
which far fewer than this many streams close (at most 100 are open at once)."""


class _H2Connection(h2.connection.H2Connection):
    MAX_CLOSED_STREAMS = CLOSED_STREAMS_KEPT


class StreamGone(Exception):
    """Internal: the stream can no longer be written (reset or closed)."""


class _Stream:
    __slots__ = (
        "decoder",
        "discarding",
        "headers_sent",
        "partial",
        "queued",
        "remote_ended",
        "reset",
        "unacked",
    )

    def __init__(self, max_message: int) -> None:
        self.decoder = MessageDecoder(max_message)
        self.unacked = 0  # flow-control credit held back (messages + partial), not yet returned
        self.queued = 0  # messages handed to the app and not acknowledged yet
        self.partial = 0  # held credit of the message in progress
        self.discarding = False  # drop (and credit back) any further DATA
        self.reset = False  # RST_STREAM sent or received: nothing more can be sent
        self.headers_sent = False
        self.remote_ended = False


class GrpcProtocol:
    """Base of :class:`ServerProtocol` and :class:`ClientProtocol`."""

    client_side: ClassVar[bool]

    def __init__(
        self,
        *,
        max_receive_message: int,
        max_concurrent_streams: int,
        max_header_list_size: int,
        stream_window: int,
        connection_window: int,
        max_frame_size: int,
        clock: Callable[[], float],
        frames_per_call: int | None = DEFAULT_FRAMES_PER_CALL,
    ) -> None:
        self.max_receive_message = max_receive_message
        # At most this many frames are processed per receive_data() call (h2 takes ~75 us
        # per HEADERS): the I/O layer yields between calls, so one connection's flood
        # cannot hold the event loop for long. None: no limit.
        self.frames_per_call: int | None = frames_per_call
        self._clock = clock
        config = h2.config.H2Configuration(
            client_side=self.client_side,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            # h2's inbound checks run in _dispatch instead, memoised (see HeaderChecker).
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        conn = _H2Connection(config)
        conn.state_machine = _GoAwayTolerantStateMachine()
        conn.encoder = MemoEncoder()
        conn.decoder = MemoDecoder(conn.DEFAULT_MAX_HEADER_LIST_SIZE)
        settings: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame_size,
        }
        if self.client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        conn.local_settings = h2.settings.Settings(client=self.client_side, initial_values=settings)
        conn.max_inbound_frame_size = max_frame_size
        self._frames = FrameBuffer(server=not self.client_side, max_frame_size=max_frame_size)
        self._frames.fast_frame = self._fast_frame_ok
        conn.incoming_buffer = self._frames
        table = conn._frame_dispatch_table
        for cls, quiet in _QUIET.items():
            table[quiet] = table[cls]
        conn.decoder.max_header_list_size = max_header_list_size
        self._h2 = conn
        self._streams: dict[int, _Stream] = {}
        self._headers = HeaderChecker(client_side=self.client_side)
        self._connection_window = connection_window
        self.closed = False  # a fatal error happened; only data_to_send() is useful now
        self.goaway_received: int | None = None  # peer's last_stream_id
        self.goaway_sent: int | None = None  # our last announced last_stream_id

    # -- setup and output ------------------------------------------------------------
    def initiate(self) -> None:
        """Queue the preface/SETTINGS and open the connection receive window."""
        self._h2.initiate_connection()
        if self._connection_window > DEFAULT_WINDOW:
            self._h2.increment_flow_control_window(self._connection_window - DEFAULT_WINDOW)

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    def send_pending(self, write: Callable[[bytearray], None]) -> None:
        """``write(data_to_send())`` without copying the bytes first: ``write`` gets h2's
        own buffer and must consume it before returning (the wire encrypts it at once)."""
        conn = self._h2
        pending = conn._data_to_send
        if pending:
            conn._data_to_send = bytearray()
            write(pending)

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._h2._data_to_send)

    @property
    def bytes_to_send(self) -> int:
        return len(self._h2._data_to_send)

    # -- input -------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ev.Event]:
        """Feed bytes from the peer (copied). Never raises: failures become ConnectionFailed.

        Processes at most :attr:`frames_per_call` frames; see :attr:`input_pending`.
        """
        if self.closed:
            return []
        try:
            self._frames.add_data(data)
        except h2.exceptions.ProtocolError as exc:  # a bad preface: no GOAWAY queued yet
            return [self._fail(int(exc.error_code), str(exc), True)]
        return self._process()

    def receive_buffer(self, n: int) -> memoryview:
        """A writable view for up to ``n`` bytes from the peer, to fill in place (TLS
        decrypts into it) and pass to :meth:`received`; release it before that."""
        return self._frames.reserve(n)

    def received(self, n: int) -> list[ev.Event]:
        """``n`` bytes were written into the last :meth:`receive_buffer`: like
        :meth:`receive_data` for them, without the copy."""
        if self.closed:
            return []
        try:
            self._frames.commit(n)
        except h2.exceptions.ProtocolError as exc:
            return [self._fail(int(exc.error_code), str(exc), True)]
        return self._process()

    def _process(self) -> list[ev.Event]:
        """The frames received so far, within the frame budget: DATA that h2 would take
        without other effects (``data_fast_stream``) here, in place; the rest by h2."""
        buffer = self._frames
        buffer.frame_budget = self.frames_per_call
        buffer.budget_exhausted = False
        conn = self._h2
        out: list[ev.Event] = []
        while not self.closed:
            head = buffer.head()
            if head is None:
                return out
            length, kind, flags, sid = head
            whole = buffer.pending >= 9 + length
            if not whole and length <= buffer.max_frame_size and buffer.head_is_valid(kind, sid):
                return out  # the middle of a frame: nothing to do yet
            fast = None
            if whole and length <= buffer.max_frame_size and not buffer._headers_buffer:
                fast = self._fast_target(kind, flags, sid, length)
            if fast is not None:
                stream = None if isinstance(fast, bool) else fast
                if not buffer.spend_budget():
                    return out
                if stream is not None and kind == _DATA:
                    self._receive_fast(stream, sid, length, flags, out)
                else:
                    self._receive_headers(stream, sid, length, flags, out)
                continue
            # h2's turn: it takes frames up to the next fast one, the end or the budget.
            buffer.at_fast_frame = False
            pending = len(conn._data_to_send)
            try:
                h2_events = conn.receive_data(b"")
            except h2.exceptions.ProtocolError as exc:
                # h2 queued GOAWAY(error_code) itself (unless it had nothing to say).
                queued = len(conn._data_to_send) > pending
                out.append(self._fail(int(exc.error_code), str(exc) or type(exc).__name__, not queued))
                return out
            self._dispatch_all(h2_events, out)
            if self.closed or not buffer.at_fast_frame:  # the end of the input, or the budget
                return out
        return out

    def _fast_target(self, kind: int, flags: int, sid: int, length: int) -> H2Stream | bool | None:
        """For a whole frame at the head: the h2 stream a DATA or HEADERS frame that we take
        ourselves goes to, False for HEADERS opening a request we take ourselves, None for a
        frame that h2 must handle."""
        conn = self._h2
        if kind == _DATA:
            return data_fast_stream(conn, flags, sid, length)
        if kind != _HEADERS:
            return None
        stream = headers_fast_stream(conn, flags, sid)
        if stream is not None:
            return stream
        return False if request_fast_ok(conn, flags, sid) else None

    def _fast_frame_ok(self, kind: int, flags: int, stream_id: int, length: int) -> bool:
        return self._fast_target(kind, flags, stream_id, length) is not None

    def _dispatch_all(self, h2_events: list[h2.events.Event], out: list[ev.Event]) -> None:
        """Turn h2's events into ours; a policy that closes the connection (GOAWAY queued)
        makes the rest moot, and h2's ProtocolError while checking one closes it too."""
        try:
            for e in h2_events:
                if self.closed:
                    return
                self._dispatch(e, out)
        except h2.exceptions.ProtocolError as exc:
            out.append(self._fail(int(exc.error_code), str(exc), True))

    def _receive_headers(
        self, stream: H2Stream | None, sid: int, length: int, flags: int, out: list[ev.Event]
    ) -> None:
        """A whole HEADERS frame at the head that ``headers_fast_stream`` (or, for a new
        stream, ``request_fast_ok``) accepted: h2's decoding and stream logic without its
        frame objects; errors close the connection as h2 does (GOAWAY with their code)."""
        buffer = self._frames
        at = buffer.start + 9
        block = bytes(buffer.buf[at : at + length])
        buffer.consume(9 + length)
        try:
            h2_events = receive_headers_fast(self._h2, stream, sid, block, bool(flags & _END_STREAM))
        except h2.exceptions.ProtocolError as exc:
            self._h2._terminate_connection(exc.error_code)
            out.append(self._fail(int(exc.error_code), str(exc) or type(exc).__name__, False))
            return
        self._dispatch_all(h2_events, out)

    def _receive_fast(
        self, stream: H2Stream, sid: int, length: int, flags: int, out: list[ev.Event]
    ) -> None:
        """A whole DATA frame at the head that ``data_fast_stream`` accepted: h2's state
        effects, then its payload decoded from the buffer in place."""
        buffer = self._frames
        ended = bool(flags & _END_STREAM)
        receive_data_fast(self._h2, stream, length, ended)
        at = buffer.start + 9
        with memoryview(buffer.buf) as view:
            payload = view[at : at + length]
            self._on_data_payload(sid, payload, length, out)
            payload.release()
        buffer.consume(9 + length)
        if ended:
            self._on_stream_ended(sid, out)

    @property
    def input_pending(self) -> bool:
        """True when the last ``receive_data`` stopped at its frame budget: call
        ``receive_data(b"")`` (after letting others run) to process the rest."""
        return self._frames.budget_exhausted and not self.closed

    def _fail(self, code: int, reason: str, send_goaway: bool) -> ev.ConnectionFailed:
        self.closed = True
        if send_goaway:
            self._goaway_raw(code, reason.encode()[:128])
        return ev.ConnectionFailed(error_code=code, reason=reason)

    def fail(self, code: int, reason: str) -> ev.ConnectionFailed:
        """Close the connection for a policy violation: queue GOAWAY(code, reason)."""
        return self._fail(code, reason, True)

    def _dispatch(self, e: h2.events.Event, out: list[ev.Event]) -> None:
        if isinstance(e, h2.events.DataReceived):
            self._on_data(e, out)
        elif isinstance(e, h2.events.WindowUpdated):
            out.append(ev.WindowUpdated(stream_id=e.stream_id or 0))
        elif isinstance(e, h2.events.StreamEnded):
            self._on_stream_ended(e.stream_id or 0, out)
        elif isinstance(e, h2.events.StreamReset):
            self._on_stream_reset(e.stream_id or 0, int(e.error_code or 0), out)
        elif isinstance(e, h2.events.PingReceived):
            self._on_ping(out)
        elif isinstance(e, h2.events.PingAckReceived):
            out.append(ev.PingAcknowledged(data=bytes(e.ping_data or b"")))
        elif isinstance(e, h2.events.RemoteSettingsChanged):
            if not self._on_settings(out):
                return
            out.append(ev.SettingsReceived())
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in e.changed_settings:
                out.append(ev.WindowUpdated(stream_id=0))
        elif isinstance(e, h2.events.ConnectionTerminated):
            last = e.last_stream_id if e.last_stream_id is not None else 0
            self.goaway_received = last
            out.append(
                ev.GoAwayReceived(
                    last_stream_id=last,
                    error_code=int(e.error_code or 0),
                    debug=bytes(e.additional_data or b""),
                )
            )
        else:
            if isinstance(e, _HEADER_EVENTS):
                e.headers = self._headers.check(e)  # raises h2's ProtocolError
            self._dispatch_headers(e, out)

    def _dispatch_headers(self, e: h2.events.Event, out: list[ev.Event]) -> None:
        raise NotImplementedError

    def _on_ping(self, out: list[ev.Event]) -> None:
        """h2 answers pings itself; the server adds its ping policy here."""

    def _on_settings(self, out: list[ev.Event]) -> bool:
        """h2 applies and ACKs SETTINGS itself; False if a policy closed the connection."""
        return True

    def _on_data(self, e: h2.events.DataReceived, out: list[ev.Event]) -> None:
        self._on_data_payload(e.stream_id or 0, e.data or b"", e.flow_controlled_length or 0, out)

    def _on_data_payload(
        self, sid: int, data: bytes | memoryview, flow: int, out: list[ev.Event]
    ) -> None:
        """Decode a DATA frame's payload (``flow``: its flow-controlled length). The
        decoder copies what it keeps: ``data`` may be a view of the receive buffer."""
        st = self._streams.get(sid)
        if st is None or st.discarding:
            self._ack(sid, flow)
            return
        try:
            messages = st.decoder.feed(data)
        except FramingError as exc:
            st.discarding = True
            self._ack(sid, flow)
            code = StatusCode.RESOURCE_EXHAUSTED if exc.too_large else StatusCode.INTERNAL
            out.append(ev.StreamFailed(stream_id=sid, code=code, message=str(exc)))
            return
        if not messages:
            if st.queued:
                st.partial += flow
                st.unacked += flow
            else:
                self._ack(sid, flow)
            return
        credit = st.partial + flow
        st.unacked += flow
        st.partial = 0
        st.queued += len(messages)
        last = len(messages) - 1
        for i, m in enumerate(messages):
            out.append(ev.MessageReceived(stream_id=sid, data=m, ack=credit if i == last else 0))

    def _on_stream_ended(self, sid: int, out: list[ev.Event]) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        st.remote_ended = True
        if not st.discarding and not st.decoder.at_boundary():
            st.discarding = True
            out.append(
                ev.StreamFailed(
                    stream_id=sid,
                    code=StatusCode.INTERNAL,
                    message="stream ended in the middle of a message",
                )
            )
        out.append(ev.StreamEnded(stream_id=sid))

    def _on_stream_reset(self, sid: int, code: int, out: list[ev.Event]) -> None:
        st = self._streams.get(sid)
        if st is None:
            return
        st.remote_ended = True
        st.discarding = st.reset = True
        out.append(ev.StreamReset(stream_id=sid, error_code=code))

    # -- flow control ----------------------------------------------------------------
    def _ack(self, sid: int, n: int) -> None:
        if n > 0:
            # h2 credits the connection window even when the stream is already closed.
            self._h2.acknowledge_received_data(n, sid)

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The application consumed a message whose ``ack`` was ``n`` (call it for each)."""
        st = self._streams.get(stream_id)
        if st is None or self.closed:
            return
        st.queued = max(st.queued - 1, 0)
        if st.queued == 0:  # caught up: the message in progress need not wait any more
            n += st.partial
            st.partial = 0
        n = min(n, st.unacked)
        st.unacked -= n
        self._ack(stream_id, n)

    def release(self, stream_id: int) -> None:
        """The application is done with the stream: return its credit, forget it."""
        st = self._streams.pop(stream_id, None)
        if st is not None and st.unacked and not self.closed:
            self._ack(stream_id, st.unacked)
        forget_closed_stream(self._h2, stream_id)

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer lets us send on the stream now (0 if it is gone)."""
        try:
            return max(self._h2.local_flow_control_window(stream_id), 0)
        except h2.exceptions.ProtocolError:
            return 0

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # -- output ----------------------------------------------------------------------
    def send_data(self, stream_id: int, data: bytes | memoryview, end_stream: bool = False) -> int:
        """Send as much of ``data`` as the windows allow; return how much was sent.

        ``end_stream`` applies only if everything was sent. Raises StreamGone.
        """
        if self.closed or stream_id not in self._streams:
            raise StreamGone(stream_id)
        n = min(len(data), self.send_window(stream_id))
        if n == 0 and len(data):
            return 0
        conn = self._h2
        frame = conn.max_outbound_frame_size
        try:
            stream = conn._get_stream_by_id(stream_id)
            off = 0
            while True:
                chunk = data[off : min(off + frame, n)]
                off += len(chunk)
                send_data_fast(conn, stream, chunk, end_stream and off >= len(data))
                if off >= n:
                    break
        except h2.exceptions.ProtocolError as exc:
            raise StreamGone(stream_id) from exc
        self._on_sent_data()
        return n

    def _on_sent_data(self) -> None:
        """Hook for the server's ping policy."""

    def _send_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        if self.closed:
            raise StreamGone(stream_id)
        try:
            conn = self._h2
            done = (not end_stream and start_stream_fast(conn, stream_id, headers)) or (
                send_headers_fast(conn, stream_id, headers, end_stream)
            )
            if not done:
                conn.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise StreamGone(stream_id) from exc
        self._on_sent_data()

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM unless the stream is already closed; never raises."""
        st = self._streams.get(stream_id)
        if st is not None:
            st.discarding = st.reset = True
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, error_code)

    def ping(self, data: bytes) -> None:
        if not self.closed:
            self._h2.ping(data)

    def goaway(self, last_stream_id: int, error_code: int = 0, debug: bytes = b"") -> None:
        """Announce GOAWAY; the connection stays usable for streams <= last_stream_id."""
        if not self.closed:
            self.goaway_sent = last_stream_id
            self._h2.close_connection(error_code, debug or None, last_stream_id)

    def _goaway_raw(self, code: int, debug: bytes) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.close_connection(code, debug or None)

    @property
    def highest_inbound_stream_id(self) -> int:
        return int(self._h2.highest_inbound_stream_id)
