"""The blocking driver (``rpc._blocking.BlockingChannel``) against our trio server.

The driver runs in a worker thread (it blocks); the server runs on the test's trio loop.
It shares the sans-IO ClientProtocol with the trio Channel, so these tests are about what
the driver itself owns: moving bytes both ways (flow control for requests and responses
larger than a window), the status of each outcome, deadlines, and connections the server
ended while the driver was idle.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

import pytest
import trio

from trio_jobs.rpc import ChannelOptions, RpcError, ServerLimits, StatusCode
from trio_jobs.rpc._blocking import BlockingChannel

from .echo import UNARY, EchoReply, EchoRequest

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

    from .peers import OurServer

MiB = 1024 * 1024


def _connect(port: int, ctx: ssl.SSLContext) -> BlockingChannel:
    return BlockingChannel.connect("127.0.0.1", port, ssl_context=ctx)


async def _in_thread(fn: Callable[[], Any]) -> Any:
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(fn)


async def test_unary_round_trips_and_statuses(
    our_server: OurServer, client_ssl_context_for: Callable[[str], ssl.SSLContext]
) -> None:
    ctx = client_ssl_context_for("alice")

    def calls() -> tuple[Any, Any, RpcError]:
        with _connect(our_server.port, ctx) as ch:
            small = ch.unary(UNARY, EchoRequest(payload=b"hi"), EchoReply)
            # 3 MiB each way: the request passes the server's 1 MiB stream window only
            # through its WINDOW_UPDATEs, the response ours only through ours.
            big = ch.unary(UNARY, EchoRequest(payload=b"r" * (3 * MiB)), EchoReply)
            with pytest.raises(RpcError) as failed:
                ch.unary(UNARY, EchoRequest(fail_code=5, fail_message="no such thing"), EchoReply)
            again = ch.unary(UNARY, EchoRequest(payload=b"after"), EchoReply)  # still usable
            assert again.payload == b"after"
            return small, big, failed.value

    small, big, failed = await _in_thread(calls)
    assert small.payload == b"hi"
    assert big.payload == b"r" * (3 * MiB)
    assert (failed.code, failed.message) == (StatusCode.NOT_FOUND, "no such thing")
    assert our_server.echo.identities[0] == "alice"  # the client certificate was presented


async def test_deadline_exceeded_cancels_the_handler(
    our_server: OurServer, client_ssl_context_for: Callable[[str], ssl.SSLContext]
) -> None:
    ctx = client_ssl_context_for("alice")

    def call() -> RpcError:
        with _connect(our_server.port, ctx) as ch, pytest.raises(RpcError) as failed:
            ch.unary(UNARY, EchoRequest(sleep=30), EchoReply, timeout=0.3)
        return failed.value

    failed = await _in_thread(call)
    assert failed.code == StatusCode.DEADLINE_EXCEEDED
    with trio.fail_after(10):
        await our_server.echo.cancelled.wait()  # grpc-timeout (or our reset) reached it


async def test_oversized_request_is_refused_before_sending(
    our_server: OurServer, client_ssl_context_for: Callable[[str], ssl.SSLContext]
) -> None:
    ctx = client_ssl_context_for("alice")

    def call() -> RpcError:
        with _connect(our_server.port, ctx) as ch, pytest.raises(RpcError) as failed:
            ch.unary(UNARY, EchoRequest(payload=b"x" * (5 * MiB)), EchoReply)
        return failed.value

    failed = await _in_thread(call)
    assert failed.code == StatusCode.RESOURCE_EXHAUSTED
    assert our_server.echo.finished == 0


@pytest.mark.parametrize("limits", [ServerLimits(idle_timeout=0.2)])
async def test_idle_connection_closed_by_the_server_is_seen_before_a_call(
    our_server: OurServer, client_ssl_context_for: Callable[[str], ssl.SSLContext]
) -> None:
    ctx = client_ssl_context_for("alice")
    ch = await _in_thread(lambda: _connect(our_server.port, ctx))
    try:
        assert (await _in_thread(lambda: ch.unary(UNARY, EchoRequest(payload=b"1"), EchoReply))).payload == b"1"
        assert ch.usable
        with trio.fail_after(10):
            while await _in_thread(lambda: ch.usable):  # the idle GOAWAY and close arrive
                await trio.sleep(0.05)
        with pytest.raises(RpcError) as failed:
            await _in_thread(lambda: ch.unary(UNARY, EchoRequest(payload=b"2"), EchoReply))
        assert failed.value.code == StatusCode.UNAVAILABLE
    finally:
        ch.close()


async def test_connection_failures_are_unavailable(
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    ctx = client_ssl_context_for("alice")
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RpcError) as refused:
        _connect(port, ctx)
    assert refused.value.code == StatusCode.UNAVAILABLE
    assert "cannot connect to 127.0.0.1:" in refused.value.message

    # A peer that accepts and never answers the handshake: the connect timeout ends it.
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    options = ChannelOptions(connect_timeout=0.5)
    try:
        with pytest.raises(RpcError) as silent:
            await _in_thread(
                lambda: BlockingChannel.connect("127.0.0.1", port, ssl_context=ctx, options=options)
            )
    finally:
        listener.close()
    assert silent.value.code == StatusCode.UNAVAILABLE
    assert "TLS handshake with 127.0.0.1:" in silent.value.message
