"""Adaptations of h2 for gRPC, used by :class:`~trio_jobs.rpc._protocol.GrpcProtocol`.

* :class:`_GoAwayTolerantStateMachine`: h2 refuses everything once any GOAWAY was sent or
  received, which makes a graceful shutdown impossible; this one keeps the connection open.
* :data:`_QUIET`: frame classes whose ``repr`` is O(1) (h2 computes it for every received
  frame, even with logging off).
* :class:`_FrameBuffer`: refuses an oversized frame at its header, lets the protocol
  skip h2 for bytes that cannot complete a frame, and hands h2 at most a budget of
  frames per call.
* :func:`send_data_fast`, :func:`send_headers_fast`, :func:`start_stream_fast`: h2's
  ``send_data`` and ``send_headers`` (a server's answer on an open stream, a client's new
  request stream), doing exactly h2's state-machine steps, checks and window accounting
  but writing the frame bytes directly (no frame objects, no header re-encoding, no
  per-call debug logging): those were a third of h2's cost per call.
  :func:`forget_closed_stream` does for one stream what h2's open-stream count does for
  all of them on every new stream (an O(n) walk, which the client's path skips).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

import h2.exceptions
from h2.connection import (
    AllowedStreamIDs,
    ConnectionInputs,
    ConnectionState,
    H2ConnectionStateMachine,
)
from h2.frame_buffer import FrameBuffer
from h2.stream import StreamInputs
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

if TYPE_CHECKING:
    from h2.connection import H2Connection
    from h2.stream import H2Stream

_FRAME_HEADER: Final = struct.Struct(">HBBBI")  # 24-bit length (as H + B), type, flags, id
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_END_STREAM: Final = 0x1
_END_HEADERS: Final = 0x4
_HPACK_WORST: Final = 4  # Huffman codes are at most 30 bits per byte
_SWEEP_EVERY: Final = 128  # client stream ids (odd): h2's full sweep every 64 streams


def _frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


def send_data_fast(
    conn: H2Connection, stream: H2Stream, data: bytes | memoryview, end_stream: bool
) -> None:
    """``conn.send_data(stream.stream_id, data, end_stream)`` without padding, same effects.

    Raises what h2 raises (FlowControlError, FrameTooLargeError, a state-machine
    ProtocolError), before changing anything, like h2.
    """
    size = len(data)
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
    out = conn._data_to_send
    out += _frame_header(size, _DATA, flags, stream.stream_id)
    out += data
    conn.outbound_flow_control_window -= size


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
    out += _frame_header(len(block), _HEADERS, flags, stream_id)
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
    out += _frame_header(len(block), _HEADERS, _END_HEADERS, stream_id)
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


class _FrameBuffer(FrameBuffer):
    """h2's frame buffer, plus two things for large DATA over TLS (16 KiB records), and
    a frame budget against floods.

    * A frame header announcing more than our SETTINGS_MAX_FRAME_SIZE is refused as soon
      as it arrives; h2 would first buffer the whole frame (up to 16 MiB) to refuse it.
    * :meth:`completes_nothing` lets the protocol append bytes that cannot complete a
      frame without running all of h2's receive machinery for them.
    * :attr:`frame_budget` caps the frames h2 takes per ``receive_data``; when it ran out,
      :attr:`budget_exhausted` is set and the rest of the bytes stay buffered.
    """

    # Frames h2 may take from the buffer in one receive_data() call; the rest wait for
    # the next call (see GrpcProtocol.receive_data and Transport.reader).
    frame_budget: int | None = None
    budget_exhausted = False

    def __next__(self) -> Frame:
        if self.frame_budget is not None:
            if self.frame_budget <= 0:
                self.budget_exhausted = True
                raise StopIteration
            self.frame_budget -= 1
        data = self._data
        if len(data) >= 9:
            length = int.from_bytes(data[:3], "big")
            if length > self.max_frame_size:
                msg = f"Received overlong frame: length {length}, max {self.max_frame_size}"
                raise h2.exceptions.FrameTooLargeError(msg)
        frame = super().__next__()
        quiet = _QUIET.get(type(frame))
        if quiet is not None:
            frame.__class__ = quiet
        return frame

    def completes_nothing(self, n: int) -> bool:
        """True if ``n`` more bytes cannot complete the frame being received."""
        if self._preamble_len:
            return False
        data = self._data
        if len(data) < 9:
            return len(data) + n < 9
        length = int.from_bytes(data[:3], "big")
        return length <= self.max_frame_size and len(data) + n < 9 + length
