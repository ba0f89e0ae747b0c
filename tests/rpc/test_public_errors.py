"""The public client API raises plain exceptions: RpcError, Cancelled, KeyboardInterrupt.

``connect`` owns a nursery (the connection's reader and writer); what the body of
``async with connect(...)`` / ``async with channel.server_stream(...)`` raises must reach
the caller as it is, never wrapped in an ExceptionGroup. ``pytest.raises(RpcError)`` does
not match a group, so each test below fails if the exception leaks wrapped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from trio_jobs.rpc import Channel, RpcError, StatusCode, connect

from .echo import STREAM, UNARY, EchoReply, EchoRequest

if TYPE_CHECKING:
    import ssl
    from collections.abc import Awaitable, Callable

    from .peers import OurServer

BOUND = 20


async def in_connect(
    server: OurServer, ctx: ssl.SSLContext, body: Callable[[Channel], Awaitable[Any]]
) -> Any:
    """``body(channel)`` run inside ``async with connect(...)``."""
    async with connect(
        "127.0.0.1", server.port, ssl_context=ctx, server_hostname="localhost"
    ) as ch:
        return await body(ch)


async def drain_stream(ch: Channel, request: Any, grpc_timeout: float | None = None) -> list[int]:
    """The indexes of a server-stream read to its end, inside ``server_stream``."""
    got: list[int] = []
    async with ch.server_stream(STREAM, request, EchoReply, timeout=grpc_timeout) as stream:
        async for msg in stream:
            got.append(msg.index)
    return got


async def test_unary_error_inside_connect_is_a_plain_rpc_error(
    our_server: OurServer, client_ctx: ssl.SSLContext
) -> None:
    request = EchoRequest(fail_code=StatusCode.NOT_FOUND, fail_message="no such thing")

    async def body(ch: Channel) -> None:
        await ch.unary(UNARY, request, EchoReply)

    with trio.fail_after(BOUND), pytest.raises(RpcError) as info:
        await in_connect(our_server, client_ctx, body)
    assert info.value.code == StatusCode.NOT_FOUND
    assert info.value.message == "no such thing"


async def test_handled_errors_leave_the_channel_usable(
    our_server: OurServer, client_ctx: ssl.SSLContext
) -> None:
    async def body(ch: Channel) -> None:
        for _ in range(3):
            with pytest.raises(RpcError) as info:
                await ch.unary(UNARY, EchoRequest(fail_code=StatusCode.ABORTED), EchoReply)
            assert info.value.code == StatusCode.ABORTED
        assert (await ch.unary(UNARY, EchoRequest(payload=b"ok"), EchoReply)).payload == b"ok"

    with trio.fail_after(BOUND):
        await in_connect(our_server, client_ctx, body)


async def test_server_stream_errors_are_plain_rpc_errors(
    our_server: OurServer, client_ctx: ssl.SSLContext
) -> None:
    failing = EchoRequest(count=2, fail_code=StatusCode.PERMISSION_DENIED)

    async def body(ch: Channel) -> None:
        # the status ends the stream after two messages
        with pytest.raises(RpcError) as info:
            await drain_stream(ch, failing)
        assert info.value.code == StatusCode.PERMISSION_DENIED
        # a deadline inside the stream body
        with pytest.raises(RpcError) as info:
            await drain_stream(ch, EchoRequest(count=1, sleep=60), grpc_timeout=0.2)
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        # the body's own error, raised from inside both context managers
        with pytest.raises(ValueError, match="mine"):
            await raise_in_stream(ch)
        assert (await ch.unary(UNARY, EchoRequest(payload=b"x"), EchoReply)).payload == b"x"

    async def raise_in_stream(ch: Channel) -> None:
        async with ch.server_stream(STREAM, EchoRequest(count=5), EchoReply) as stream:
            async for _ in stream:
                raise ValueError("mine")

    with trio.fail_after(BOUND):
        await in_connect(our_server, client_ctx, body)
        # an RpcError escaping both context managers
        with pytest.raises(RpcError) as info:
            await in_connect(our_server, client_ctx, lambda ch: drain_stream(ch, failing))
    assert info.value.code == StatusCode.PERMISSION_DENIED


async def test_cancellation_still_propagates_as_cancelled(
    our_server: OurServer, client_ctx: ssl.SSLContext
) -> None:
    seen: list[BaseException] = []
    echo = our_server.echo

    async def cancelled_in_stream(ch: Channel) -> None:
        async with ch.server_stream(STREAM, EchoRequest(count=1, sleep=60), EchoReply) as stream:
            scope.cancel()
            async for _ in stream:
                pass

    with trio.fail_after(BOUND):
        with trio.CancelScope() as scope:
            try:
                await in_connect(our_server, client_ctx, cancelled_in_stream)
            except BaseException as exc:
                seen.append(exc)
                raise
        assert scope.cancelled_caught
        assert [type(e) for e in seen] == [trio.Cancelled]
        # a cancel scope around connect, cancelled while a unary call runs in it
        echo.started, echo.cancelled = trio.Event(), trio.Event()
        outer = trio.CancelScope()

        async def cancel_when_started() -> None:
            await echo.started.wait()
            outer.cancel()

        async def long_call(ch: Channel) -> None:
            await ch.unary(UNARY, EchoRequest(sleep=60), EchoReply)
            pytest.fail("not cancelled")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_started)
            with outer:
                await in_connect(our_server, client_ctx, long_call)
        assert outer.cancelled_caught
        await echo.cancelled.wait()  # the server's handler was cancelled too


async def test_keyboard_interrupt_in_the_body_stays_plain(
    our_server: OurServer, client_ctx: ssl.SSLContext
) -> None:
    async def body(ch: Channel) -> None:
        await ch.unary(UNARY, EchoRequest(payload=b"a"), EchoReply)
        raise KeyboardInterrupt

    with trio.fail_after(BOUND), pytest.raises(KeyboardInterrupt):
        await in_connect(our_server, client_ctx, body)
