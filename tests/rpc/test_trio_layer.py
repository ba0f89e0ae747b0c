"""The trio layer over memory streams: deadlines, drain, handshake, backpressure, leaks."""

from __future__ import annotations

import contextlib
import logging
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing

from trio_jobs.rpc import (
    Channel,
    Method,
    RpcError,
    Serialized,
    Server,
    ServerContext,
    ServerLimits,
    StatusCode,
    connect,
    open_channel,
)

from .echo import STREAM, UNARY, EchoReply, EchoRequest, TrioEcho

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Callable

MiB = 1024 * 1024


@asynccontextmanager
async def served(
    server: Server, nursery: trio.Nursery, *, tls_client: ssl.SSLContext | None = None
) -> AsyncIterator[Channel]:
    a, b = trio.testing.memory_stream_pair()
    done = trio.Event()

    async def serve() -> None:
        try:
            await server.serve_connection(a)
        finally:
            done.set()

    nursery.start_soon(serve)
    stream: trio.abc.Stream = b
    if tls_client is not None:
        stream = trio.SSLStream(b, tls_client, server_hostname="localhost")
        await stream.do_handshake()
    async with open_channel(stream) as ch:
        yield ch
    with trio.fail_after(30):
        await done.wait()


async def collect(ch: Channel, method: str, request: Any, limit: float | None = None) -> list[int]:
    """Run a server-streaming call to the end; the indexes received."""
    async with ch.server_stream(method, request, EchoReply, timeout=limit) as s:
        return [m.index async for m in s]


def plain(echo: TrioEcho, extra: list[Method] | None = None, **limits: Any) -> Server:
    return Server(
        [*echo.methods(), *(extra or [])], ssl_context=None, limits=ServerLimits(**limits)
    )


async def test_server_enforces_grpc_timeout(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    echo = TrioEcho()
    async with served(plain(echo), nursery) as ch:
        start = trio.current_time()
        # Bypass the client's own deadline so only the server's cancel scope can fire.
        state = await ch._open(UNARY, EchoRequest(sleep=100), 5.0, ())
        with pytest.raises(RpcError) as info:
            await ch._next_message(state)
        ch._close_call(state)
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)
        assert echo.cancelled.is_set()
        assert echo.deadlines[0] == pytest.approx(start + 5.0, abs=0.01)


