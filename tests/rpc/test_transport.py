"""The lean TLS transport (``rpc._transport``): real TLS, over memory streams and sockets.

The bytes, their order and the end of the stream must be exactly what the peer sent,
whoever the peer is (another Transport, or trio's own SSLStream); every failure is a trio
Broken/Closed error; a cancelled send leaves the session intact.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing

from trio_jobs.rpc._transport import Transport, open_transport
from trio_jobs.security.identity import identity_from_peercert

pytestmark = pytest.mark.one_rpc_mode  # compares the rpc modes itself (or uses no protocol): one run

if TYPE_CHECKING:
    from collections.abc import Callable

KiB = 1024
PAYLOAD = bytes(range(256)) * 800  # 200 KiB: 13 TLS records


async def _read_all(wire: Transport, max_bytes: int) -> tuple[list[int], bytes]:
    """Read until EOF: the size of each piece, and all the bytes."""
    sizes: list[int] = []
    got = bytearray()
    with trio.fail_after(10):
        while data := await wire.receive_some(max_bytes):
            sizes.append(len(data))
            got += data
    return sizes, bytes(got)


async def _send_all(wire: Transport, data: bytes) -> None:
    wire.write(data)
    while wire.buffered:
        if not wire.send_nowait():
            await wire.send_some()


async def _sslstream_server(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[trio.SSLStream[trio.abc.Stream], Transport]:
    a, b = trio.testing.memory_stream_pair()
    server: trio.SSLStream[trio.abc.Stream] = trio.SSLStream(a, server_ctx, server_side=True)
    client = open_transport(b, client_ctx, server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    return server, client


async def test_buffered_records_come_in_one_piece(
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    server, client = await _sslstream_server(server_ssl_context, client_ssl_context_for("alice"))
    assert client.selected_alpn_protocol() == "h2"
    await server.send_all(PAYLOAD)  # one transport write: every record is buffered at once
    await server.aclose()  # close_notify after the data
    sizes, got = await _read_all(client, 256 * KiB)
    assert got == PAYLOAD
    assert sizes == [len(PAYLOAD)]


async def test_reads_stop_at_max_bytes_and_keep_order(
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    server, client = await _sslstream_server(server_ssl_context, client_ssl_context_for("alice"))
    for i in range(0, len(PAYLOAD), 50 * KiB):  # writes that do not end on record bounds
        await server.send_all(PAYLOAD[i : i + 50 * KiB])
    await server.aclose()
    sizes, got = await _read_all(client, 40 * KiB)
    assert got == PAYLOAD
    assert max(sizes) <= 40 * KiB
    assert len(sizes) < len(PAYLOAD) // (16 * KiB)  # fewer pieces than records


async def test_wire_to_wire_identity_both_ways_and_close_notify(
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    a, b = trio.testing.memory_stream_pair()
    server = open_transport(a, server_ssl_context, server_side=True)
    client = open_transport(b, client_ssl_context_for("bob"), server_hostname="localhost")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    assert identity_from_peercert(server.getpeercert()) == "bob"
    assert server.selected_alpn_protocol() == "h2"
    await _send_all(client, b"ping")
    assert await server.receive_some(100) == b"ping"
    await _send_all(server, PAYLOAD)
    await server.aclose()  # close_notify: a clean end, not a broken stream
    _, got = await _read_all(client, 256 * KiB)
    assert got == PAYLOAD
    await client.aclose()
    await client.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await client.receive_some(10)


async def test_ragged_eof_is_broken(
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    server, client = await _sslstream_server(server_ssl_context, client_ssl_context_for("alice"))
    await server.send_all(b"last words")
    await trio.aclose_forcefully(server.transport_stream)  # no close_notify
    assert await client.receive_some(100) == b"last words"
    with pytest.raises(trio.BrokenResourceError) as info:
        await client.receive_some(100)
    assert isinstance(info.value.__cause__, ssl.SSLError)


async def test_handshake_refused_is_broken_with_the_ssl_cause(
    server_ssl_context: ssl.SSLContext, dev_pki: object
) -> None:
    untrusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # trusts no CA at all
    untrusting.set_alpn_protocols(["h2"])
    a, b = trio.testing.memory_stream_pair()
    server = open_transport(a, server_ssl_context, server_side=True)
    client = open_transport(b, untrusting, server_hostname="localhost")
    outcome: list[BaseException] = []

    async def serve() -> None:
        try:
            await server.do_handshake()
        except trio.BrokenResourceError as exc:
            outcome.append(exc)
        finally:
            await server.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            with pytest.raises(trio.BrokenResourceError) as info:
                await client.do_handshake()
            await client.aclose()
    assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    assert len(outcome) == 1  # the server saw the client's alert (or its EOF) as broken


async def _tcp_wires(
    listener: trio.SocketListener, server_context: ssl.SSLContext, client_context: ssl.SSLContext
) -> tuple[Transport, Transport]:
    """(server, client) Wires over a real loopback TCP connection, handshakes done."""
    port = listener.socket.getsockname()[1]
    accepted: list[Transport] = []

    async def accept() -> None:
        wire = open_transport(await listener.accept(), server_context, server_side=True)
        await wire.do_handshake()
        accepted.append(wire)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        client = open_transport(await trio.open_tcp_stream("127.0.0.1", port), client_context, server_hostname="localhost")
        await client.do_handshake()
    (server,) = accepted
    return server, client


async def test_sockets_bulk_both_ways_and_cancelled_send_keeps_the_session(
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    """Over real sockets: a send blocked on a full socket, cancelled, loses nothing."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    big = PAYLOAD * 40  # 8 MiB: more than the kernel buffers hold
    with trio.fail_after(30):
        server, client = await _tcp_wires(listeners[0], server_ssl_context, client_ssl_context_for("alice"))
        client.write(big)
        assert not client.send_nowait()  # the peer reads nothing yet: the socket is full
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.send_some()  # cancelled while waiting for the socket
        assert client.buffered > 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_all, client, b"")
            _, got = await _read_upto(server, len(big))
        assert got == big
        await _send_all(server, b"pong")
        assert await client.receive_some(100) == b"pong"
        await client.aclose()
        _, rest = await _read_all(server, 256 * KiB)  # close_notify: a clean EOF
        assert rest == b""
        await server.aclose()
    await listeners[0].aclose()


