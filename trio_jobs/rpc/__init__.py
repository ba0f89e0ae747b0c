"""A general gRPC-over-HTTP/2 layer for trio (unary and server-streaming), built on h2.

Knows nothing about jobs. See docs/architecture.md ("rpc/") for the interface.
"""

from __future__ import annotations

from ._client import Channel, ResponseStream, connect, open_channel
from ._options import ChannelOptions, ServerLimits
from ._server import Server
from ._service import (
    Method,
    Serialized,
    ServerContext,
    StreamHandler,
    UnaryHandler,
    health_service,
    service_from_descriptor,
)
from ._status import Metadata, RpcError, StatusCode

__all__ = [
    "Channel",
    "ChannelOptions",
    "Metadata",
    "Method",
    "ResponseStream",
    "RpcError",
    "Serialized",
    "Server",
    "ServerContext",
    "ServerLimits",
    "StatusCode",
    "StreamHandler",
    "UnaryHandler",
    "connect",
    "health_service",
    "open_channel",
    "service_from_descriptor",
]
