"""Helpers shared by the rpc tests: the asyncio thread for grpcio, credentials, handles."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from trio_jobs.rpc import Server

    from .echo import GrpcioEcho, TrioEcho

T = TypeVar("T")


class AsyncioThread:
    """An asyncio loop in a daemon thread, for the grpcio aio peer."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class GrpcioCreds:
    ca: bytes
    server_cert: bytes
    server_key: bytes
    client_cert: bytes
    client_key: bytes

    def server(self) -> Any:
        import grpc

        return grpc.ssl_server_credentials(
            [(self.server_key, self.server_cert)],
            root_certificates=self.ca,
            require_client_auth=True,
        )

    def channel(self) -> Any:
        import grpc

        return grpc.ssl_channel_credentials(self.ca, self.client_key, self.client_cert)


@dataclass
class OurServer:
    server: Server
    port: int
    echo: TrioEcho


@dataclass
class GrpcioServer:
    port: int
    echo: GrpcioEcho
    server: Any


def grpcio_channel(creds: GrpcioCreds, port: int, **options: Any) -> Any:
    """A grpc.aio secure channel to 127.0.0.1:port (create it on the aio loop)."""
    import grpc

    opts = [("grpc.ssl_target_name_override", "localhost"), *options.items()]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds.channel(), options=opts)
