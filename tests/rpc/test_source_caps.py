"""Per-source caps: one address cannot hold every connection slot (DESIGN §3, issue #16/8).

Real loopback sockets: the flooding address is 127.0.0.1 and the bystander binds its
client socket to 127.0.0.2 (the whole of 127.0.0.0/8 is loopback on Linux). Every wait is
bounded by ``fail_after``; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from typing import TYPE_CHECKING, Any, Final

import pytest
import trio

from trio_jobs.rpc import RpcError, Server, ServerLimits, StatusCode, open_channel
from trio_jobs.rpc._sources import SourceCaps, ThrottledLog, source_key

from .echo import UNARY, EchoReply, EchoRequest, TrioEcho

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

BOUND: Final = 30
FLOODER: Final = "127.0.0.1"
BYSTANDER: Final = "127.0.0.2"


@pytest.mark.parametrize(
    ("peer", "source"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4-mapped: what a dual-stack socket reports
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),  # one /64 is one host or subscriber
        ("2001:db8:1:2:ffff::9", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::1", "::/64"),
        ("not-an-ip", "not-an-ip"),
    ],
)
def test_source_key(peer: str, source: str) -> None:
    assert source_key(peer) == source


def test_source_caps_count_refuse_and_forget() -> None:
    caps = SourceCaps(max_connections=3, max_handshakes=2)
    a1, a2 = caps.admit("a"), caps.admit("a")
    assert not isinstance(a1, str)
    assert not isinstance(a2, str)
    refused = caps.admit("a")  # two handshakes in progress
    assert isinstance(refused, str)
    assert "TLS handshakes in progress" in refused
    assert not isinstance(caps.admit("b"), str)  # other sources are not affected
    a1.handshake_done()
    a1.handshake_done()  # idempotent
    assert caps.handshakes("a") == 1
    a3 = caps.admit("a")
    assert not isinstance(a3, str)
    a2.handshake_done()
    a3.handshake_done()
    refused = caps.admit("a")  # three connections held
    assert isinstance(refused, str)
    assert "already holds 3 connections" in refused
    for a in (a1, a2, a3, a1):  # (release is idempotent too)
        a.release()
    assert (caps.connections("a"), caps.handshakes("a")) == (0, 0)
    assert "a" not in caps._connections  # no entry left behind per source
    assert "a" not in caps._handshakes


def test_throttled_log() -> None:
    log = ThrottledLog(interval=10.0)
    assert log.due(0.0) == 0
    assert [log.due(t) for t in (1.0, 2.0, 9.9)] == [None, None, None]
    assert log.due(10.0) == 3  # reported with the three it kept quiet about
    assert log.due(25.0) == 0


def test_default_caps_leave_the_global_cap_to_many_addresses() -> None:
    d = ServerLimits()
    assert d.max_handshakes_per_source <= d.max_connections_per_source
    assert d.max_connections_per_source * 10 <= d.max_connections


async def open_from(source: str, port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream(FLOODER, port, local_address=source)


async def served_plain(stream: trio.SocketStream) -> bool:
    """A plaintext server sends its SETTINGS at once; a refused connection is closed."""
    try:
        return await stream.receive_some(64) != b""
    except trio.BrokenResourceError:
        return False


@contextlib.asynccontextmanager
async def running(server: Server) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        [(_, port), *_] = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
        yield port
        await server.shutdown(drain_timeout=1.0)


async def test_one_address_cannot_take_the_global_cap() -> None:
    limits = ServerLimits(
        max_connections=8, max_connections_per_source=3, max_handshakes_per_source=3
    )
    server = Server(TrioEcho().methods(), ssl_context=None, limits=limits)
    with trio.fail_after(BOUND):
        async with running(server) as port:
            flood = [await open_from(FLOODER, port) for _ in range(20)]
            try:
                assert [await served_plain(s) for s in flood] == [True] * 3 + [False] * 17
                assert server._sources.connections(FLOODER) == 3
                bystanders = [await open_from(BYSTANDER, port) for _ in range(3)]
                assert [await served_plain(s) for s in bystanders] == [True] * 3
                for s in bystanders:
                    await s.aclose()
            finally:
                for s in flood:
                    await trio.aclose_forcefully(s)


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The first flight of a real TLS client (what costs the server a handshake)."""
    tls = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return out.read()


