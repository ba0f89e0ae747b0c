"""Events of the sans-IO gRPC protocol core: keyword-only, one class each.

Plain slotted classes, not dataclasses: a ``@dataclass`` compiles its methods when its
module is imported (~0.5 ms each here), and every one-shot CLI command imports these
twelve (``benchmarks/cli.py``). Events are read-only by convention; they compare equal
when their class and fields are equal, which is what the tests rely on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._status import Metadata, StatusCode


class Event:
    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Event)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


class RequestReceived(Event):
    """Server: a valid gRPC request's headers (invalid ones were answered by the core)."""

    __slots__ = ("authority", "metadata", "method", "stream_id", "timeout")

    def __init__(self, *, stream_id: int, method: str, metadata: Metadata, timeout: float | None,
                 authority: str) -> None:
        self.stream_id = stream_id
        self.method = method
        self.metadata = metadata
        self.timeout = timeout
        self.authority = authority


class ResponseHeadersReceived(Event):
    """Client: the response's initial headers (HTTP 200, gRPC content-type)."""

    __slots__ = ("metadata", "stream_id")

    def __init__(self, *, stream_id: int, metadata: Metadata) -> None:
        self.stream_id = stream_id
        self.metadata = metadata


class MessageReceived(Event):
    """A whole message; call ``acknowledge(stream_id, ack)`` once it has been consumed."""

    __slots__ = ("ack", "data", "stream_id")

    def __init__(self, *, stream_id: int, data: bytes, ack: int) -> None:
        self.stream_id = stream_id
        self.data = data
        self.ack = ack


class StreamEnded(Event):
    """The peer half-closed the stream; no more messages will come."""

    __slots__ = ("stream_id",)

    def __init__(self, *, stream_id: int) -> None:
        self.stream_id = stream_id


class CallCompleted(Event):
    """Client: the call's final status (from trailers, Trailers-Only, HTTP status or RST)."""

    __slots__ = ("code", "message", "metadata", "stream_id")

    def __init__(self, *, stream_id: int, code: StatusCode, message: str, metadata: Metadata) -> None:
        self.stream_id = stream_id
        self.code = code
        self.message = message
        self.metadata = metadata


class StreamReset(Event):
    """The peer reset the stream (RST_STREAM with ``error_code``)."""

    __slots__ = ("error_code", "stream_id")

    def __init__(self, *, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class StreamFailed(Event):
    """A message on the stream was refused (too large, compressed, malformed).

    The rest of the stream's data is discarded (and its flow-control credit returned).
    """

    __slots__ = ("code", "message", "stream_id")

    def __init__(self, *, stream_id: int, code: StatusCode, message: str) -> None:
        self.stream_id = stream_id
        self.code = code
        self.message = message


class WindowUpdated(Event):
    """Send window grew; ``stream_id`` 0 means the connection window (wake every sender)."""

    __slots__ = ("stream_id",)

    def __init__(self, *, stream_id: int) -> None:
        self.stream_id = stream_id


class SettingsReceived(Event):
    """The peer's SETTINGS arrived (the first ones complete its connection preface)."""

    __slots__ = ()


class PingAcknowledged(Event):
    __slots__ = ("data",)

    def __init__(self, *, data: bytes) -> None:
        self.data = data


class GoAwayReceived(Event):
    """The peer will accept no stream above ``last_stream_id``."""

    __slots__ = ("debug", "error_code", "last_stream_id")

    def __init__(self, *, last_stream_id: int, error_code: int, debug: bytes) -> None:
        self.last_stream_id = last_stream_id
        self.error_code = error_code
        self.debug = debug


class ConnectionFailed(Event):
    """The connection is over: a protocol error (GOAWAY queued) or policy violation.

    Flush ``data_to_send()`` and close the transport.
    """

    __slots__ = ("error_code", "reason")

    def __init__(self, *, error_code: int, reason: str) -> None:
        self.error_code = error_code
        self.reason = reason
