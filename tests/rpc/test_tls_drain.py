"""The reader takes every TLS record already received at once (Transport._decrypted_more).

trio's SSLStream hands out one record (<= 16 KiB) per receive_some; the reader drains the
rest of what is buffered itself. Real TLS over memory streams: the bytes, their order
and the end of the stream must be exactly what the peer sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
import trio.testing

from trio_jobs.rpc._client_protocol import ClientProtocol
from trio_jobs.rpc._transport import Transport

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

KiB = 1024
MiB = 1024 * KiB
PAYLOAD = bytes(range(256)) * 800  # 200 KiB: 13 records


async def _tls_pair(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[trio.SSLStream[trio.abc.Stream], trio.SSLStream[trio.abc.Stream]]:
    a, b = trio.testing.memory_stream_pair()
    server: trio.SSLStream[trio.abc.Stream] = trio.SSLStream(a, server_ctx, server_side=True)
    client: trio.SSLStream[trio.abc.Stream] = trio.SSLStream(
        b, client_ctx, server_hostname="localhost"
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        await client.do_handshake()
    return server, client


def _transport(stream: trio.abc.Stream, read_size: int) -> Transport:
    protocol = ClientProtocol(
        max_receive_message=4 * MiB,
        max_concurrent_streams=100,
        max_header_list_size=16 * KiB,
        stream_window=MiB,
        connection_window=4 * MiB,
        max_frame_size=MiB,
        clock=trio.current_time,
    )
    return Transport(stream, protocol, read_size)


async def _read_all(transport: Transport, stream: trio.abc.Stream) -> tuple[list[int], bytes]:
    """Read as the reader does until EOF: the size of each piece, and all the bytes."""
    sizes: list[int] = []
    got = bytearray()
    with trio.fail_after(10):
        while data := await stream.receive_some(transport.read_size):
            data = transport._decrypted_more(data)
            sizes.append(len(data))
            got += data
    return sizes, bytes(got)


async def test_buffered_records_come_in_one_piece(
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    server, client = await _tls_pair(server_ssl_context, client_ssl_context_for("alice"))
    transport = _transport(client, 256 * KiB)
    await server.send_all(PAYLOAD)  # one transport write: every record is buffered at once
    await server.aclose()  # close_notify after the data
    sizes, got = await _read_all(transport, client)
    assert got == PAYLOAD
    assert sizes == [len(PAYLOAD)]


async def test_drain_stops_at_read_size_and_keeps_order(
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> None:
    server, client = await _tls_pair(server_ssl_context, client_ssl_context_for("alice"))
    transport = _transport(client, 40 * KiB)
    for i in range(0, len(PAYLOAD), 50 * KiB):  # writes that do not end on record bounds
        await server.send_all(PAYLOAD[i : i + 50 * KiB])
    await server.aclose()
    sizes, got = await _read_all(transport, client)
    assert got == PAYLOAD
    assert max(sizes) <= 40 * KiB
    assert len(sizes) < len(PAYLOAD) // (16 * KiB)  # fewer pieces than records


async def test_plain_stream_is_left_alone() -> None:
    a, b = trio.testing.memory_stream_pair()
    transport = _transport(b, 256 * KiB)
    assert transport._ssl_object is None
    await a.send_all(b"abc")
    assert await b.receive_some(10) == b"abc"
