"""The trio peers: our rpc layer, and bare ``trio.SSLStream`` as the ceiling.

The bare-TLS peer speaks the same 5-byte length prefix as gRPC with no HTTP/2 and no
protobuf: kind 0 is an echo (ping-pong), kind 1 asks for ``count`` messages of ``size``
bytes (bulk). What it measures is TLS + trio + the loopback, which no gRPC layer on the same
stack can beat.
"""

from __future__ import annotations

import os
import signal
import struct
import time
from typing import TYPE_CHECKING, Any, Final

import trio

from benchmarks.rpc.common import (
    HOST,
    SERVER_NAME,
    SERVICE,
    STREAM_PATH,
    UNARY_PATH,
    Call,
    RanAs,
    Result,
    Workload,
    announce_port,
    client_context,
    load_generated,
    measure,
    measure_c1,
    measure_stream,
    server_context,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

KIND_ECHO: Final = 0
KIND_BULK: Final = 1
HEADER: Final = struct.Struct(">BI")
READ_SIZE: Final = 1 << 16


async def _until_sigterm(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            cancel_scope.cancel()
            return


class _Reader:
    """Buffered exact reads from a stream (the bare-TLS protocol's only parser)."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def exactly(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            chunk = await self._stream.receive_some(READ_SIZE)
            if not chunk:
                return None
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def skip(self, n: int) -> None:
        """Consume ``n`` bytes without keeping them (bulk receive)."""
        while n:
            if not self._buf:
                chunk = await self._stream.receive_some(READ_SIZE)
                if not chunk:
                    raise EOFError(f"{n} bytes short")
                self._buf += chunk
            take = min(n, len(self._buf))
            del self._buf[:take]
            n -= take


async def _tls_connection(stream: trio.SSLStream[trio.SocketStream]) -> None:
    reader = _Reader(stream)
    try:
        while (head := await reader.exactly(HEADER.size)) is not None:
            kind, length = HEADER.unpack(head)
            body = await reader.exactly(length)
            if body is None:
                return
            if kind == KIND_ECHO:
                await stream.send_all(head + body)
            else:
                count, size = struct.unpack(">II", body)
                message = HEADER.pack(KIND_ECHO, size) + b"x" * size
                for _ in range(count):
                    await stream.send_all(message)
    except trio.BrokenResourceError:
        return
    finally:
        await trio.aclose_forcefully(stream)


async def serve_tls(pki: Path) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_until_sigterm, nursery.cancel_scope)
        listeners = await trio.open_ssl_over_tcp_listeners(0, server_context(pki), host=HOST)
        started = await nursery.start(trio.serve_listeners, _tls_connection, listeners)
        announce_port(started[0].transport_listener.socket.getsockname()[1])


async def client_tls(port: int, pki: Path, work: Workload, server_cpu: Callable[[], float]) -> Result:
    tcp = await trio.open_tcp_stream(HOST, port)
    stream = trio.SSLStream(tcp, client_context(pki), server_hostname=SERVER_NAME)
    async with stream:
        await stream.do_handshake()
        reader = _Reader(stream)
        request = HEADER.pack(KIND_ECHO, work.unary_size) + b"x" * work.unary_size
        reply_len = len(request)

        async def ping() -> None:
            await stream.send_all(request)
            await reader.skip(reply_len)

        async def pipelined() -> float:
            # One connection with ``concurrency`` requests in flight: the ceiling for c=64.
            total = work.c64_calls // work.concurrency * work.concurrency
            window = trio.Semaphore(work.concurrency)

            async def send_side() -> None:
                for _ in range(total):
                    await window.acquire()
                    await stream.send_all(request)

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_side)
                for _ in range(total):
                    await reader.skip(reply_len)
                    window.release()
            return total / (time.perf_counter() - start)

        async def bulk() -> int:
            ask = struct.pack(">II", work.stream_count, work.stream_size)
            await stream.send_all(HEADER.pack(KIND_BULK, len(ask)) + ask)
            await reader.skip(work.stream_count * (HEADER.size + work.stream_size))
            return work.stream_count * work.stream_size

        p50, p99 = await measure_c1(ping, work)
        qps = await pipelined()
        mbps, cpu = await measure_stream(bulk, work, server_cpu)
        return Result(
            unary_p50_us=p50, unary_p99_us=p99, c64_qps=qps, stream_mbps=mbps, stream_server_cpu_s_per_gib=cpu
        )


# --- our rpc layer ------------------------------------------------------------------------
#
# Which mode runs is the environment's (TRIO_JOBS_RPC_TRANSPORT, TRIO_JOBS_RPC_FAST_PATHS, set
# by the runner for each row): the server and the channel are made without ``mode=``, as a
# deployment makes them, and each process reports what it resolved (``_ran_as``).


def _ran_as(server_or_channel: object) -> RanAs:
    """The mode ``server_or_channel`` resolved, and where this process's trio_jobs comes from.

    ``getattr`` because the code may be a checkout from before ``RpcMode`` (``--ab``), whose
    server and channel have no ``mode``: their only mode is what is now lean + fast paths.
    """
    import trio_jobs

    mode = getattr(server_or_channel, "mode", None)
    return RanAs(
        mode=None if mode is None else str(mode.describe()),
        code=os.path.dirname(os.path.realpath(trio_jobs.__file__)),
    )


class _OurBench:
    """The Bench service for ``trio_jobs.rpc`` (one method per RPC, named as in the proto)."""

    def __init__(self, pb2: Any) -> None:
        self._pb2 = pb2
        self._cache: dict[int, Any] = {}

    async def Unary(self, request: Any, ctx: Any) -> Any:
        return self._pb2.Payload(data=request.data)

    async def Stream(self, request: Any, ctx: Any, send: Any) -> None:
        message = self._cache.get(request.size)
        if message is None:
            message = self._cache[request.size] = self._pb2.Payload(data=b"x" * request.size)
        for _ in range(request.count):
            await send(message)


async def serve_ours(pki: Path, gen: Path) -> None:
    from trio_jobs import rpc

    pb2 = load_generated(gen, "bench_pb2")
    methods = rpc.service_from_descriptor(
        pb2.DESCRIPTOR.services_by_name[SERVICE.rsplit(".", 1)[1]], _OurBench(pb2)
    )
    server = rpc.Server(methods, ssl_context=server_context(pki))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_until_sigterm, nursery.cancel_scope)
        bound = await nursery.start(server.serve_tcp, HOST, 0)
        announce_port(bound[0][1], _ran_as(server))


async def client_ours(
    port: int, pki: Path, gen: Path, work: Workload, server_cpu: Callable[[], float]
) -> tuple[Result, RanAs]:
    from trio_jobs import rpc

    pb2 = load_generated(gen, "bench_pb2")
    request = pb2.Payload(data=b"x" * work.unary_size)
    stream_request = pb2.StreamRequest(count=work.stream_count, size=work.stream_size)
    async with rpc.connect(
        HOST, port, ssl_context=client_context(pki), server_hostname=SERVER_NAME
    ) as channel:

        async def unary() -> None:
            await channel.unary(UNARY_PATH, request, pb2.Payload)

        async def stream() -> int:
            got = 0
            async with channel.server_stream(STREAM_PATH, stream_request, pb2.Payload) as s:
                async for message in s:
                    got += len(message.data)
            return got

        async def gather(calls: list[Call]) -> None:
            async with trio.open_nursery() as nursery:
                for call in calls:
                    nursery.start_soon(call)

        result = await measure(unary=unary, stream=stream, gather=gather, work=work, server_cpu=server_cpu)
        return result, _ran_as(channel)