async def test_client_timeout_resets_and_cancels_handler(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    echo = TrioEcho()
    async with served(plain(echo), nursery) as ch:
        with pytest.raises(RpcError) as info:
            await ch.unary(UNARY, EchoRequest(sleep=100), EchoReply, timeout=2.5)
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        with trio.fail_after(1):
            await echo.cancelled.wait()
        # and a server stream whose deadline passes between messages
        echo.cancelled = trio.Event()
        with pytest.raises(RpcError) as info:
            await collect(ch, STREAM, EchoRequest(count=100, size=1, sleep=1), limit=3.5)
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED
        with trio.fail_after(1):  # the server's handler was cancelled too
            await echo.cancelled.wait()
        assert (await ch.unary(UNARY, EchoRequest(payload=b"ok"), EchoReply)).payload == b"ok"


async def test_drain_deadline_then_unavailable(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    echo = TrioEcho()
    server = plain(echo)
    async with served(server, nursery) as ch:
        results: dict[str, Any] = {}

        async def slow_call() -> None:
            try:
                await ch.unary(UNARY, EchoRequest(sleep=100), EchoReply)
            except RpcError as exc:
                results["slow"] = exc.code

        async def quick_stream() -> None:
            async with ch.server_stream(
                STREAM, EchoRequest(count=5, size=1, sleep=0.5), EchoReply
            ) as s:
                results["stream"] = [m.index async for m in s]

        async with trio.open_nursery() as calls:
            calls.start_soon(slow_call)
            calls.start_soon(quick_stream)
            await echo.started.wait()
            await trio.testing.wait_all_tasks_blocked()
            start = trio.current_time()
            await server.shutdown(drain_timeout=3.0)
            took = trio.current_time() - start
        assert results["stream"] == [0, 1, 2, 3, 4]  # in-flight call finished while draining
        assert results["slow"] == StatusCode.UNAVAILABLE  # cut at the drain deadline
        assert echo.cancelled.is_set()
        assert 3.0 <= took < 3.5
        with pytest.raises(RpcError) as info:
            await ch.unary(UNARY, EchoRequest(), EchoReply)
        assert info.value.code == StatusCode.UNAVAILABLE


async def test_handshake_timeout_and_alpn(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    server = Server(TrioEcho().methods(), ssl_context=server_ssl_context)
    a, b = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with trio.fail_after(60):
        await server.serve_connection(a)  # the peer never says anything
    assert trio.current_time() - start == pytest.approx(10.0, abs=0.01)
    await b.aclose()

    # TLS done but no HTTP/2 preface: closed after the same timeout.
    plain_server = plain(TrioEcho())
    a, b = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with trio.fail_after(60):
        await plain_server.serve_connection(a)
    assert trio.current_time() - start == pytest.approx(10.0, abs=0.01)
    await b.aclose()

    # A client that does not offer h2 completes TLS but is closed at once.
    ctx = client_ssl_context_for("alice")
    ctx.set_alpn_protocols(["http/1.1"])
    a, b = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_connection, a)
    tls = trio.SSLStream(b, ctx, server_hostname="localhost")
    await tls.do_handshake()
    with trio.fail_after(5):
        try:
            data = await tls.receive_some(100)
        except trio.BrokenResourceError:  # closed without close_notify
            data = b""
    assert data == b""

    # With TLS and h2, the handler sees the client certificate's identity.
    echo = TrioEcho()
    from trio_jobs.security.identity import identity_from_peercert

    server = Server(echo.methods(), ssl_context=server_ssl_context, identify=identity_from_peercert)
    async with served(server, nursery, tls_client=client_ssl_context_for("bob")) as ch:
        await ch.unary(UNARY, EchoRequest(), EchoReply)
    assert echo.identities == ["bob"]


async def test_backpressure_slow_reader(nursery: trio.Nursery) -> None:
    echo = TrioEcho()
    async with served(plain(echo), nursery) as ch:
        async with ch.server_stream(STREAM, EchoRequest(count=200, size=64 * 1024), EchoReply) as s:
            it = aiter(s)
            first = await anext(it)
            assert first.index == 0
            await trio.testing.wait_all_tasks_blocked()
            sent_while_blocked = echo.sent
            # The client holds at most about one stream window (1 MiB) of unread messages:
            # the server's send() is blocked, not buffering.
            assert sent_while_blocked * 64 * 1024 <= 1 * MiB + 2 * 64 * 1024
            assert sent_while_blocked < 200
            await trio.testing.wait_all_tasks_blocked()
            assert echo.sent == sent_while_blocked  # really blocked, not slow
            rest = [m.index async for m in it]
        assert rest == list(range(1, 200))
        assert echo.sent == 200


async def test_streamed_message_leaves_before_the_handler_waits(nursery: trio.Nursery) -> None:
    """A streaming send() writes in batches (``YIELD_BYTES``), but a message sent before
    the handler waits for something else (a live follower's next output) goes at once,
    even when nothing else happens on the connection."""
    go, sent = trio.Event(), trio.Event()

    async def follower(request: Any, ctx: ServerContext, send: Any) -> None:
        await go.wait()
        await send(EchoReply(index=7))
        sent.set()
        await trio.sleep_forever()

    method = Method(
        path="/t.T/Follow",
        request_type=EchoRequest,
        response_type=EchoReply,
        handler=follower,
        server_streaming=True,
    )
    async with (
        served(plain(TrioEcho(), [method]), nursery) as ch,
        ch.server_stream("/t.T/Follow", EchoRequest(), EchoReply) as s,
    ):
        await trio.testing.wait_all_tasks_blocked()  # the connection is quiet
        go.set()
        await sent.wait()
        with trio.fail_after(10):
            first = await anext(aiter(s))
    assert first.index == 7


async def test_handlers_may_send_what_they_serialized(nursery: trio.Nursery) -> None:
    """``Serialized`` bytes go out as they are, from a streaming send() and as a unary
    handler's answer; anything that is neither the response type nor Serialized is a
    TypeError in the handler (UNKNOWN for the caller)."""

    async def stream(request: Any, ctx: ServerContext, send: Any) -> None:
        await send(Serialized(EchoReply(index=1).SerializeToString()))
        await send(EchoReply(index=2))
        await send(EchoRequest(count=3))

    async def unary(request: Any, ctx: ServerContext) -> Any:
        return Serialized(EchoReply(payload=b"ok").SerializeToString())

    methods = [
        Method(path="/t.T/S", request_type=EchoRequest, response_type=EchoReply, handler=stream,
               server_streaming=True),
        Method(path="/t.T/U", request_type=EchoRequest, response_type=EchoReply, handler=unary),
    ]  # fmt: skip
    got: list[int] = []

    async def collect_indexes(ch: Channel) -> None:
        async with ch.server_stream("/t.T/S", EchoRequest(), EchoReply) as s:
            async for m in s:
                got.append(m.index)

    async with served(plain(TrioEcho(), methods), nursery) as ch:
        with pytest.raises(RpcError) as info:
            await collect_indexes(ch)
        assert got == [1, 2]
        assert info.value.code == StatusCode.UNKNOWN
        assert (await ch.unary("/t.T/U", EchoRequest(), EchoReply)).payload == b"ok"


async def test_connection_drop_wakes_every_waiter(nursery: trio.Nursery) -> None:
    echo = TrioEcho()
    server = plain(echo)
    a, b = trio.testing.memory_stream_pair()
    nursery.start_soon(server.serve_connection, a)
    outcome: list[StatusCode] = []
    async with open_channel(b) as ch:

        async def waiting_call() -> None:
            try:
                await ch.unary(UNARY, EchoRequest(sleep=1000), EchoReply)
            except RpcError as exc:
                outcome.append(exc.code)

        async with trio.open_nursery() as calls:
            calls.start_soon(waiting_call)
            # a server stream whose send() waits for window because nobody reads it
            async with ch.server_stream(
                STREAM, EchoRequest(count=1000, size=64 * 1024), EchoReply
            ) as s:
                await anext(aiter(s))
                await trio.testing.wait_all_tasks_blocked()
                with trio.fail_after(5):
                    await a.aclose()  # the server's transport dies under both calls
                    await echo.cancelled.wait()
                    with pytest.raises(RpcError) as info:
                        async for _ in s:
                            pass
                assert info.value.code == StatusCode.UNAVAILABLE
    assert outcome == [StatusCode.UNAVAILABLE]


async def test_handler_exception_is_unknown_and_logged(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(request: Any, ctx: ServerContext) -> Any:
        raise ValueError("secret internals")

    async def bad_stream(request: Any, ctx: ServerContext, send: Any) -> None:
        await send(EchoReply(index=1))
        raise RuntimeError("also secret")

    methods = [
        Method(
            path="/t.T/Broken", request_type=EchoRequest, response_type=EchoReply, handler=broken
        ),
        Method(
            path="/t.T/BadStream",
            request_type=EchoRequest,
            response_type=EchoReply,
            handler=bad_stream,
            server_streaming=True,
        ),
    ]
    caplog.set_level(logging.ERROR, "trio_jobs.rpc")
    async with served(plain(TrioEcho(), methods), nursery) as ch:
        with pytest.raises(RpcError) as info:
            await ch.unary("/t.T/Broken", EchoRequest(), EchoReply)
        assert info.value.code == StatusCode.UNKNOWN
        assert "secret" not in info.value.message
        async with ch.server_stream("/t.T/BadStream", EchoRequest(), EchoReply) as s:
            it = aiter(s)
            assert (await anext(it)).index == 1
            with pytest.raises(RpcError) as info:
                await anext(it)
        assert info.value.code == StatusCode.UNKNOWN
        assert "secret" not in info.value.message
    assert "secret internals" in caplog.text
    assert "also secret" in caplog.text


async def test_unparseable_request_and_concurrency(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    class Raw:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def SerializeToString(self) -> bytes:
            return self.data

    echo = TrioEcho()
    async with served(plain(echo), nursery) as ch:
        with pytest.raises(RpcError) as info:
            await ch.unary(UNARY, Raw(b"\xff\xff\xff"), EchoReply)  # type: ignore[arg-type]
        assert info.value.code == StatusCode.INVALID_ARGUMENT  # (test_request_parse.py)
        results: list[bytes] = []

        async def one(i: int) -> None:
            r = await ch.unary(UNARY, EchoRequest(payload=b"%d" % i, sleep=1), EchoReply)
            results.append(r.payload)

        start = trio.current_time()
        async with trio.open_nursery() as n:
            for i in range(150):  # over the default max_concurrent_streams (100)
                n.start_soon(one, i)
        assert sorted(results) == sorted(b"%d" % i for i in range(150))
        # 100 ran at once, the other 50 waited for a free stream, then ran at once too
        assert 2.0 <= trio.current_time() - start < 2.5


async def test_many_sequential_calls_leave_no_state(nursery: trio.Nursery) -> None:
    """5,000 calls through the trio layer (the 100,000-call run is in test_protocol_core)."""
    echo = TrioEcho()
    server = plain(echo)
    async with served(server, nursery) as ch:
        req = EchoRequest(payload=b"p")
        for _ in range(5_000):
            await ch.unary(UNARY, req, EchoReply)
        (conn,) = server._connections
        assert conn.states == {}
        assert conn.calls == {}
        assert conn.idle.is_set()
        assert conn.protocol.open_streams == 0
        assert len(conn.protocol._h2.conn.streams) <= 2
        # every byte the client sent was credited back (h2 holds back < half a window)
        assert conn.protocol._h2.conn._inbound_flow_control_window_manager.current_window_size > 2 * MiB
        assert ch.states == {}
        assert ch.protocol.open_streams == 0
        assert ch.protocol._h2.conn._inbound_flow_control_window_manager.current_window_size > 2 * MiB
    assert echo.finished == 5_000


async def test_serve_tcp_lifecycle_limits_and_half_open_connections(
    server_ssl_context: ssl.SSLContext, client_ssl_context_for: Callable[[str], ssl.SSLContext]
) -> None:
    echo = TrioEcho()
    server = Server(
        echo.methods(), ssl_context=server_ssl_context, limits=ServerLimits(max_connections=2)
    )
    returned = trio.Event()

    async def run(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
        await server.serve_tcp("127.0.0.1", 0, task_status=task_status)
        returned.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(run)
            (host, port) = bound[0]
            assert host == "127.0.0.1"
            half_open = await trio.open_tcp_stream(host, port)  # never starts TLS
            async with connect(
                host, port, ssl_context=client_ssl_context_for("alice"), server_hostname="localhost"
            ) as ch:
                assert (await ch.unary(UNARY, EchoRequest(payload=b"a"), EchoReply)).payload == b"a"
                # over max_connections: closed at once
                third = await trio.open_tcp_stream(host, port)
                with suppress(trio.BrokenResourceError):
                    assert await third.receive_some(10) == b""
                await third.aclose()
                await server.shutdown(drain_timeout=5.0)  # not delayed by the half-open one
                await returned.wait()
            await half_open.aclose()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not HTTP/2 at all
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x04\x99\x00\x00\x00\x00\x01" * 3,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        + b"\x00\x00\x05\x00\x01\x00\x00\x00\x01\x00\x7f\xff\xff\xff",  # DATA on an idle stream
    ],
)
async def test_bad_peer_is_closed_and_others_unaffected(
    nursery: trio.Nursery, garbage: bytes
) -> None:
    echo = TrioEcho()
    server = plain(echo)
    async with served(server, nursery) as good:
        a, b = trio.testing.memory_stream_pair()
        bad_done = trio.Event()

        async def serve_bad() -> None:
            await server.serve_connection(a)
            bad_done.set()

        nursery.start_soon(serve_bad)
        await b.send_all(garbage)
        received = b""
        with trio.fail_after(5):
            while chunk := await b.receive_some(65536):
                received += chunk
        # the server said why (GOAWAY: type 7) before closing
        assert b"\x07\x00\x00\x00\x00\x00" in received
        with trio.fail_after(1):  # and its tasks are all done at once (no lingering watchdog)
            await bad_done.wait()
        assert (await good.unary(UNARY, EchoRequest(payload=b"fine"), EchoReply)).payload == b"fine"


async def test_cancel_during_blocked_write_keeps_tls_connection_usable(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    """A call cancelled while its bytes are stuck in the transport must not break TLS.

    (A send_all cancelled half-way leaves a trio.SSLStream broken for every other call:
    only the connection's writer task writes, and it is never cancelled by a call.)
    """
    c2s_send, c2s_recv = trio.testing.memory_stream_one_way_pair()
    s2c_send, s2c_recv = trio.testing.memory_stream_one_way_pair()
    gate = trio.Event()
    gate.set()
    pump = c2s_send.send_all_hook

    async def gated() -> None:
        await gate.wait()
        if pump is not None:
            await pump()

    c2s_send.send_all_hook = gated
    echo = TrioEcho()
    server = Server(echo.methods(), ssl_context=server_ssl_context)
    nursery.start_soon(server.serve_connection, trio.StapledStream(s2c_send, c2s_recv))
    tls = trio.SSLStream(
        trio.StapledStream(c2s_send, s2c_recv),
        client_ssl_context_for("alice"),
        server_hostname="localhost",
    )
    await tls.do_handshake()
    async with open_channel(tls) as ch:
        assert (await ch.unary(UNARY, EchoRequest(payload=b"1"), EchoReply)).payload == b"1"
        gate = trio.Event()  # the network stalls
        with pytest.raises(RpcError) as info:
            await ch.unary(UNARY, EchoRequest(payload=b"x" * 100_000), EchoReply, timeout=1.0)
        assert info.value.code == StatusCode.DEADLINE_EXCEEDED  # not stuck in the write
        gate.set()  # the network recovers: the connection is intact
        assert (await ch.unary(UNARY, EchoRequest(payload=b"2"), EchoReply)).payload == b"2"


async def test_connect_failures_are_unavailable(
    nursery: trio.Nursery,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    ctx = client_ssl_context_for("alice")
    # nothing listens there
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    with trio.fail_after(20), pytest.raises(RpcError) as info:
        async with connect("127.0.0.1", port, ssl_context=ctx, server_hostname="localhost"):
            pass
    assert info.value.code == StatusCode.UNAVAILABLE

    # a TCP server that closes at once (no TLS)
    async def slam(stream: trio.SocketStream) -> None:
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, slam, 0)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(20), pytest.raises(RpcError) as info:
        async with connect("127.0.0.1", port, ssl_context=ctx, server_hostname="localhost"):
            pass
    assert info.value.code == StatusCode.UNAVAILABLE
    assert "TLS handshake" in info.value.message

    # a TLS server that does not offer h2
    server_ssl_context.set_alpn_protocols(["http/1.1"])

    async def no_h2(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_ssl_context, server_side=True)
        with contextlib.suppress(trio.BrokenResourceError):
            await tls.do_handshake()
            await tls.receive_some(10)
        await trio.aclose_forcefully(tls)

    listeners = await nursery.start(trio.serve_tcp, no_h2, 0)
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(20), pytest.raises(RpcError) as info:
        async with connect("127.0.0.1", port, ssl_context=ctx, server_hostname="localhost"):
            pass
    assert info.value.code == StatusCode.UNAVAILABLE
    assert "ALPN h2" in info.value.message


async def test_send_limits_both_sides(nursery: trio.Nursery) -> None:
    echo = TrioEcho()
    server = plain(echo, max_send_message=1000)
    async with served(server, nursery) as ch:
        with pytest.raises(RpcError) as info:  # the server's response is too large to send
            await ch.unary(UNARY, EchoRequest(size=2000), EchoReply)
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert "exceeds the limit of 1000" in info.value.message
        with pytest.raises(RpcError) as info:  # our request is over the channel's limit
            await ch.unary(UNARY, EchoRequest(payload=b"z" * (4 * MiB + 1)), EchoReply)
        assert info.value.code == StatusCode.RESOURCE_EXHAUSTED
        assert (await ch.unary(UNARY, EchoRequest(size=10), EchoReply)).payload == b"x" * 10
