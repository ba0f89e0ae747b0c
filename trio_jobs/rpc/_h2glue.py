"""Adaptations of h2 for gRPC, used by :class:`~trio_jobs.rpc._protocol.GrpcProtocol`.

* :class:`_GoAwayTolerantStateMachine`: h2 refuses everything once any GOAWAY was sent or
  received, which makes a graceful shutdown impossible; this one keeps the connection open.
* :data:`_QUIET`: frame classes whose ``repr`` is O(1) (h2 computes it for every received
  frame, even with logging off).
* :class:`_FrameBuffer`: refuses an oversized frame at its header, lets the protocol
  skip h2 for bytes that cannot complete a frame, and hands h2 at most a budget of
  frames per call.
"""

from __future__ import annotations

from typing import Final

import h2.exceptions
from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine
from h2.frame_buffer import FrameBuffer
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