async def tls_unary(source: str, port: int, ctx: ssl.SSLContext) -> Any:
    tcp = await open_from(source, port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        raise RpcError(StatusCode.UNAVAILABLE, f"handshake failed: {exc}") from exc
    async with open_channel(stream) as channel:
        return await channel.unary(UNARY, EchoRequest(payload=b"hi"), EchoReply)


async def test_pending_handshakes_per_source_are_capped_before_any_tls_work(
    server_ssl_context: ssl.SSLContext, client_ssl_context_for: Callable[[str], ssl.SSLContext]
) -> None:
    limits = ServerLimits(max_connections_per_source=10, max_handshakes_per_source=2)
    server = Server(TrioEcho().methods(), ssl_context=server_ssl_context, limits=limits)
    ctx = client_ssl_context_for("alice")
    with trio.fail_after(BOUND):
        async with running(server) as port:
            silent = [await open_from(FLOODER, port) for _ in range(2)]  # stuck in TLS
            try:
                over = await open_from(FLOODER, port)
                await over.send_all(client_hello(ctx))
                with contextlib.suppress(trio.BrokenResourceError):
                    # closed without a byte of ServerHello: no TLS work was spent on it
                    assert await over.receive_some(4096) == b""
                await over.aclose()
                assert server._sources.handshakes(FLOODER) == 2
                # another address is served while 127.0.0.1 holds its handshake slots
                assert (await tls_unary(BYSTANDER, port, ctx)).payload == b"hi"
                with pytest.raises(RpcError):
                    await tls_unary(FLOODER, port, ctx)
            finally:
                for s in silent:
                    await trio.aclose_forcefully(s)
            # The slots come back once the silent connections are gone (the server sees
            # their EOF asynchronously: a bounded number of tries).
            for _ in range(100):
                with contextlib.suppress(RpcError):
                    assert (await tls_unary(FLOODER, port, ctx)).payload == b"hi"
                    break
            else:
                pytest.fail("the handshake slots of closed connections were never freed")
            assert server._sources.handshakes(FLOODER) == 0


def dual_stack_listener() -> trio.SocketListener:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", 0))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        pytest.skip(f"no dual-stack IPv6 socket here: {exc}")
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))


async def test_ipv4_mapped_peers_count_as_their_ipv4_address() -> None:
    # A dual-stack listener sees 127.0.0.1 as ::ffff:127.0.0.1; an IPv4 listener of the
    # same server sees 127.0.0.1: both are one source, under one cap.
    server = Server(
        TrioEcho().methods(),
        ssl_context=None,
        limits=ServerLimits(max_connections_per_source=2),
    )
    v6 = dual_stack_listener()
    v4 = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    v6_port = v6.socket.getsockname()[1]
    v4_port = v4.socket.getsockname()[1]
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._accept_loop, v6, nursery)
            nursery.start_soon(server._accept_loop, v4, nursery)
            mapped = await open_from(FLOODER, v6_port)
            plain = await open_from(FLOODER, v4_port)
            assert await served_plain(mapped)
            assert await served_plain(plain)
            assert server._sources.connections(FLOODER) == 2
            third = [await open_from(FLOODER, p) for p in (v6_port, v4_port)]
            assert [await served_plain(s) for s in third] == [False, False]
            other = await open_from(BYSTANDER, v6_port)
            assert await served_plain(other)
            assert server._sources.connections(BYSTANDER) == 1
            for s in (mapped, plain, *third, other):
                await trio.aclose_forcefully(s)
            nursery.cancel_scope.cancel()
    await v6.aclose()
    await v4.aclose()
