"""Events of the sans-IO gRPC protocol core: frozen, keyword-only, one class each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._status import Metadata, StatusCode


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    pass


@dataclass(frozen=True, kw_only=True, slots=True)
class RequestReceived(Event):
    """Server: a valid gRPC request's headers (invalid ones were answered by the core)."""

    stream_id: int
    method: str
    metadata: Metadata
    timeout: float | None
    authority: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ResponseHeadersReceived(Event):
    """Client: the response's initial headers (HTTP 200, gRPC content-type)."""

    stream_id: int
    metadata: Metadata


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageReceived(Event):
    """A whole message; call ``acknowledge(stream_id, ack)`` once it has been consumed."""

    stream_id: int
    data: bytes
    ack: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamEnded(Event):
    """The peer half-closed the stream; no more messages will come."""

    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class CallCompleted(Event):
    """Client: the call's final status (from trailers, Trailers-Only, HTTP status or RST)."""

    stream_id: int
    code: StatusCode
    message: str
    metadata: Metadata


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamReset(Event):
    """The peer reset the stream (RST_STREAM with ``error_code``)."""

    stream_id: int
    error_code: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamFailed(Event):
    """A message on the stream was refused (too large, compressed, malformed).

    The rest of the stream's data is discarded (and its flow-control credit returned).
    """

    stream_id: int
    code: StatusCode
    message: str


@dataclass(frozen=True, kw_only=True, slots=True)
class WindowUpdated(Event):
    """Send window grew; ``stream_id`` 0 means the connection window (wake every sender)."""

    stream_id: int


@dataclass(frozen=True, kw_only=True, slots=True)
class SettingsReceived(Event):
    """The peer's SETTINGS arrived (the first ones complete its connection preface)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PingAcknowledged(Event):
    data: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class GoAwayReceived(Event):
    """The peer will accept no stream above ``last_stream_id``."""

    last_stream_id: int
    error_code: int
    debug: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionFailed(Event):
    """The connection is over: a protocol error (GOAWAY queued) or policy violation.

    Flush ``data_to_send()`` and close the transport.
    """

    error_code: int
    reason: str