async def _read_upto(wire: Transport, n: int) -> tuple[int, bytes]:
    got = bytearray()
    reads = 0
    while len(got) < n:
        data = await wire.receive_some(256 * KiB)
        assert data, "EOF before all the data"
        got += data
        reads += 1
    return reads, bytes(got)


async def test_plain_stream_passes_bytes_through() -> None:
    a, b = trio.testing.memory_stream_pair()
    wire = open_transport(b)
    assert wire.selected_alpn_protocol() is None
    assert wire.getpeercert() is None
    await wire.do_handshake()  # nothing to do
    await a.send_all(b"abc")
    assert await wire.receive_some(10) == b"abc"
    wire.write(b"xyz")
    assert not wire.send_nowait()  # only the writer sends over a stream
    await wire.send_some()
    assert await a.receive_some(10) == b"xyz"
    assert wire.sent_total == wire.queued_total == 3
    await wire.aclose()
    assert await a.receive_some(10) == b""


async def test_linger_delivers_the_last_bytes_to_a_peer_still_sending(
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    """Our last words, then FIN; input is drained meanwhile, so the peer is not reset."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    with trio.fail_after(30):
        server, client = await _tcp_wires(listeners[0], server_ssl_context, client_ssl_context_for("alice"))
        sent: list[BaseException | None] = []
        done = trio.Event()

        async def send_more_than_the_buffers_hold() -> None:  # input the server never reads
            try:
                await _send_all(client, b"f" * (8 * 1024 * 1024))
                sent.append(None)
            except trio.BrokenResourceError as exc:  # reset: closed with our input unread
                sent.append(exc)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_more_than_the_buffers_hold)
            await trio.testing.wait_all_tasks_blocked()  # the socket buffers are full
            await _send_all(server, b"GOAWAY, and here is why")
            nursery.start_soon(server.linger, 20.0, 16 * 1024 * 1024)
            await done.wait()
            assert sent == [None]  # the server drained it all instead of resetting
            _, got = await _read_all(client, 256 * KiB)  # then EOF after close_notify: clean
            assert got == b"GOAWAY, and here is why"
            await client.aclose()  # the server's linger ends on this EOF
        await server.aclose()
    await listeners[0].aclose()
