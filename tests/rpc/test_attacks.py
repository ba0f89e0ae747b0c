"""HTTP/2 attack classes against a real ``trio_jobs.rpc.Server`` over mutual TLS on loopback.

Each attack runs with the raw client of ``rawh2`` (frames the ``h2`` state machine would
never let a client send) and then checks three things: the attacker's connection was closed
with the right code or its stream refused, the server did a bounded amount of work for it
(handlers started, messages buffered, answers queued), and another, well-behaved client is
still served. An exception escaping the server would fail the test through the nursery.

The first tests check the raw client itself against a minimal ``h2`` server, so that a
failure below is the server's and not the test tool's.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame, SettingsFrame
from rawh2 import (
    PREFACE,
    PROTOCOL_ERROR,
    goaway_of,
    grpc_message,
    open_raw_h2,
    split_grpc_messages,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Callable

# Every test's wall-clock safety bound (never a way of waiting for something).
BOUND: float = 30.0


# --- the raw client against a minimal h2 echo server -------------------------------------


async def _h2_echo(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Echo each request's body back with grpc-status 0; GOAWAY on protocol errors."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    conn.initiate_connection()
    bodies: defaultdict[int, bytes] = defaultdict(bytes)
    try:
        await stream.send_all(conn.data_to_send())
        while data := await stream.receive_some(65536):
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                await stream.send_all(conn.data_to_send())
                return
            for ev in events:
                if isinstance(ev, h2.events.DataReceived) and ev.stream_id is not None:
                    bodies[ev.stream_id] += ev.data or b""
                    conn.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id is not None:
                    sid = ev.stream_id
                    conn.send_headers(
                        sid, [(":status", "200"), ("content-type", "application/grpc")]
                    )
                    body = bodies.pop(sid)
                    for i in range(0, len(body), 16384):
                        conn.send_data(sid, body[i : i + 16384])
                    conn.send_headers(sid, [("grpc-status", "0")], end_stream=True)
            await stream.send_all(conn.data_to_send())
    except trio.BrokenResourceError:
        return
    finally:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def _echo_server(server_ssl_context: ssl.SSLContext) -> AsyncIterator[int]:
    """Serve ``_h2_echo`` over TLS on 127.0.0.1; yields the port."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_ssl_over_tcp_listeners(0, server_ssl_context, host="127.0.0.1")
        started = await nursery.start(trio.serve_listeners, _h2_echo, listeners)
        yield started[0].transport_listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_rawh2_call_round_trip(
    server_ssl_context: ssl.SSLContext, client_ssl_context_for: Callable[[str], ssl.SSLContext]
) -> None:
    big = bytes(range(256)) * 160  # 40 KiB: several DATA frames each way
    with trio.fail_after(BOUND):
        async with _echo_server(server_ssl_context) as port:
            ctx = client_ssl_context_for("alice")
            async with await open_raw_h2("127.0.0.1", port, ctx) as raw:
                await raw.send_preface()
                first = await raw.call("/x.Y/Z", [b"hello", b""])
                second = await raw.call("/x.Y/Z", [big])
    assert (first.stream_id, second.stream_id) == (1, 3)
    assert first.messages == [b"hello", b""]
    assert second.messages == [big]
    assert first.grpc_status == second.grpc_status == 0
    assert ("content-type", "application/grpc") in first.headers


async def test_rawh2_sees_the_server_close(
    server_ssl_context: ssl.SSLContext, client_ssl_context_for: Callable[[str], ssl.SSLContext]
) -> None:
    with trio.fail_after(BOUND):
        async with _echo_server(server_ssl_context) as port:
            ctx = client_ssl_context_for("alice")
            async with await open_raw_h2("127.0.0.1", port, ctx) as raw:
                await raw.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                frames = await raw.read_to_close(max_frames=10)
                # h2 rejects the preface without a GOAWAY; only its own SETTINGS came first.
                assert [type(r.frame) for r in frames] == [SettingsFrame]
                assert await raw.next_frame() is None  # stays closed
                await raw.aclose()  # idempotent with the context exit


async def test_rawh2_sends_what_it_is_told(
    server_ssl_context: ssl.SSLContext, client_ssl_context_for: Callable[[str], ssl.SSLContext]
) -> None:
    """Frames are serialized verbatim and answers parsed: SETTINGS/PING ACKs come back."""
    with trio.fail_after(BOUND):
        async with _echo_server(server_ssl_context) as port:
            ctx = client_ssl_context_for("alice")
            async with await open_raw_h2("127.0.0.1", port, ctx) as raw:
                await raw.send(PREFACE, SettingsFrame(0), PingFrame(0, b"12345678"))
                got, seen = await raw.read_until(
                    lambda r: isinstance(r.frame, PingFrame) and "ACK" in r.frame.flags,
                    max_frames=10,
                )
                assert got is not None
                assert isinstance(got.frame, PingFrame)
                assert got.frame.opaque_data == b"12345678"
                acks = [r for r in seen if isinstance(r.frame, SettingsFrame)]
                assert any("ACK" in r.frame.flags for r in acks)
                # DATA on a stream that was never opened: h2 answers GOAWAY PROTOCOL_ERROR.
                await raw.send(DataFrame(7, grpc_message(b"x")))
                goaway = goaway_of(await raw.read_to_close(max_frames=10))
                assert isinstance(goaway, GoAwayFrame)
                assert goaway.error_code == PROTOCOL_ERROR


def test_split_grpc_messages() -> None:
    joined = grpc_message(b"a") + grpc_message(b"") + grpc_message(b"bc")
    assert split_grpc_messages(joined) == [b"a", b"", b"bc"]
    assert grpc_message(b"", length=1 << 31)[1:5] == b"\x80\x00\x00\x00"
