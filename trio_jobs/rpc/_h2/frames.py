"""The receive buffer of a connection, and h2's frame splitting on top of it.

Theory of operation
-------------------
h2 takes received bytes with ``receive_data(bytes)`` and appends them to a ``bytearray``
of its own. Over TLS that cost a bulk stream three extra passes over every byte (TLS
records joined into one object, appended to h2's buffer, sliced out again per frame),
and those copies were the largest single cost of a streaming client here (py-spy:
``memmove`` ~24% of its samples). :class:`FrameBuffer` keeps the bytes in one buffer that
the transport decrypts *into* (``reserve`` + ``commit``, like asyncio's
``BufferedProtocol``), and the protocol reads DATA payloads in place (views of the
buffer, copied once into the message that leaves the protocol).

For h2 it is still its ``incoming_buffer``: h2 iterates it for frames as before, and gets
hyperframe frames parsed from copies of their bytes (so no frame object ever holds a
view of the buffer, which is compacted and reused). In addition:

* a frame header announcing more than our SETTINGS_MAX_FRAME_SIZE is refused as soon as
  it arrives (h2 would first buffer the whole frame, up to 16 MiB);
* :attr:`frame_budget` caps the frames h2 takes per ``receive_data``; when it runs out,
  :attr:`budget_exhausted` is set and the rest of the bytes stay buffered;
* :attr:`fast_frame` stops h2 at a whole frame that the protocol takes itself (DATA and
  HEADERS that ``fast.py`` handles as h2 would); :attr:`at_fast_frame` tells it so.

Memory: the buffer holds what was received and not consumed yet (at most a frame plus a
read); when it empties, a buffer much larger than the last read is let go, so an idle
connection does not keep the capacity of its largest burst.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import h2.exceptions
import h2.frame_buffer
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import Frame

from .fast import _QUIET
from .session import parse_frame_header

if TYPE_CHECKING:
    from collections.abc import Callable

_NEEDS_STREAM: Final = frozenset({0x0, 0x1, 0x2, 0x3, 0x5, 0x9})  # DATA HEADERS PRIORITY RST PUSH CONT.
_NO_STREAM: Final = frozenset({0x4, 0x6, 0x7})  # SETTINGS PING GOAWAY
_KEEP: Final = 64 * 1024
"""Capacity an empty buffer always may keep (larger ones only while reads are as large)."""


class FrameBuffer(h2.frame_buffer.FrameBuffer):
    """Received bytes for one connection and the frames in them (module docstring).

    ``buf[start:end]`` are the bytes received and not consumed; bytes are added with
    :meth:`add_data` (a copy) or written in place into :meth:`reserve` then
    :meth:`commit`\\ ted. h2's own ``_data`` is not used.
    """

    frame_budget: int | None = None
    budget_exhausted = False
    fast_frame: Callable[[int, int, int, int], bool] | None = None
    """(type, flags, stream_id, length) of a whole frame at the head -> True: leave it."""
    at_fast_frame = False

    def __init__(self, *, server: bool, max_frame_size: int) -> None:
        super().__init__(server=server)
        self.max_frame_size = max_frame_size
        self.buf = bytearray()
        self.start = 0
        self.end = 0
        self._last_reserve = 0

    # -- storage ---------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Bytes received and not consumed yet."""
        return self.end - self.start

    def reserve(self, n: int) -> memoryview:
        """A writable view of ``n`` bytes after the received ones; :meth:`commit` what
        was written. The view must be released before the next call on this buffer."""
        self._last_reserve = n
        buf = self.buf
        if len(buf) - self.end < n:
            size = self.end - self.start
            if len(buf) - size < n:  # grow, with room for another read: compact less often
                new = bytearray(size + 2 * n)
                new[:size] = memoryview(buf)[self.start : self.end]
                self.buf = buf = new
            elif size:  # move the unconsumed bytes (at most a frame) to the front
                with memoryview(buf) as view:
                    view[:size] = view[self.start : self.end]  # a memmove
            self.start, self.end = 0, size
        return memoryview(buf)[self.end : self.end + n]

    def commit(self, n: int) -> None:
        """``n`` bytes were written at the start of the last :meth:`reserve`\\ d view."""
        self.end += n
        if self._preamble_len and n:
            self._check_preamble()

    def add_data(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        if not data:
            return
        n = len(data)
        with self.reserve(n) as view:
            view[:] = data
        self.commit(n)

    def consume(self, n: int) -> None:
        """The first ``n`` pending bytes were used."""
        self.start += n
        if self.start >= self.end:
            self.start = self.end = 0
            if len(self.buf) > max(_KEEP, 4 * self._last_reserve):
                self.buf = bytearray()

    def _check_preamble(self) -> None:
        """Match (and drop) the client's connection preface as it arrives (server)."""
        take = min(self._preamble_len, self.end - self.start)
        got = bytes(self.buf[self.start : self.start + take])
        if got != self._preamble[:take]:
            msg = "Invalid HTTP/2 preamble."
            raise h2.exceptions.ProtocolError(msg)
        self._preamble = self._preamble[take:]
        self._preamble_len -= take
        self.consume(take)

    def spend_budget(self) -> bool:
        """Count one frame against :attr:`frame_budget`; False (and
        :attr:`budget_exhausted` set) once it has run out."""
        if self.frame_budget is None:
            return True
        if self.frame_budget <= 0:
            self.budget_exhausted = True
            return False
        self.frame_budget -= 1
        return True

    # -- frames for h2 -----------------------------------------------------------------
    def head_is_valid(self, kind: int, stream_id: int) -> bool:
        """False for a frame header that h2 refuses as soon as it arrives: a frame type
        that needs a stream on stream 0, or one of the connection's on a stream."""
        if kind in _NEEDS_STREAM:
            return stream_id != 0
        return kind not in _NO_STREAM or stream_id == 0

    def head(self) -> tuple[int, int, int, int] | None:
        """``(length, type, flags, stream_id)`` of the frame at the head, or None before
        its 9 header bytes are in."""
        if self.end - self.start < 9:
            return None
        return parse_frame_header(self.buf, self.start)

    def __next__(self) -> Frame:
        head = self.head()
        if head is None:
            raise StopIteration
        length, kind, flags, sid = head
        at = self.start
        whole = self.end - at >= 9 + length
        if (
            whole
            and length <= self.max_frame_size
            and self.fast_frame is not None
            and not self._headers_buffer
            and self.fast_frame(kind, flags, sid, length)  # (only for a stream h2 has: sid > 0)
        ):
            self.at_fast_frame = True
            raise StopIteration
        try:  # as h2 does: a bad header is refused before its body is in
            frame, _ = Frame.parse_frame_header(memoryview(bytes(self.buf[at : at + 9])))
        except (InvalidDataError, InvalidFrameError) as err:
            msg = f"Received frame with invalid header: {err!s}"
            raise h2.exceptions.ProtocolError(msg) from err
        if length > self.max_frame_size:  # (h2 waits for the whole frame to refuse it)
            msg = f"Received overlong frame: length {length}, max {self.max_frame_size}"
            raise h2.exceptions.FrameTooLargeError(msg)
        if not whole:
            raise StopIteration
        if not self.spend_budget():
            raise StopIteration
        body = bytes(self.buf[at + 9 : at + 9 + length])
        self.consume(9 + length)
        try:
            frame.parse_body(memoryview(body))
        except InvalidDataError as err:
            msg = "Received frame with non-compliant data"
            raise h2.exceptions.ProtocolError(msg) from err
        except InvalidFrameError as err:
            msg = "Frame data missing or invalid"
            raise h2.exceptions.FrameDataMissingError(msg) from err
        quiet = _QUIET.get(type(frame))
        if quiet is not None:
            frame.__class__ = quiet
        new_frame = self._update_header_buffer(frame)
        # A frame h2 does not see (the start or middle of a header block): the next.
        return new_frame if new_frame is not None else self.__next__()
