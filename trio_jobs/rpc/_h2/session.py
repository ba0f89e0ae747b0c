"""The h2 seam's interface, and its pure implementation: h2's public API only.

:class:`Session` is everything the gRPC protocol (``rpc/_protocol.py``) asks of an HTTP/2
connection; nothing outside ``rpc/_h2/`` holds an h2 connection or touches h2's internals
(the protocol modules use h2's public event classes, exceptions and ``ErrorCodes``).
Subclass ``fast_session.FastSession`` does the same with h2's internals (faster); this one is
what ``TRIO_JOBS_RPC_FAST_PATHS=0`` and an h2 that failed the version guard use.

Interface (both sessions)
-------------------------
Made with ``client_side``, our SETTINGS (``max_concurrent_streams``,
``max_header_list_size``, ``stream_window``, ``connection_window``, ``max_frame_size``) and
``frames_per_call`` (settable); ``fast`` says which session it is. ``initiate()`` queues the
preface and SETTINGS and opens the connection window.

Input:

* ``receive_buffer(n)`` -> a writable view for up to ``n`` received bytes, then
  ``received(k)`` for the ``k`` written into it; or ``receive_data(bytes)`` (a copy).
  Both return a list of events, at most ``frames_per_call`` frames' worth; while
  :attr:`input_pending` is true, call ``receive_data(b"")`` again after letting others run.
* Events are h2's public event classes, plus :class:`Data` (a DATA payload: ``data`` may
  be a view of the receive buffer, valid until the next input call) and :class:`Failed`
  (a connection error; the GOAWAY that says so is already queued when h2 sends one).
  A GOAWAY received is ``h2.events.ConnectionTerminated`` and never closes the session:
  streams at or below its last stream id go on (graceful shutdown).

Output (queued, never written: ``take_output()`` hands over the pieces):

* ``send_headers(sid, headers, end_stream)``, ``send_data(sid, parts, end_stream) -> n``
  (what the windows allow, as frames of at most the peer's frame size), ``reset_stream``,
  ``ping``, ``goaway(last_stream_id, code, debug)`` (the connection stays usable),
  ``fail(code, debug)`` (a fatal GOAWAY), ``acknowledge(sid, n)`` (return flow-control
  credit), ``forget(sid)`` (the protocol is done with a stream).
* ``take_output()`` -> the bytes to send as a list of pieces (bytes or views of the
  caller's immutable bytes: the payload of ``send_data`` is not copied by the fast
  session); ``has_output()``, ``pending_bytes()`` (queued, not taken yet).
* ``check_headers(event)``: validate a received header event (the fast session turns h2's
  own inbound validation off and does it here, memoised; the pure one has nothing to do).

State: ``send_window(sid)``, ``next_stream_id()`` (client), ``peer_max_concurrent_streams``,
``highest_inbound_stream_id``, ``input_pending``.

h2's ``ProtocolError`` (and subclasses) is what the send methods raise for a stream that
cannot take the frame.
"""

from __future__ import annotations

import contextlib
import struct
from typing import TYPE_CHECKING, Any, ClassVar, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes

if TYPE_CHECKING:
    from collections.abc import Sequence

Piece = bytes | bytearray | memoryview

DEFAULT_WINDOW: Final = 65_535
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HEADER: Final = struct.Struct(">HBBBI")
_GOAWAY: Final = 0x7
_HEADERS: Final = 0x1
_PUSH_PROMISE: Final = 0x5
_CONTINUATION: Final = 0x9
_END_HEADERS: Final = 0x4
_STREAM_ID_MASK: Final = 0x7FFF_FFFF


CLOSED_STREAMS_KEPT: Final = 1024
"""Closed streams h2 remembers per connection (to tell a late frame on a stream that was
reset, which is ignored, from one on a stream that ended normally). h2 keeps 65,536, ~300
bytes each on each side: a long-lived channel grew by ~20 MB over its first 65,536 calls, and
the server by as much for each such client. Late frames arrive within a round trip, during
which far fewer than this many streams close (at most 100 are open at once)."""


class BoundedH2Connection(h2.connection.H2Connection):
    """h2's connection remembering :data:`CLOSED_STREAMS_KEPT` closed streams (its public
    class constant ``MAX_CLOSED_STREAMS``; an h2 without it simply keeps its own)."""

    MAX_CLOSED_STREAMS = CLOSED_STREAMS_KEPT


def h2_config(client_side: bool, *, inbound_checks: bool) -> h2.config.H2Configuration:
    """h2's configuration for gRPC: bytes headers; ours are valid as built, so no outbound
    checks; inbound checks by h2 (the pure session) or by ``check_headers`` (fast)."""
    return h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=inbound_checks,
        normalize_inbound_headers=inbound_checks,
    )


class Data:
    """A DATA frame's payload for ``stream_id`` (``flow_controlled_length`` counts its
    padding too). ``data`` may be a view of the receive buffer: use it before the next
    input call."""

    __slots__ = ("data", "flow_controlled_length", "stream_id")

    def __init__(self, stream_id: int, data: bytes | memoryview, flow_controlled_length: int) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_controlled_length = flow_controlled_length


