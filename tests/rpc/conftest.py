"""Fixtures for the rpc tests: our server over mTLS on loopback, a grpcio (aio) peer.

Certificates come from the session development PKI of ``tests/conftest.py``. grpcio's aio
API runs on one asyncio loop in a helper thread (:class:`AsyncioThread`); trio tests call
into it with ``trio.to_thread.run_sync(loop.run, coroutine)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from trio_jobs.rpc import Server, ServerLimits, health_service
from trio_jobs.security.identity import identity_from_peercert

from .echo import GrpcioEcho, TrioEcho
from .peers import AsyncioThread, GrpcioCreds, GrpcioServer, OurServer

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Callable, Iterator
    from pathlib import Path


@pytest.fixture(scope="session")
def aio() -> Iterator[AsyncioThread]:
    loop = AsyncioThread()
    yield loop
    loop.close()


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


@pytest.fixture
def client_ctx(client_ssl_context_for: Callable[[str], ssl.SSLContext]) -> ssl.SSLContext:
    return client_ssl_context_for("alice")
