"""The seam on h2's internals: :class:`FastSession` (interface: ``session.py``).

Receiving: the connection's bytes stay in one buffer (``frames.FrameBuffer``, which the
transport decrypts into and which is h2's ``incoming_buffer``). A whole DATA frame on an
open stream, a response/trailers block on a stream h2 has and a request opening a new
stream within the limits are taken here ("fast frames", ``fast.py``), every other frame
by h2, which stops at the next fast frame (``FrameBuffer.fast_frame``). The frame budget
counts both kinds. Header blocks are decoded by memoised HPACK (``hpack.py``) and checked
by ``hpack.HeaderChecker`` when the protocol dispatches them (:meth:`check_headers`), as
h2's own inbound validation would, in the same order.

Sending: DATA frames are a header (h2's accounting, ``fast.data_frame_header``) plus the
caller's payload pieces, never copied; HEADERS of a server's answer and a client's new
stream are encoded without h2's frame objects; everything else is h2's.

GOAWAY: h2 closes its connection state on any GOAWAY; the connection gets a state machine
whose GOAWAY transitions keep it open (``fast._GoAwayTolerantStateMachine``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Final

import h2.connection
import h2.events
import h2.exceptions

from .fast import (
    _QUIET,
    _GoAwayTolerantStateMachine,
    data_fast_stream,
    data_frame_header,
    forget_closed_stream,
    headers_fast_stream,
    receive_data_fast,
    receive_headers_fast,
    request_fast_ok,
    send_headers_fast,
    start_stream_fast,
)
from .frames import FrameBuffer
from .hpack import HeaderChecker, MemoDecoder, MemoEncoder
from .session import BoundedH2Connection, Data, Event, Failed, Session, h2_config, stream_ended

if TYPE_CHECKING:
    from collections.abc import Sequence

    from h2.stream import H2Stream

_DATA: Final = 0x0
_HEADERS: Final = 0x1
_END_STREAM: Final = 0x1

class FastSession(Session):
    """One HTTP/2 connection on h2's internals (module docstring)."""

    fast: ClassVar[bool] = True

    def _new_connection(self, client_side: bool, max_header_list_size: int) -> h2.connection.H2Connection:
        # h2's inbound checks run in check_headers() instead, memoised (HeaderChecker).
        conn = BoundedH2Connection(h2_config(client_side, inbound_checks=False))
        conn.state_machine = _GoAwayTolerantStateMachine()
        conn.encoder = MemoEncoder()
        conn.decoder = MemoDecoder(conn.DEFAULT_MAX_HEADER_LIST_SIZE)
        self._frames = FrameBuffer(server=not client_side, max_frame_size=self.max_frame_size)
        self._frames.fast_frame = self._fast_frame_ok
        conn.incoming_buffer = self._frames
        table = conn._frame_dispatch_table
        for cls, quiet in _QUIET.items():
            table[quiet] = table[cls]
        self._headers = HeaderChecker(client_side=client_side)
        return conn

    def check_headers(self, event: h2.events.Event) -> None:
        event.headers = self._headers.check(event)  # type: ignore[attr-defined]

    # -- output --------------------------------------------------------------------------
    def _drain_h2(self) -> None:
        conn = self.conn
        pending = conn._data_to_send
        if pending:
            conn._data_to_send = bytearray()  # handed over as it is: no copy
            self._out.append(pending)
            self.output_bytes += len(pending)

    def has_output(self) -> bool:
        return bool(self._out) or bool(self.conn._data_to_send)

    def pending_bytes(self) -> int:
        return self.output_bytes + len(self.conn._data_to_send)

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        conn = self.conn
        done = (not end_stream and start_stream_fast(conn, stream_id, headers)) or (
            send_headers_fast(conn, stream_id, headers, end_stream)
        )
        if not done:
            conn.send_headers(stream_id, headers, end_stream=end_stream)

    def send_data(self, stream_id: int, parts: Sequence[memoryview], end_stream: bool) -> int:
        total = sum(map(len, parts))
        n = min(total, self.send_window(stream_id))
        if n == 0 and total:
            return 0
        conn = self.conn
        frame = conn.max_outbound_frame_size
        stream = conn._get_stream_by_id(stream_id)
        self._drain_h2()
        out = self._out
        part, at, off = 0, 0, 0  # the next byte: parts[part][at], the off-th of all
        while True:
            size = min(frame, n - off)
            header = data_frame_header(conn, stream, size, end_stream and off + size >= total)
            out.append(header)
            left = size
            while left:
                piece = parts[part]
                take = min(len(piece) - at, left)
                out.append(piece[at : at + take])
                at += take
                left -= take
                if at == len(piece):
                    part, at = part + 1, 0
            self.output_bytes += 9 + size
            off += size
            if off >= n:
                return n

    def goaway(self, last_stream_id: int, error_code: int = 0, debug: bytes = b"") -> None:
        self.conn.close_connection(error_code, debug or None, last_stream_id)

    def forget(self, stream_id: int) -> None:
        forget_closed_stream(self.conn, stream_id)

    # -- input ---------------------------------------------------------------------------
    @property
    def input_pending(self) -> bool:
        return self._frames.budget_exhausted

    def receive_buffer(self, n: int) -> memoryview:
        return self._frames.reserve(n)

    def received(self, n: int) -> list[Event]:
        try:
            self._frames.commit(n)
        except h2.exceptions.ProtocolError as exc:  # a bad preface: no GOAWAY queued yet
            return [Failed(int(exc.error_code), str(exc), goaway_queued=False)]
        return self._process()

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        try:
            self._frames.add_data(data)
        except h2.exceptions.ProtocolError as exc:
            return [Failed(int(exc.error_code), str(exc), goaway_queued=False)]
        return self._process()

    def _process(self) -> list[Event]:
        """The frames received so far, within the frame budget: fast frames here, in
        place; the rest by h2."""
        buffer = self._frames
        buffer.frame_budget = self.frames_per_call
        buffer.budget_exhausted = False
        conn = self.conn
        out: list[Event] = []
        while True:
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
                elif not self._receive_headers(stream, sid, length, flags, out):
                    return out
                continue
            # h2's turn: it takes frames up to the next fast one, the end or the budget.
            buffer.at_fast_frame = False
            pending = len(conn._data_to_send)
            try:
                out.extend(conn.receive_data(b""))
            except h2.exceptions.ProtocolError as exc:
                # h2 queued GOAWAY(error_code) itself (unless it had nothing to say).
                queued = len(conn._data_to_send) > pending
                reason = str(exc) or type(exc).__name__
                out.append(Failed(int(exc.error_code), reason, goaway_queued=queued))
                return out
            if not buffer.at_fast_frame:  # the end of the input, or the budget
                return out

    def _fast_target(self, kind: int, flags: int, sid: int, length: int) -> H2Stream | bool | None:
        """For a whole frame at the head: the h2 stream a DATA or HEADERS frame that we take
        ourselves goes to, False for HEADERS opening a request we take ourselves, None for a
        frame that h2 must handle."""
        conn = self.conn
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

    def _receive_headers(
        self, stream: H2Stream | None, sid: int, length: int, flags: int, out: list[Event]
    ) -> bool:
        """A whole HEADERS frame at the head that ``headers_fast_stream`` (or, for a new
        stream, ``request_fast_ok``) accepted: h2's decoding and stream logic without its
        frame objects; errors close the connection as h2 does (GOAWAY with their code).
        False if the connection failed."""
        buffer = self._frames
        at = buffer.start + 9
        block = bytes(buffer.buf[at : at + length])
        buffer.consume(9 + length)
        try:
            out.extend(receive_headers_fast(self.conn, stream, sid, block, bool(flags & _END_STREAM)))
        except h2.exceptions.ProtocolError as exc:
            self.conn._terminate_connection(exc.error_code)
            out.append(Failed(int(exc.error_code), str(exc) or type(exc).__name__, goaway_queued=True))
            return False
        return True

    def _receive_fast(self, stream: H2Stream, sid: int, length: int, flags: int, out: list[Event]) -> None:
        """A whole DATA frame at the head that ``data_fast_stream`` accepted: h2's state
        effects, then its payload as a view of the buffer (valid until the next input)."""
        buffer = self._frames
        ended = bool(flags & _END_STREAM)
        receive_data_fast(self.conn, stream, length, ended)
        at = buffer.start + 9
        out.append(Data(sid, memoryview(buffer.buf)[at : at + length], length))
        buffer.consume(9 + length)
        if ended:
            out.append(stream_ended(sid))
