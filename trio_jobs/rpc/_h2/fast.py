"""The fast session: the seam's interface (``session.py``) on h2's internals.

:class:`FastSession` keeps h2's state machines, windows and HPACK, and takes the common
frames past h2's per-frame machinery with the functions below. Everything here depends on
h2 internals; ``guard.py`` checks at import that they exist (else the pure session is
used, with one warning).


* :class:`_GoAwayTolerantStateMachine`: h2 refuses everything once any GOAWAY was sent or
  received, which makes a graceful shutdown impossible; this one keeps the connection open.
* :data:`_QUIET`: frame classes whose ``repr`` is O(1) (h2 computes it for every received
  frame, even with logging off).
* :func:`receive_data_fast`: h2's receipt of a DATA frame (flow control, stream state),
  for a frame :func:`data_fast_stream` found to be one that h2 would accept, without
  hyperframe's parsing and copies, h2's events and its per-frame logging: for a bulk
  stream that was most of the receiving side's Python time per message.
* :func:`receive_headers_fast`: h2's receipt of a header block on a stream it has (a
  response, trailers), for a frame :func:`headers_fast_stream` accepted: h2's own
  decoding and stream logic, without the frame objects and the connection-level
  dispatch (about half of what a unary call's two response blocks cost a client).
* :func:`data_frame_header`, :func:`send_headers_fast`, :func:`start_stream_fast`: h2's
  ``send_data`` and ``send_headers`` (a server's answer on an open stream, a client's new
  request stream), doing exactly h2's state-machine steps, checks and window accounting
  but writing the frame bytes directly (no frame objects, no header re-encoding, no
  per-call debug logging): those were a third of h2's cost per call.
  :func:`forget_closed_stream` does for one stream what h2's open-stream count does for
  all of them on every new stream (an O(n) walk, which the client's path skips).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import h2.connection
import h2.events
import h2.exceptions
from h2.connection import (
    AllowedStreamIDs,
    ConnectionInputs,
    ConnectionState,
    H2ConnectionStateMachine,
)
from h2.stream import StreamInputs, StreamState
from h2.utilities import authority_from_headers, extract_method_header
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from .session import frame_header

if TYPE_CHECKING:
    from h2.connection import H2Connection
    from h2.stream import H2Stream

_DATA: Final = 0x0
_HEADERS: Final = 0x1
_END_STREAM: Final = 0x1
_END_HEADERS: Final = 0x4
_PADDED: Final = 0x8
_PRIORITY: Final = 0x20
_CONN_OPEN: Final = frozenset({ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN})
_STREAM_RECEIVES: Final = frozenset({StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL})
_HPACK_WORST: Final = 4  # Huffman codes are at most 30 bits per byte
_SWEEP_EVERY: Final = 128  # client stream ids (odd): h2's full sweep every 64 streams


def data_frame_header(conn: H2Connection, stream: H2Stream, size: int, end_stream: bool) -> bytes:
    """h2's ``send_data`` for a DATA frame of ``size`` bytes without padding -- its checks,
    state transitions and window accounting -- returning the frame header instead of
    queueing anything: the caller sends the header, then the payload as it is."""
    window = min(conn.outbound_flow_control_window, stream.outbound_flow_control_window)
    if size > 0 and size > window:
        msg = f"Cannot send {size} bytes, flow control window is {window}"
        raise h2.exceptions.FlowControlError(msg)
    if size > conn.max_outbound_frame_size:
        msg = f"Cannot send frame size {size}, max frame size is {conn.max_outbound_frame_size}"
        raise h2.exceptions.FrameTooLargeError(msg)
    conn.state_machine.process_input(ConnectionInputs.SEND_DATA)
    stream.state_machine.process_input(StreamInputs.SEND_DATA)
    flags = 0
    if end_stream:
        stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
        flags = _END_STREAM
    stream.outbound_flow_control_window -= size
    conn.outbound_flow_control_window -= size
    return frame_header(size, _DATA, flags, stream.stream_id)


def data_fast_stream(conn: H2Connection, flags: int, stream_id: int, length: int) -> H2Stream | None:
    """The stream of a received DATA frame if h2 would accept the frame with no other
    effect than :func:`receive_data_fast`'s, else None (the frame goes to h2).

    That is: no padding (h2 strips and checks it), a connection and a stream that can
    receive DATA (h2's state machines: OPEN or HALF_CLOSED_LOCAL, headers received), no content-length to
    track (gRPC never sends one), and both receive windows large enough. Everything else
    -- stream 0, unknown, idle, closed or reset streams, a flow-control violation -- is
    left to h2, which answers it as it always did. The caller has checked the frame size
    against SETTINGS_MAX_FRAME_SIZE, and that no header block is in progress (where any
    other frame than CONTINUATION is a connection error).
    """
    if flags & _PADDED or conn.state_machine.state not in _CONN_OPEN:
        return None
    stream = conn.streams.get(stream_id)
    if (
        stream is None
        or stream.state_machine.state not in _STREAM_RECEIVES
        or not stream.state_machine.headers_received  # h2: "cannot receive data before headers"
        or stream._expected_content_length is not None
        or length > conn._inbound_flow_control_window_manager.current_window_size
        or length > stream._inbound_window_manager.current_window_size
    ):
        return None
    return stream


def receive_data_fast(conn: H2Connection, stream: H2Stream, length: int, end_stream: bool) -> None:
    """h2's ``_receive_data_frame`` for a frame that :func:`data_fast_stream` accepted:
    the same window accounting and state transitions, no events (the caller makes its
    own: the data, then the stream's end)."""
    conn._inbound_flow_control_window_manager.current_window_size -= length
    stream._inbound_window_manager.current_window_size -= length
    stream._actual_content_length += length
    if end_stream:
        stream.state_machine.process_input(StreamInputs.RECV_END_STREAM)


def _plain_block(conn: H2Connection, flags: int) -> bool:
    """A HEADERS frame holding a whole header block (END_HEADERS) without padding or
    priority, on a connection that can receive headers."""
    return (
        not flags & (_PADDED | _PRIORITY)
        and bool(flags & _END_HEADERS)
        and conn.state_machine.state in _CONN_OPEN
    )


def headers_fast_stream(conn: H2Connection, flags: int, stream_id: int) -> H2Stream | None:
    """The stream of a received HEADERS frame that :func:`receive_headers_fast` handles
    exactly as h2 would, else None (the frame goes to h2).

    That is: a whole header block in one frame (END_HEADERS) without padding or priority,
    on a stream h2 has that can receive headers (OPEN or HALF_CLOSED_LOCAL). What h2
    refuses there (trailers without END_STREAM, an undecodable block) it refuses in
    ``stream.receive_headers`` and ``_decode_headers``, which the fast path calls too. A new
    stream (a request) goes to h2, which checks the concurrent-stream limit and creates it.
    The caller has checked the frame size and that no header block is in progress.
    """
    if not _plain_block(conn, flags):
        return None
    stream = conn.streams.get(stream_id)
    if stream is None or stream.state_machine.state not in _STREAM_RECEIVES:
        return None
    return stream


def request_fast_ok(conn: H2Connection, flags: int, stream_id: int) -> bool:
    """True if a server's HEADERS frame opening a new stream can go to
    :func:`receive_headers_fast` (with no stream): one whole block without padding or
    priority, on an open connection, for a client stream id above every one seen (h2
    refuses lower ones in ways of its own), within SETTINGS_MAX_CONCURRENT_STREAMS as h2
    counts it (its ``open_inbound_streams``, which also moves closed streams out of its
    table, exactly as h2 does before each new stream)."""
    return (
        not conn.config.client_side
        and _plain_block(conn, flags)
        and stream_id % 2 == 1
        and stream_id > conn.highest_inbound_stream_id
        and conn.open_inbound_streams + 1 <= conn.local_settings.max_concurrent_streams
    )


def receive_headers_fast(
    conn: H2Connection, stream: H2Stream | None, stream_id: int, block: bytes, end_stream: bool
) -> list[h2.events.Event]:
    """h2's ``_receive_headers_frame`` for a frame :func:`headers_fast_stream` (``stream``)
    or :func:`request_fast_ok` (``None``: a new stream) accepted: the same decoding (h2's
    own ``_decode_headers``, its errors), connection and stream transitions, stream
    creation (``_begin_new_stream``) and events (``stream.receive_headers``). Raises h2's
    ProtocolError as h2 would (the caller then closes the connection the way h2 does)."""
    headers = h2.connection._decode_headers(conn.decoder, block)
    events = conn.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
    if stream is None:
        stream = conn._begin_new_stream(stream_id, AllowedStreamIDs.ODD)
    frames, stream_events = stream.receive_headers(headers, end_stream, conn.config.header_encoding)
    assert not frames  # receive_headers never answers with frames
    return events + stream_events


def send_headers_fast(
    conn: H2Connection, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool
) -> bool:
    """A server's ``conn.send_headers`` on an open stream, same effects; False = not done.

    Only for a stream h2 has and a block that surely fits one frame (no CONTINUATION);
    otherwise nothing is changed and the caller uses h2. Same order as h2: the state
    transitions before the (irreversible) HPACK encoding, the trailers check after.
    Never for informational (1xx) responses, which gRPC does not send.
    """
    stream = conn.streams.get(stream_id)
    if stream is None or conn.config.client_side:
        return False
    if _too_big_for_one_frame(conn, headers):
        return False
    conn.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
    stream.state_machine.process_input(StreamInputs.SEND_HEADERS)
    block = conn.encoder.encode(headers)
    flags = _END_HEADERS
    if end_stream:
        stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
        flags |= _END_STREAM
    if stream.state_machine.trailers_sent and not end_stream:
        raise h2.exceptions.ProtocolError("Trailers must have END_STREAM set.")
    out = conn._data_to_send
    out += frame_header(len(block), _HEADERS, flags, stream_id)
    out += block
    return True


def start_stream_fast(
    conn: H2Connection, stream_id: int, headers: list[tuple[bytes, bytes]]
) -> bool:
    """A client's ``conn.send_headers(stream_id, headers)`` opening a new stream (no
    END_STREAM), same effects; False = not done, nothing changed (use h2).

    Skips h2's count of open outbound streams against the server's limit: the caller
    must have checked it (``ClientProtocol.stream_slots_free`` counts every stream not
    released yet, never fewer than h2). h2 also drops closed streams during that count;
    :func:`forget_closed_stream` does it at release, and every ``_SWEEP_EVERY`` streams
    h2's own walk runs once, for a stream released before it closed.
    """
    if not conn.config.client_side or stream_id in conn.streams:
        return False
    if _too_big_for_one_frame(conn, headers):
        return False
    if stream_id % _SWEEP_EVERY == 1:
        _ = conn.open_outbound_streams  # h2's sweep of closed streams
    conn.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
    stream = conn._begin_new_stream(stream_id, AllowedStreamIDs.ODD)
    stream.state_machine.process_input(StreamInputs.SEND_HEADERS)
    block = conn.encoder.encode(headers)
    stream._authority = authority_from_headers(headers)
    stream.request_method = extract_method_header(headers)
    out = conn._data_to_send
    out += frame_header(len(block), _HEADERS, _END_HEADERS, stream_id)
    out += block
    return True


def forget_closed_stream(conn: H2Connection, stream_id: int) -> None:
    """Drop a closed stream from h2's table the way h2's open-stream count does."""
    stream = conn.streams.get(stream_id)
    if stream is not None and stream.closed:
        del conn.streams[stream_id]
        conn._closed_streams[stream_id] = stream.closed_by


def _too_big_for_one_frame(conn: H2Connection, headers: list[tuple[bytes, bytes]]) -> bool:
    size = sum(len(n) + len(v) for n, v in headers) * _HPACK_WORST + 16 * len(headers)
    return size > conn.max_outbound_frame_size


class _GoAwayTolerantStateMachine(H2ConnectionStateMachine):
    _transitions = {  # noqa: RUF012 (h2's own table is a plain class attribute)
        **H2ConnectionStateMachine._transitions,
        **{
            (state, inp): (None, state)
            for state in (
                ConnectionState.IDLE,
                ConnectionState.CLIENT_OPEN,
                ConnectionState.SERVER_OPEN,
            )
            for inp in (ConnectionInputs.SEND_GOAWAY, ConnectionInputs.RECV_GOAWAY)
        },
    }


def _quiet_repr(frame: Frame) -> str:
    return f"{type(frame).__name__}(stream_id={frame.stream_id})"


# Received frames are re-classed to subclasses whose repr is O(1): h2 computes
# ``repr(frame)`` for its trace log on every received frame, even with logging off, and
# hyperframe's reprs serialize and hex-encode the body (for DATA three extra passes over
# every byte received, ~15% of a bulk stream's CPU; for HEADERS ~3% of a unary call's).
_QUIET: Final[dict[type[Frame], type[Frame]]] = {
    cls: type(f"Quiet{cls.__name__}", (cls,), {"__repr__": _quiet_repr})
    for cls in (
        DataFrame, HeadersFrame, ContinuationFrame, SettingsFrame, WindowUpdateFrame,
        PingFrame, RstStreamFrame, GoAwayFrame, PriorityFrame, PushPromiseFrame,
    )
}  # fmt: skip
