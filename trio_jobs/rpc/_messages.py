"""gRPC message framing: a 5-byte prefix (compressed flag, 4-byte big-endian length).

:class:`MessageDecoder` is fed DATA payloads split at arbitrary boundaries and returns
whole messages. It never buffers more than one message of at most ``max_message`` bytes:
an oversized length prefix is reported as soon as the prefix is complete, before any of
the body is stored, and the rest of the stream is then discarded.
"""

from __future__ import annotations

import struct
from typing import Final, final

_PREFIX: Final = struct.Struct(">BI")
PREFIX_SIZE: Final = 5


class FramingError(Exception):
    """A malformed or refused message; ``too_large`` tells RESOURCE_EXHAUSTED apart."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def encode_message(payload: bytes) -> bytes:
    """Prefix an uncompressed message."""
    return _PREFIX.pack(0, len(payload)) + payload


@final
class MessageDecoder:
    """Incremental decoder for one direction of one stream."""

    __slots__ = ("_buf", "_failed", "_need", "max_message")

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._need = -1  # body length once the prefix is parsed, -1 before
        self._failed = False

    @property
    def pending(self) -> int:
        """Bytes held of an incomplete message (bounded by ``max_message + 5``)."""
        return len(self._buf)

    def feed(self, data: bytes | memoryview) -> list[bytes]:
        """Consume ``data``; return the messages it completed.

        Raises FramingError on a compressed flag (no encoding is negotiated), an unknown
        flag, or a length over ``max_message``; after that every call raises again.
        """
        if self._failed:
            raise FramingError("stream already failed")
        out: list[bytes] = []
        buf = self._buf
        view = memoryview(data)
        # Fast path: nothing buffered, whole messages directly from the view.
        while True:
            if self._need < 0:
                if not buf and len(view) >= PREFIX_SIZE:
                    flag, length = _PREFIX.unpack_from(view)
                    self._check(flag, length)
                    end = PREFIX_SIZE + length
                    if len(view) >= end:
                        out.append(bytes(view[PREFIX_SIZE:end]))
                        view = view[end:]
                        continue
                    self._need = length
                    buf += view[PREFIX_SIZE:]
                    return out
                take = PREFIX_SIZE - len(buf)
                buf += view[:take]
                view = view[take:]
                if len(buf) < PREFIX_SIZE:
                    return out
                flag, length = _PREFIX.unpack_from(buf)
                self._check(flag, length)
                buf.clear()
                self._need = length
            take = self._need - len(buf)
            buf += view[:take]
            view = view[take:]
            if len(buf) < self._need:
                return out
            out.append(bytes(buf))
            buf.clear()
            self._need = -1
            if not view:
                return out

    def _check(self, flag: int, length: int) -> None:
        if flag == 1:
            self._failed = True
            raise FramingError("compressed message but no grpc-encoding was negotiated")
        if flag != 0:
            self._failed = True
            raise FramingError(f"invalid message flag {flag}")
        if length > self.max_message:
            self._failed = True
            raise FramingError(
                f"message of {length} bytes exceeds the limit of {self.max_message}",
                too_large=True,
            )

    def at_boundary(self) -> bool:
        """True when no partial message is held (a stream may end here)."""
        return self._need < 0 and not self._buf