class Failed:
    """A connection error: nothing more will be received."""

    __slots__ = ("error_code", "goaway_queued", "reason")

    def __init__(self, error_code: int, reason: str, *, goaway_queued: bool) -> None:
        self.error_code = error_code
        self.reason = reason
        self.goaway_queued = goaway_queued


Event = h2.events.Event | Data | Failed


def stream_ended(stream_id: int) -> h2.events.StreamEnded:
    """h2's StreamEnded event (keyword-only since h2 4.2, attributes set before)."""
    try:
        return h2.events.StreamEnded(stream_id=stream_id)  # type: ignore[call-arg, unused-ignore]
    except TypeError:
        event = h2.events.StreamEnded()  # type: ignore[call-arg, unused-ignore]
        event.stream_id = stream_id
        return event


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


def parse_frame_header(data: bytes | bytearray | memoryview, at: int) -> tuple[int, int, int, int]:
    """``(length, type, flags, stream_id)`` of the frame header at ``data[at:at + 9]``."""
    hi, lo, kind, flags, sid = _HEADER.unpack_from(data, at)
    return (hi << 8) | lo, kind, flags, sid & _STREAM_ID_MASK


class Session:
    """One HTTP/2 connection on h2's public API (module docstring)."""

    fast: ClassVar[bool] = False

    def __init__(
        self,
        *,
        client_side: bool,
        max_concurrent_streams: int,
        max_header_list_size: int,
        stream_window: int,
        connection_window: int,
        max_frame_size: int,
        frames_per_call: int | None,
    ) -> None:
        self.client_side = client_side
        self.max_frame_size = max_frame_size
        self.frames_per_call = frames_per_call
        self._connection_window = connection_window
        self.conn = self._new_connection(client_side, max_header_list_size)
        settings: dict[h2.settings.SettingCodes, int] = {
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list_size,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame_size,
        }
        if client_side:
            settings[h2.settings.SettingCodes.ENABLE_PUSH] = 0
        # (h2's documented way to set the first SETTINGS: before initiate_connection)
        self.conn.local_settings = h2.settings.Settings(client=client_side, initial_values=settings)
        self.conn.max_inbound_frame_size = max_frame_size
        self.conn.decoder.max_header_list_size = max_header_list_size
        self._out: list[Piece] = []
        self.output_bytes = 0
        self.budget_exhausted = False
        # Pure input: whole frames are handed to h2 in batches (the frame budget, GOAWAY).
        self._in = bytearray()
        self._scratch = bytearray()
        self._preface_left = 0 if client_side else len(PREFACE)
        self._in_header_block = False

    def _new_connection(self, client_side: bool, max_header_list_size: int) -> h2.connection.H2Connection:
        return BoundedH2Connection(h2_config(client_side, inbound_checks=True))

    def check_headers(self, event: h2.events.Event) -> None:
        """Validate a received header event's headers (h2 did it already here)."""

    # -- output --------------------------------------------------------------------------
    def _drain_h2(self) -> None:
        """Move what h2 queued to the pieces (before a piece of ours: the order holds)."""
        data = self.conn.data_to_send()
        if data:
            self._out.append(data)
            self.output_bytes += len(data)

    def _append(self, piece: Piece) -> None:
        self._out.append(piece)
        self.output_bytes += len(piece)

    def take_output(self) -> list[Piece]:
        """Everything queued, in order, as pieces; the queue is empty afterwards."""
        self._drain_h2()
        out, self._out = self._out, []
        self.output_bytes = 0
        return out

    def has_output(self) -> bool:
        self._drain_h2()
        return bool(self._out)

    def pending_bytes(self) -> int:
        self._drain_h2()
        return self.output_bytes

    def initiate(self) -> None:
        """The preface/SETTINGS, and the connection receive window opened."""
        self.conn.initiate_connection()
        if self._connection_window > DEFAULT_WINDOW:
            self.conn.increment_flow_control_window(self._connection_window - DEFAULT_WINDOW)

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer lets us send on the stream now (0 if it is gone)."""
        try:
            return max(self.conn.local_flow_control_window(stream_id), 0)
        except h2.exceptions.ProtocolError:
            return 0

    def send_data(self, stream_id: int, parts: Sequence[memoryview], end_stream: bool) -> int:
        """Send what the windows allow of ``parts`` (in order) as DATA frames; the count.

        ``end_stream`` applies only if everything was sent.
        """
        total = sum(map(len, parts))
        n = min(total, self.send_window(stream_id))
        if n == 0 and total:
            return 0
        frame = self.conn.max_outbound_frame_size
        data = b"".join(parts)[:n] if len(parts) != 1 else bytes(parts[0][:n])
        off = 0
        while True:
            chunk = data[off : off + frame]
            off += len(chunk)
            self.conn.send_data(stream_id, chunk, end_stream=end_stream and off >= total)
            if off >= n:
                return n

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        self.conn.reset_stream(stream_id, error_code)

    def ping(self, data: bytes) -> None:
        self.conn.ping(data)

    def goaway(self, last_stream_id: int, error_code: int = 0, debug: bytes = b"") -> None:
        """Announce GOAWAY; the connection stays usable for streams <= last_stream_id.

        h2 closes its connection state on any GOAWAY; the pure session writes the frame
        itself so that it does not (h2 never learns of it)."""
        payload = struct.pack(">II", last_stream_id & _STREAM_ID_MASK, error_code) + debug
        self._drain_h2()
        self._append(frame_header(len(payload), _GOAWAY, 0, 0) + payload)

    def fail(self, error_code: int, debug: bytes = b"") -> None:
        """A fatal GOAWAY: nothing more is sent or received."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(error_code, debug or None)

    def acknowledge(self, stream_id: int, n: int) -> None:
        # h2 credits the connection window even when the stream is already closed.
        self.conn.acknowledge_received_data(n, stream_id)

    def forget(self, stream_id: int) -> None:
        """The protocol is done with the stream (h2 keeps its closed streams itself)."""

    def next_stream_id(self) -> int:
        return int(self.conn.get_next_available_stream_id())

    @property
    def peer_max_concurrent_streams(self) -> int:
        return int(self.conn.remote_settings.max_concurrent_streams)

    @property
    def highest_inbound_stream_id(self) -> int:
        return int(self.conn.highest_inbound_stream_id)

    # -- input ---------------------------------------------------------------------------
    @property
    def input_pending(self) -> bool:
        return self.budget_exhausted

    def receive_buffer(self, n: int) -> memoryview:
        if len(self._scratch) < n:
            self._scratch = bytearray(n)
        return memoryview(self._scratch)[:n]

    def received(self, n: int) -> list[Event]:
        return self.receive_data(memoryview(self._scratch)[:n])

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Whole frames from the input go to h2 in one batch, up to the frame budget; a
        GOAWAY is taken here (module docstring); a frame larger than our
        SETTINGS_MAX_FRAME_SIZE fails at its header, before its body is buffered."""
        self._in += data
        self.budget_exhausted = False
        budget = self.frames_per_call
        buf = self._in
        out: list[Event] = []
        at = self._preface_left  # (the preface goes to h2 with the first batch)
        if at and len(buf) < at:
            if bytes(buf) != PREFACE[: len(buf)]:
                return [self._refuse(ErrorCodes.PROTOCOL_ERROR, "Invalid HTTP/2 preamble.")]
            return out
        while len(buf) - at >= 9:
            length, kind, flags, sid = parse_frame_header(buf, at)
            if length > self.max_frame_size:
                self._feed(at, out)
                if not out or not isinstance(out[-1], Failed):
                    msg = f"Received overlong frame: length {length}, max {self.max_frame_size}"
                    out.append(self._refuse(ErrorCodes.FRAME_SIZE_ERROR, msg))
                return out
            if len(buf) - at < 9 + length:
                break
            if budget is not None:
                if budget <= 0:
                    self.budget_exhausted = True
                    break
                budget -= 1
            if kind == _GOAWAY and not self._in_header_block and sid == 0 and length >= 8:
                self._feed(at, out)
                if out and isinstance(out[-1], Failed):
                    return out
                out.append(self._goaway_event(bytes(buf[9 : 9 + length])))
                del buf[: 9 + length]
                at = 0
                continue
            if kind in (_HEADERS, _PUSH_PROMISE, _CONTINUATION):
                self._in_header_block = not flags & _END_HEADERS
            at += 9 + length
        self._feed(at, out)
        return out

    def _feed(self, end: int, out: list[Event]) -> None:
        """Hand ``_in[:end]`` to h2; its events (or its failure) to ``out``."""
        if not end or (out and isinstance(out[-1], Failed)):
            return
        chunk = bytes(self._in[:end])
        del self._in[:end]
        self._preface_left = max(0, self._preface_left - end)
        self._drain_h2()  # (so that what h2 queues now can be told apart)
        before = len(self._out), self.output_bytes
        try:
            out.extend(self.conn.receive_data(chunk))
        except h2.exceptions.ProtocolError as exc:
            self._drain_h2()
            queued = (len(self._out), self.output_bytes) != before
            out.append(Failed(int(exc.error_code), str(exc) or type(exc).__name__, goaway_queued=queued))

    def _refuse(self, code: int, reason: str) -> Failed:
        self.fail(code, reason.encode()[:128])
        return Failed(int(code), reason, goaway_queued=True)

    @staticmethod
    def _goaway_event(payload: bytes) -> h2.events.ConnectionTerminated:
        last, code = struct.unpack_from(">II", payload)
        event = h2.events.ConnectionTerminated()
        event.last_stream_id = last & _STREAM_ID_MASK
        event.error_code = _error_code(code)
        event.additional_data = payload[8:]
        return event


def _error_code(code: int) -> Any:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code
