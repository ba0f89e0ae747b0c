"""Fixtures for the rpc tests: our server over mTLS on loopback, a grpcio (aio) peer.

Certificates come from the session development PKI of ``tests/conftest.py``. grpcio's aio
API runs on one asyncio loop in a helper thread (:class:`AsyncioThread`); trio tests call
into it with ``trio.to_thread.run_sync(loop.run, coroutine)``.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
import trio
from echo import GrpcioEcho, TrioEcho

from trio_jobs.rpc import Server, ServerLimits, health_service
from trio_jobs.security.identity import identity_from_peercert

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
    from pathlib import Path

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


@pytest.fixture(scope="session")
def aio() -> Iterator[AsyncioThread]:
    loop = AsyncioThread()
    yield loop
    loop.close()


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


@pytest.fixture(scope="session")
def grpcio_creds(dev_pki: Path) -> GrpcioCreds:
    def read(name: str) -> bytes:
        return (dev_pki / name).read_bytes()

    return GrpcioCreds(
        ca=read("ca.crt"),
        server_cert=read("server.crt"),
        server_key=read("server.key"),
        client_cert=read("alice.crt"),
        client_key=read("alice.key"),
    )


@dataclass
class OurServer:
    server: Server
    port: int
    echo: TrioEcho


@pytest.fixture
def limits() -> ServerLimits:
    return ServerLimits()


@pytest.fixture
async def our_server(
    nursery: trio.Nursery, server_ssl_context: ssl.SSLContext, limits: ServerLimits
) -> AsyncIterator[OurServer]:
    echo = TrioEcho()
    server = Server(
        [*echo.methods(), *health_service()],
        ssl_context=server_ssl_context,
        identify=identity_from_peercert,
        limits=limits,
    )
    bound = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
    yield OurServer(server=server, port=bound[0][1], echo=echo)
    with trio.fail_after(30):
        await server.shutdown(drain_timeout=1.0)


@dataclass
class GrpcioServer:
    port: int
    echo: GrpcioEcho
    server: Any


@pytest.fixture
def grpcio_server(aio: AsyncioThread, grpcio_creds: GrpcioCreds) -> Iterator[GrpcioServer]:
    import grpc

    echo = GrpcioEcho()

    async def start() -> tuple[Any, int]:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 4 * 1024 * 1024),
                ("grpc.max_send_message_length", 8 * 1024 * 1024),
            ]
        )
        server.add_generic_rpc_handlers((echo.handler(),))
        port = server.add_secure_port("127.0.0.1:0", grpcio_creds.server())
        await server.start()
        return server, port

    server, port = aio.run(start())
    yield GrpcioServer(port=port, echo=echo, server=server)
    aio.run(server.stop(0))


def grpcio_channel(creds: GrpcioCreds, port: int, **options: Any) -> Any:
    """A grpc.aio secure channel to 127.0.0.1:port (create it on the aio loop)."""
    import grpc

    opts = [("grpc.ssl_target_name_override", "localhost"), *options.items()]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds.channel(), options=opts)


@pytest.fixture
def client_ctx(client_ssl_context_for: Callable[[str], ssl.SSLContext]) -> ssl.SSLContext:
    return client_ssl_context_for("alice")
