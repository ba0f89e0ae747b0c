"""Bounded send buffering: a client that reads slowly never makes the server queue much.

Flow control alone bounds what the server may send by the client's window; a client with a
large window (1 MiB per stream is ours, grpcio's can grow) that then reads slowly used to
leave that whole window queued in the server's memory, once as h2 frames and once as
ciphertext (issue 7's fan-out figure: ~1.3 MiB per follower). The server's ``send`` now
waits for the socket instead once SEND_HIGH_WATER bytes are unsent.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import trio
import trio.testing
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame, PingFrame, SettingsFrame, WindowUpdateFrame

from trio_jobs.rpc._connection import SEND_HIGH_WATER

from .echo import STREAM, EchoRequest
from .rawh2 import MIN_MAX_FRAME, RawH2, grpc_message, split_grpc_messages

if TYPE_CHECKING:
    import ssl

    from .peers import OurServer

KiB = 1024
MAX_WINDOW = 2**31 - 1
COUNT = 200
SIZE = 64 * KiB
# One DATA frame (the client's max frame size, and its header) and the TLS record
# overhead of what one write can hold (<= 22 bytes per 16 KiB record, generously).
SLACK = MIN_MAX_FRAME + 9 + 64 * (SEND_HIGH_WATER // MIN_MAX_FRAME + 2)


async def _slow_client(port: int, ctx: ssl.SSLContext) -> RawH2:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    # A small receive buffer so the server meets a full socket soon (less to read back).
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    tls = trio.SSLStream(tcp, ctx, server_hostname="localhost")
    await tls.do_handshake()
    return RawH2(tls)


async def test_slow_reader_keeps_server_unsent_bytes_under_the_mark(
    our_server: OurServer, client_ctx: ssl.SSLContext
) -> None:
    with trio.fail_after(60):
        raw = await _slow_client(our_server.port, client_ctx)
        async with raw:
            # The largest windows there are: flow control alone would let the server queue
            # the whole response (12.5 MiB).
            await raw.send_preface({SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW})
            sid = raw.new_stream_id()
            request = EchoRequest(count=COUNT, size=SIZE).SerializeToString()
            await raw.send(
                WindowUpdateFrame(0, MAX_WINDOW - 65_535),
                raw.headers_frame(sid, STREAM),
                DataFrame(sid, grpc_message(request), flags=["END_STREAM"]),
            )
            # Read nothing: the kernel's buffers fill up, then the server must wait.
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            (conn,) = our_server.server._connections
            blocked_at = our_server.echo.sent
            assert 0 < blocked_at < COUNT, "the server did not block on the full socket"
            assert conn.peak_unsent <= SEND_HIGH_WATER + SLACK
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert our_server.echo.sent == blocked_at  # really blocked, not slow

            # Now read it all: every message arrives, in order, and the bound held.
            body = bytearray()
            while True:
                got = await raw.next_frame()
                assert got is not None, "connection closed before the stream ended"
                frame = got.frame
                if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                    await raw.send(SettingsFrame(0, flags=["ACK"]))
                elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
                    await raw.send(PingFrame(0, frame.opaque_data, flags=["ACK"]))
                if frame.stream_id != sid:
                    continue
                if isinstance(frame, DataFrame):
                    body += frame.data
                if "END_STREAM" in frame.flags:
                    break
    messages = split_grpc_messages(bytes(body))
    assert len(messages) == COUNT
    assert our_server.echo.sent == COUNT
    assert conn.peak_unsent <= SEND_HIGH_WATER + SLACK
