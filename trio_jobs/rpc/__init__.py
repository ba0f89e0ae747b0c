"""A general gRPC-over-HTTP/2 layer for trio (unary and server-streaming), built on h2.

Knows nothing about jobs. See docs/architecture.md ("rpc/") for the interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._blocking import BlockingChannel
    from ._client import Channel, ResponseStream, connect, open_channel
    from ._mode import RpcMode
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

# Where each public name lives. Imported on first use (PEP 562), so that a program which
# needs only the status codes or the blocking driver (the CLI's one-shot commands) does
# not import trio and the server.
__getattr__ = lazy_exports(__name__, {
    "BlockingChannel": "_blocking",
    "Channel": "_client",
    "ResponseStream": "_client",
    "connect": "_client",
    "open_channel": "_client",
    "RpcMode": "_mode",
    "ChannelOptions": "_options",
    "ServerLimits": "_options",
    "Server": "_server",
    "Method": "_service",
    "Serialized": "_service",
    "ServerContext": "_service",
    "StreamHandler": "_service",
    "UnaryHandler": "_service",
    "health_service": "_service",
    "service_from_descriptor": "_service",
    "Metadata": "_status",
    "RpcError": "_status",
    "StatusCode": "_status",
})

__all__ = [
    "BlockingChannel",
    "Channel",
    "ChannelOptions",
    "Metadata",
    "Method",
    "ResponseStream",
    "RpcError",
    "RpcMode",
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
