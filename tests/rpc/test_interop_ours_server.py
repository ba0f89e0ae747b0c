"""grpcio (aio) client -> our Server, over mTLS 1.3 + ALPN h2 on loopback."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import trio

from trio_jobs.rpc import health_pb2

from .echo import STREAM, UNARY, EchoReply, EchoRequest

if TYPE_CHECKING:
    from .peers import AsyncioThread, GrpcioCreds, OurServer

from .peers import grpcio_channel

MiB = 1024 * 1024


async def on_aio(aio: AsyncioThread, coro: Any, limit: float = 60.0) -> Any:
    return await trio.to_thread.run_sync(aio.run, coro, limit)


def unary(ch: Any) -> Any:
    return ch.unary_unary(
        UNARY,
        request_serializer=EchoRequest.SerializeToString,
        response_deserializer=EchoReply.FromString,
    )


def stream(ch: Any) -> Any:
    return ch.unary_stream(
        STREAM,
        request_serializer=EchoRequest.SerializeToString,
        response_deserializer=EchoReply.FromString,
    )


async def test_unary_metadata_identity_and_health(
    aio: AsyncioThread, grpcio_creds: GrpcioCreds, our_server: OurServer
) -> None:
    async def go() -> Any:
        async with grpcio_channel(grpcio_creds, our_server.port) as ch:
            call = unary(ch)(
                EchoRequest(payload=b"hello"),
                metadata=(("x-text", "v1"), ("x-data-bin", b"\x00\xff\x10")),
            )
            reply = await call
            trailing = await call.trailing_metadata()
            health = await ch.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )(health_pb2.HealthCheckRequest())
            empty = await unary(ch)(EchoRequest())
            return reply, tuple(trailing), health, empty, await call.code()

    reply, trailing, health, empty, code = await on_aio(aio, go())
    assert reply.payload == b"hello"
    assert code == grpc.StatusCode.OK
    assert ("x-text", "v1") in trailing
    assert ("x-data-bin", b"\x00\xff\x10") in trailing
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert empty.payload == b""  # an empty message both ways
    assert our_server.echo.identities[0] == "alice"


async def test_errors_unimplemented_and_non_ascii(
    aio: AsyncioThread, grpcio_creds: GrpcioCreds, our_server: OurServer
) -> None:
    message = "nö such jöb — 见 %41 ✓"

    async def go() -> Any:
        out: list[tuple[Any, Any, int | None]] = []
        async with grpcio_channel(grpcio_creds, our_server.port) as ch:
            for req, method in (
                (EchoRequest(fail_code=5, fail_message=message), UNARY),
                (EchoRequest(), "/test.echo.Echo/Nope"),
                (EchoRequest(count=3, size=10, fail_code=7, fail_message=message), STREAM),
            ):
                if method == STREAM:
                    got: list[Any] = []
                    try:
                        async for reply in stream(ch)(req):
                            got.append(reply)
                    except grpc.aio.AioRpcError as exc:
                        out.append((exc.code(), exc.details(), len(got)))
                    continue
                try:
                    await ch.unary_unary(
                        method,
                        request_serializer=EchoRequest.SerializeToString,
                        response_deserializer=EchoReply.FromString,
                    )(req)
                except grpc.aio.AioRpcError as exc:
                    out.append((exc.code(), exc.details(), None))
        return out

    out = await on_aio(aio, go())
    assert out[0][:2] == (grpc.StatusCode.NOT_FOUND, message)
    assert out[1][0] == grpc.StatusCode.UNIMPLEMENTED
    # the stream's three replies arrive before its error status (count=3, then fail_code)
    assert out[2] == (grpc.StatusCode.PERMISSION_DENIED, message, 3)


@pytest.mark.slow
async def test_streams_small_and_bulk(
    aio: AsyncioThread, grpcio_creds: GrpcioCreds, our_server: OurServer
) -> None:
    async def go() -> Any:
        async with grpcio_channel(
            grpcio_creds, our_server.port, **{"grpc.max_receive_message_length": 8 * MiB}
        ) as ch:
            small = [r.index async for r in stream(ch)(EchoRequest(count=10_000, size=10))]
            total = 0
            n = 0
            async for r in stream(ch)(EchoRequest(count=1600, size=64 * 1024)):
                total += len(r.payload)
                n += 1
            big = [
                len(r.payload) async for r in stream(ch)(EchoRequest(count=3, size=4 * MiB - 16))
            ]
            four = await unary(ch)(EchoRequest(payload=b"q" * (4 * MiB - 64)))
            return small, total, n, big, len(four.payload)

    small, total, n, big, four = await on_aio(aio, go(), 120)
    assert small == list(range(10_000))
    assert (total, n) == (100 * MiB, 1600)
    assert big == [4 * MiB - 16] * 3
    assert four == 4 * MiB - 64


async def test_over_limit_request_is_resource_exhausted_and_connection_survives(
    aio: AsyncioThread, grpcio_creds: GrpcioCreds, our_server: OurServer
) -> None:
    async def go() -> Any:
        async with grpcio_channel(
            grpcio_creds, our_server.port, **{"grpc.max_send_message_length": 16 * MiB}
        ) as ch:
            try:
                await unary(ch)(EchoRequest(payload=b"z" * (5 * MiB)))
                code = None
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            after = [(await unary(ch)(EchoRequest(payload=b"ok"))).payload for _ in range(3)]
            return code, after

    code, after = await on_aio(aio, go())
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert after == [b"ok"] * 3


async def test_deadline_cancels_handler(
    aio: AsyncioThread, grpcio_creds: GrpcioCreds, our_server: OurServer
) -> None:
    async def go() -> Any:
        async with grpcio_channel(grpcio_creds, our_server.port) as ch:
            try:
                await unary(ch)(EchoRequest(sleep=30), timeout=0.3)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return None

    assert await on_aio(aio, go()) == grpc.StatusCode.DEADLINE_EXCEEDED
    with trio.fail_after(10):
        await our_server.echo.cancelled.wait()
    assert our_server.echo.deadlines[0] is not None


async def test_client_cancel_mid_stream_cancels_handler(
    aio: AsyncioThread, grpcio_creds: GrpcioCreds, our_server: OurServer
) -> None:
    async def go() -> Any:
        async with grpcio_channel(grpcio_creds, our_server.port) as ch:
            call = stream(ch)(EchoRequest(count=1_000_000, size=100, sleep=0.001))
            got = 0
            async for _ in call:
                got += 1
                if got == 5:
                    call.cancel()
                    break
            await asyncio.sleep(0)
            return got, call.cancelled()

    got, cancelled = await on_aio(aio, go())
    assert (got, cancelled) == (5, True)
    with trio.fail_after(10):
        await our_server.echo.cancelled.wait()


async def test_graceful_shutdown_drains_and_refuses(
    aio: AsyncioThread, grpcio_creds: GrpcioCreds, our_server: OurServer
) -> None:
    ch_box: list[Any] = []

    async def open_and_start() -> Any:
        ch = grpcio_channel(grpcio_creds, our_server.port)
        ch_box.append(ch)
        await unary(ch)(EchoRequest())  # connected
        call = stream(ch)(EchoRequest(count=20, size=10, sleep=0.05))
        first = await call.read()
        return call, first

    call, first = await on_aio(aio, open_and_start())
    assert first.index == 0

    async def finish() -> Any:
        rest = []
        while True:
            r = await call.read()
            if r is grpc.aio.EOF:
                break
            rest.append(r.index)
        code = await call.code()
        try:
            await unary(ch_box[0])(EchoRequest(), timeout=5)
            late = None
        except grpc.aio.AioRpcError as exc:
            late = exc.code()
        await ch_box[0].close()
        return rest, code, late

    async with trio.open_nursery() as nursery:
        nursery.start_soon(our_server.server.shutdown, 10.0)
        rest, code, late = await on_aio(aio, finish())
    assert rest == list(range(1, 20))
    assert code == grpc.StatusCode.OK
    assert late == grpc.StatusCode.UNAVAILABLE
