"""The asyncio peers: grpcio (aio API) and grpclib, each as server and as client."""

from __future__ import annotations

import asyncio
import signal
import socket
from typing import TYPE_CHECKING, Any

from benchmarks.rpc.common import (
    HOST,
    SERVER_NAME,
    Call,
    Result,
    Workload,
    announce_port,
    client_context,
    load_generated,
    measure,
    pem,
    server_context,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def _gather(calls: list[Call]) -> None:
    await asyncio.gather(*(call() for call in calls))


# --- grpcio -------------------------------------------------------------------------------


def _grpcio_servicer(gen: Path) -> Any:
    pb2 = load_generated(gen, "bench_pb2")
    pb2_grpc = load_generated(gen, "bench_pb2_grpc")

    class Servicer(pb2_grpc.BenchServicer):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            self.cache: dict[int, Any] = {}

        async def Unary(self, request: Any, context: Any) -> Any:
            return pb2.Payload(data=request.data)

        async def Stream(self, request: Any, context: Any) -> AsyncIterator[Any]:
            message = self.cache.get(request.size)
            if message is None:
                message = self.cache[request.size] = pb2.Payload(data=b"x" * request.size)
            for _ in range(request.count):
                yield message

    return Servicer()


async def serve_grpcio(pki: Path, gen: Path) -> None:
    import grpc

    pb2_grpc = load_generated(gen, "bench_pb2_grpc")
    server = grpc.aio.server()
    pb2_grpc.add_BenchServicer_to_server(_grpcio_servicer(gen), server)
    credentials = grpc.ssl_server_credentials(
        [(pem(pki, "server.key"), pem(pki, "server.crt"))],
        root_certificates=pem(pki, "ca.crt"),
        require_client_auth=True,
    )
    port = server.add_secure_port(f"{HOST}:0", credentials)
    await server.start()
    announce_port(port)
    await _until_sigterm()
    await server.stop(0)


async def client_grpcio(
    port: int, pki: Path, gen: Path, work: Workload, server_cpu: Callable[[], float]
) -> Result:
    import grpc

    pb2 = load_generated(gen, "bench_pb2")
    pb2_grpc = load_generated(gen, "bench_pb2_grpc")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pem(pki, "ca.crt"),
        private_key=pem(pki, "admin.key"),
        certificate_chain=pem(pki, "admin.crt"),
    )
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    request = pb2.Payload(data=b"x" * work.unary_size)
    stream_request = pb2.StreamRequest(count=work.stream_count, size=work.stream_size)
    async with grpc.aio.secure_channel(f"{HOST}:{port}", credentials, options=options) as ch:
        stub = pb2_grpc.BenchStub(ch)

        async def unary() -> None:
            await stub.Unary(request)

        async def stream() -> int:
            got = 0
            async for message in stub.Stream(stream_request):
                got += len(message.data)
            return got

        return await measure(unary=unary, stream=stream, gather=_gather, work=work, server_cpu=server_cpu)


# --- grpclib ------------------------------------------------------------------------------


def _grpclib_service(gen: Path) -> Any:
    pb2 = load_generated(gen, "bench_pb2")
    base = load_generated(gen, "bench_grpc").BenchBase

    class Service(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.cache: dict[int, Any] = {}

        async def Unary(self, stream: Any) -> None:
            request = await stream.recv_message()
            await stream.send_message(pb2.Payload(data=request.data))

        async def Stream(self, stream: Any) -> None:
            request = await stream.recv_message()
            message = self.cache.get(request.size)
            if message is None:
                message = self.cache[request.size] = pb2.Payload(data=b"x" * request.size)
            for _ in range(request.count):
                await stream.send_message(message)

    return Service()


async def serve_grpclib(pki: Path, gen: Path) -> None:
    from grpclib.server import Server

    server = Server([_grpclib_service(gen)])
    # proto=IPPROTO_TCP: grpclib only sets TCP_NODELAY on sockets that say they are TCP, and
    # accepted sockets inherit this one's proto (0 would mean Nagle + delayed ACK: ~40 ms).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((HOST, 0))
    await server.start(sock=sock, ssl=server_context(pki))
    announce_port(sock.getsockname()[1])
    await _until_sigterm()
    server.close()
    await server.wait_closed()


async def client_grpclib(
    port: int, pki: Path, gen: Path, work: Workload, server_cpu: Callable[[], float]
) -> Result:
    from grpclib.client import Channel

    pb2 = load_generated(gen, "bench_pb2")
    stub_class = load_generated(gen, "bench_grpc").BenchStub
    request = pb2.Payload(data=b"x" * work.unary_size)
    stream_request = pb2.StreamRequest(count=work.stream_count, size=work.stream_size)
    # grpclib checks the host name against the certificate: 127.0.0.1 is one of its SANs.
    channel = Channel(HOST, port, ssl=client_context(pki))
    try:
        stub = stub_class(channel)

        async def unary() -> None:
            await stub.Unary(request)

        async def stream() -> int:
            got = 0
            async with stub.Stream.open() as call:
                await call.send_message(stream_request, end=True)
                async for message in call:
                    got += len(message.data)
            return got

        return await measure(unary=unary, stream=stream, gather=_gather, work=work, server_cpu=server_cpu)
    finally:
        channel.close()
