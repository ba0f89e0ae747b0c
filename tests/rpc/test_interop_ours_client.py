"""Our Channel -> grpcio (aio) server, over mTLS 1.3 + ALPN h2 on loopback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.rpc import ChannelOptions, RpcError, StatusCode, connect

from .echo import STREAM, UNARY, EchoReply, EchoRequest

if TYPE_CHECKING:
    import ssl

    from .peers import AsyncioThread, GrpcioServer

MiB = 1024 * 1024


async def test_unary_metadata_errors(
    grpcio_server: GrpcioServer, client_ctx: ssl.SSLContext
) -> None:
    message = "nö such jöb — 见 %41 ✓"
    async with connect(
        "127.0.0.1", grpcio_server.port, ssl_context=client_ctx, server_hostname="localhost"
    ) as ch:
        reply = await ch.unary(UNARY, EchoRequest(payload=b"hi"), EchoReply)
        assert reply.payload == b"hi"
        empty = await ch.unary(UNARY, EchoRequest(), EchoReply)
        assert empty.payload == b""
        md = (("x-text", "v1"), ("x-data-bin", b"\x00\xff\x10"))
        with pytest.raises(RpcError) as info:
            await ch.unary(
                UNARY, EchoRequest(fail_code=5, fail_message=message), EchoReply, metadata=md
            )
        assert info.value.code == StatusCode.NOT_FOUND
        assert info.value.message == message
        assert ("x-text", "v1") in info.value.trailing_metadata
        assert ("x-data-bin", b"\x00\xff\x10") in info.value.trailing_metadata
        async with ch.server_stream(
            STREAM, EchoRequest(count=2, size=3), EchoReply, metadata=md
        ) as stream:
            got = [r.index async for r in stream]
        assert got == [0, 1]
        assert ("x-data-bin", b"\x00\xff\x10") in stream.trailing_metadata
        with pytest.raises(RpcError) as info:
            await ch.unary("/test.echo.Echo/Nope", EchoRequest(), EchoReply)
        assert info.value.code == StatusCode.UNIMPLEMENTED


@pytest.mark.slow
async def test_streams_small_bulk_and_4mib(
    grpcio_server: GrpcioServer, client_ctx: ssl.SSLContext
) -> None:
    opts = ChannelOptions(max_receive_message=8 * MiB)
    async with connect(
        "127.0.0.1",
        grpcio_server.port,
        ssl_context=client_ctx,
        server_hostname="localhost",
        options=opts,
    ) as ch:
        async with ch.server_stream(
            STREAM, EchoRequest(count=10_000, size=10), EchoReply
        ) as stream:
            small = [r.index async for r in stream]
        assert small == list(range(10_000))
        total = n = 0
        async with ch.server_stream(
            STREAM, EchoRequest(count=1600, size=64 * 1024), EchoReply
        ) as stream:
            async for r in stream:
                total += len(r.payload)
                n += 1
        assert (total, n) == (100 * MiB, 1600)
        big = await ch.unary(UNARY, EchoRequest(payload=b"q" * (4 * MiB - 64)), EchoReply)
        assert len(big.payload) == 4 * MiB - 64


async def test_receive_limit_and_connection_survives(
    grpcio_server: GrpcioServer, client_ctx: ssl.SSLContext
) -> None:
    async with connect(
        "127.0.0.1", grpcio_server.port, ssl_context=client_ctx, server_hostname="localhost"
    ) as ch:
        # The response is over our 4 MiB receive limit.
        with pytest.raises(RpcError) as info:
            await ch.unary(UNARY, EchoRequest(size=4 * MiB + 10), EchoReply)
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        # The request is over grpcio's 4 MiB receive limit.
        with pytest.raises(RpcError) as info:
            await ch.unary(UNARY, EchoRequest(payload=b"z" * (4 * MiB + 10)), EchoReply)
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        for _ in range(3):
            assert (await ch.unary(UNARY, EchoRequest(payload=b"ok"), EchoReply)).payload == b"ok"


async def test_deadline_and_cancellation(
    grpcio_server: GrpcioServer, client_ctx: ssl.SSLContext
) -> None:
    async with connect(
        "127.0.0.1", grpcio_server.port, ssl_context=client_ctx, server_hostname="localhost"
    ) as ch:
        with pytest.raises(RpcError) as info:
            await ch.unary(UNARY, EchoRequest(sleep=30), EchoReply, timeout=0.3)
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        await trio.to_thread.run_sync(grpcio_server.echo.cancelled.wait, 10)
        assert grpcio_server.echo.cancelled.is_set()
        grpcio_server.echo.cancelled.clear()

        # Client cancellation mid-stream by a trio cancel scope.
        got = 0
        with trio.CancelScope() as scope:
            async with ch.server_stream(
                STREAM, EchoRequest(count=1_000_000, size=100, sleep=0.001), EchoReply
            ) as stream:
                async for _ in stream:
                    got += 1
                    if got == 5:
                        scope.cancel()
        assert got == 5
        await trio.to_thread.run_sync(grpcio_server.echo.cancelled.wait, 10)
        assert grpcio_server.echo.cancelled.is_set()
        # The connection is still fine.
        assert (await ch.unary(UNARY, EchoRequest(payload=b"ok"), EchoReply)).payload == b"ok"


async def test_graceful_shutdown_of_grpcio_server(
    grpcio_server: GrpcioServer, client_ctx: ssl.SSLContext, aio: AsyncioThread
) -> None:
    """grpcio's GOAWAY must not break the stream in flight; new calls get UNAVAILABLE."""
    async with connect(
        "127.0.0.1", grpcio_server.port, ssl_context=client_ctx, server_hostname="localhost"
    ) as ch:
        async with ch.server_stream(
            STREAM, EchoRequest(count=20, size=10, sleep=0.05), EchoReply
        ) as stream:
            got = []
            async for r in stream:
                got.append(r.index)
                if r.index == 0:
                    await trio.to_thread.run_sync(
                        lambda: aio.loop.call_soon_threadsafe(
                            lambda: aio.loop.create_task(grpcio_server.server.stop(10))
                        )
                    )
            assert got == list(range(20))
        with pytest.raises(RpcError) as info:
            await ch.unary(UNARY, EchoRequest(), EchoReply, timeout=5)
        assert info.value.code == StatusCode.UNAVAILABLE
