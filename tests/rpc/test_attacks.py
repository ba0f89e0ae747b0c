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

import contextlib
import tracemalloc
from collections import defaultdict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest
import trio
import trio.testing
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from trio_jobs import rpc

from .rawh2 import (
    CANCEL,
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    MAX_WINDOW,
    MIN_MAX_FRAME,
    PREFACE,
    PROTOCOL_ERROR,
    SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    STREAM_CLOSED,
    RawH2,
    goaway_of,
    grpc_message,
    open_raw_h2,
    split_grpc_messages,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence

    from google.protobuf.descriptor import ServiceDescriptor
    from hyperframe.frame import Frame

    from .rawh2 import Received

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


# --- the server under attack -------------------------------------------------------------


def _attack_proto() -> tuple[Any, ServiceDescriptor]:
    """``attack.v1.Attack``: Unary(Blob) -> Blob and Stream(Blob) -> stream Blob, built here."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="tests/rpc/attack.proto", package="attack.v1", syntax="proto3"
    )
    blob = fdp.message_type.add(name="Blob")
    for number, (name, kind) in enumerate((("data", "TYPE_BYTES"), ("count", "TYPE_UINT32")), 1):
        blob.field.add(
            name=name,
            number=number,
            type=getattr(descriptor_pb2.FieldDescriptorProto, kind),
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    service = fdp.service.add(name="Attack")
    service.method.add(name="Unary", input_type=".attack.v1.Blob", output_type=".attack.v1.Blob")
    service.method.add(
        name="Stream",
        input_type=".attack.v1.Blob",
        output_type=".attack.v1.Blob",
        server_streaming=True,
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    blob_type = message_factory.GetMessageClass(pool.FindMessageTypeByName("attack.v1.Blob"))
    return blob_type, pool.FindServiceByName("attack.v1.Attack")


Blob, ATTACK_SERVICE = _attack_proto()
MiB: Final = 1024 * 1024
UNARY: Final = "/attack.v1.Attack/Unary"
STREAM: Final = "/attack.v1.Attack/Stream"
HANG: Final = b"hang"  # a Unary request with this data blocks until cancelled
CHUNK: Final = 65536  # bytes per streamed message


class AttackService:
    """Echo/hang unary and a bulk stream, counting what the handlers did."""

    def __init__(self) -> None:
        self.active = 0
        self.max_active = 0
        self.started = 0
        self.sent = 0  # streamed messages whose send() returned
        self.send_entered = trio.Event()
        self.idle = trio.Event()
        self.idle.set()

    async def Unary(self, request: Any, ctx: rpc.ServerContext) -> Any:
        if request.data != HANG:
            return Blob(data=request.data)
        self.started += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self.idle = trio.Event()
        try:
            await trio.sleep_forever()
        finally:
            self.active -= 1
            if self.active == 0:
                self.idle.set()
        raise AssertionError("unreachable")  # pragma: no cover

    async def Stream(
        self, request: Any, ctx: rpc.ServerContext, send: Callable[[Any], Awaitable[None]]
    ) -> None:
        message = Blob(data=b"s" * CHUNK)
        for _ in range(request.count):
            self.send_entered.set()
            await send(message)
            self.sent += 1


@dataclass(frozen=True, kw_only=True)
class Served:
    port: int
    service: AttackService
    server: rpc.Server
    client_ctx: ssl.SSLContext

    async def raw(self) -> RawH2:
        return await open_raw_h2("127.0.0.1", self.port, self.client_ctx)

    async def assert_responsive(self) -> None:
        """A well-behaved client (ours) gets an answer on a fresh connection."""
        with trio.fail_after(BOUND):
            async with rpc.connect(
                "127.0.0.1", self.port, ssl_context=self.client_ctx, server_hostname="localhost"
            ) as channel:
                reply = await channel.unary(UNARY, Blob(data=b"still here"), Blob, timeout=BOUND)
        assert reply.data == b"still here"


def _make_server(server_ssl_context: ssl.SSLContext | None) -> tuple[rpc.Server, AttackService]:
    service = AttackService()
    methods = rpc.service_from_descriptor(ATTACK_SERVICE, service) + rpc.health_service()
    return rpc.Server(methods, ssl_context=server_ssl_context), service


@pytest.fixture
async def served(
    nursery: trio.Nursery,
    server_ssl_context: ssl.SSLContext,
    client_ssl_context_for: Callable[[str], ssl.SSLContext],
) -> Served:
    server, service = _make_server(server_ssl_context)
    bound = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
    return Served(
        port=bound[0][1], service=service, server=server, client_ctx=client_ssl_context_for("bob")
    )


async def _flood(raw: RawH2, batches: Iterable[Sequence[Frame | bytes]]) -> int:
    """Send batches until done or the server closes; returns the batches sent."""
    sent = 0
    try:
        for batch in batches:
            await raw.send(*batch)
            sent += 1
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    return sent


async def _flood_and_read(
    raw: RawH2, batches: Iterable[Sequence[Frame | bytes]], *, max_frames: int = 200_000
) -> tuple[int, list[Received]]:
    """Flood in one task while another reads everything until the server closes."""
    frames: list[Received] = []
    sent = 0

    async def flood() -> None:
        nonlocal sent
        sent = await _flood(raw, batches)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        frames = await raw.read_to_close(max_frames=max_frames)
    return sent, frames


def _assert_goaway(frames: list[Received], *codes: int) -> GoAwayFrame:
    goaway = goaway_of(frames)
    assert goaway is not None, f"no GOAWAY in {[type(r.frame).__name__ for r in frames][-10:]}"
    assert goaway.error_code in codes, (goaway.error_code, goaway.additional_data)
    return goaway


# --- the attacks --------------------------------------------------------------------------


async def test_rapid_reset(served: Served) -> None:
    """CVE-2023-44487: open and reset thousands of streams at once, in batches."""
    streams, per_batch = 5000, 250

    def batches(raw: RawH2) -> Iterable[list[Frame | bytes]]:
        yield [PREFACE, SettingsFrame(0)]
        for _ in range(streams // per_batch):
            batch: list[Frame | bytes] = []
            for _ in range(per_batch):
                sid = raw.new_stream_id()
                batch += [
                    raw.headers_frame(sid, UNARY),
                    DataFrame(
                        sid, grpc_message(Blob(data=HANG).SerializeToString()), flags=["END_STREAM"]
                    ),
                    RstStreamFrame(sid, CANCEL),
                ]
            yield batch

    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            _, frames = await _flood_and_read(raw, batches(raw))
        goaway = _assert_goaway(frames, ENHANCE_YOUR_CALM)
        await served.service.idle.wait()  # every handler that started was cancelled
    assert goaway.last_stream_id < 2 * streams
    limit = rpc.ServerLimits().max_concurrent_streams
    assert served.service.max_active <= limit, "resets let handlers run past the stream limit"
    assert served.service.started < streams
    await served.assert_responsive()


def _continuation_batches(
    raw: RawH2, frame_size: int, frames: int
) -> Iterable[list[Frame | bytes]]:
    # A plausible header block (literal headers), never ended: END_HEADERS is never sent.
    pad = raw.encoder.encode([("x-pad", "p" * 900)] * (frame_size // 1000 + 1))[:frame_size]
    yield [raw.headers_frame(1, UNARY, end_headers=False)]
    per_batch = max(1, (1 << 20) // frame_size)
    for _ in range(frames // per_batch):
        yield [ContinuationFrame(1, pad) for _ in range(per_batch)]


async def test_continuation_flood(served: Served) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames without end (16 KiB each)."""
    total_frames = 4096  # 64 MiB if the server never stopped us
    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            await raw.send_preface()
            _, frames = await _flood_and_read(
                raw, _continuation_batches(raw, MIN_MAX_FRAME, total_frames)
            )
            assert raw.bytes_sent < total_frames * MIN_MAX_FRAME // 2, "the server kept reading"
    _assert_goaway(frames, PROTOCOL_ERROR, ENHANCE_YOUR_CALM, COMPRESSION_ERROR)
    await served.assert_responsive()


async def test_continuation_flood_with_large_frames_is_not_buffered(served: Served) -> None:
    """The same with frames as large as the server allows: the header block stays bounded.

    A server that relies only on h2's cap of 64 CONTINUATION frames would buffer 64 frames
    of its max_frame_size (64 MiB at 1 MiB) before refusing: a header list limit of 8 KiB
    must stop the block long before that.
    """
    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            await raw.send_preface()
            got, _ = await raw.read_until(lambda r: isinstance(r.frame, SettingsFrame))
            assert got is not None
            assert isinstance(got.frame, SettingsFrame)
            frame_size = got.frame.settings.get(SETTINGS_MAX_FRAME_SIZE, MIN_MAX_FRAME)
            tracemalloc.start()
            try:
                _, frames = await _flood_and_read(raw, _continuation_batches(raw, frame_size, 64))
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    _assert_goaway(frames, PROTOCOL_ERROR, ENHANCE_YOUR_CALM, COMPRESSION_ERROR)
    assert peak < 24 * MiB, f"{peak / MiB:.0f} MiB traced while the header block grew"
    await served.assert_responsive()


async def test_ping_flood(served: Served) -> None:
    """Tens of thousands of PINGs: GOAWAY too_many_pings, and answers stop well before the end.

    h2 answers every PING of one read by itself, so up to a read's worth of answers (256 KiB
    of input = 15,000 PINGs) may come before the server acts on its policy: the flood is
    larger than that, and the answers must stop short of it.
    """
    pings, per_batch = 40_000, 1000
    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            batches: list[list[Frame | bytes]] = [[PREFACE, SettingsFrame(0)]]
            batches += [
                [PingFrame(0, i.to_bytes(8, "big")) for i in range(j, j + per_batch)]
                for j in range(0, pings, per_batch)
            ]
            _, frames = await _flood_and_read(raw, batches, max_frames=pings + 100)
    goaway = _assert_goaway(frames, ENHANCE_YOUR_CALM)
    assert b"too_many_pings" in goaway.additional_data
    acks = [r for r in frames if isinstance(r.frame, PingFrame) and "ACK" in r.frame.flags]
    assert len(acks) < pings // 2, f"{len(acks)} PING answers"
    await served.assert_responsive()


async def _lockstep_flood(frames_to_send: list[bytes]) -> int:
    """Serve one connection over a zero-buffer stream; the client floods and never reads.

    The client first completes the HTTP/2 handshake (reads the server's SETTINGS and the ACK
    of its own), then stops reading. Returns how many of ``frames_to_send`` the server
    consumed before every task was blocked: a server with backpressure stops reading once it
    cannot write its answers. Closing the client must then end the server connection.
    """
    server, _ = _make_server(None)
    client_stream, server_side = trio.testing.lockstep_stream_pair()
    raw = RawH2(client_stream)
    consumed = 0
    ended = trio.Event()

    async def serve() -> None:
        await server.serve_connection(server_side)
        ended.set()

    async def flood() -> None:
        nonlocal consumed
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            for data in frames_to_send:
                await raw.send(data)
                consumed += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        # Both ends write first, and a lockstep stream has no buffer: send while reading.
        nursery.start_soon(raw.send_preface)
        got, _ = await raw.read_until(
            lambda r: isinstance(r.frame, SettingsFrame) and "ACK" in r.frame.flags, max_frames=10
        )
        assert got is not None, "no SETTINGS ACK from the server"
        nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        stopped_at = consumed
        await raw.aclose()
        await ended.wait()  # the caller's fail_after bounds it
    return stopped_at


@pytest.mark.parametrize(
    "frame",
    [SettingsFrame(0, settings={SETTINGS_INITIAL_WINDOW_SIZE: 65535}), PingFrame(0, b"pingpong")],
    ids=["settings", "ping"],
)
async def test_answers_do_not_queue_when_the_attacker_never_reads(frame: Frame) -> None:
    """SETTINGS/PING flood over a stream with no buffer: the server stops reading instead."""
    count, per_send = 20_000, 10
    data = [frame.serialize() * per_send] * (count // per_send)
    with trio.fail_after(BOUND):
        consumed = await _lockstep_flood(data)
    # Each frame needs an answer; with nobody reading them, a bounded server blocks after a
    # bounded number (one write), an unbounded one would queue answers to all 20,000.
    assert consumed * per_send < count // 4, f"{consumed * per_send} frames answered into a queue"


async def test_zero_window_slow_reader(served: Served) -> None:
    """INITIAL_WINDOW_SIZE 0 and never a WINDOW_UPDATE: send() blocks, nothing piles up."""
    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            await raw.send_preface({SETTINGS_INITIAL_WINDOW_SIZE: 0})
            sid = raw.new_stream_id()
            request = grpc_message(Blob(count=1000).SerializeToString())
            await raw.send(
                raw.headers_frame(sid, STREAM), DataFrame(sid, request, flags=["END_STREAM"])
            )
            await served.service.send_entered.wait()
            for _ in range(5):  # other clients are served meanwhile (and time passes)
                await served.assert_responsive()
            assert served.service.sent <= 2, f"{served.service.sent} x 64 KiB taken by send()"
        # The attacker is gone: its handler must not stay blocked forever.
        with trio.fail_after(BOUND):
            await served.server.shutdown(drain_timeout=1.0)


async def test_slow_reader_that_never_reads_the_socket(served: Served) -> None:
    """A normal window, but the client never reads: at most about one window is taken."""
    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            await raw.send_preface()
            sid = raw.new_stream_id()
            request = grpc_message(Blob(count=1000).SerializeToString())
            await raw.send(
                raw.headers_frame(sid, STREAM), DataFrame(sid, request, flags=["END_STREAM"])
            )
            await served.service.send_entered.wait()
            for _ in range(5):
                await served.assert_responsive()
            # The default client window is 65,535 bytes: one 64 KiB message and a bit.
            assert served.service.sent <= 3, f"{served.service.sent} x 64 KiB taken by send()"


async def test_two_gib_length_prefix(served: Served) -> None:
    """A message announcing 2 GiB: RESOURCE_EXHAUSTED at once, nothing buffered, conn usable."""
    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            await raw.send_preface()
            sid = raw.new_stream_id()
            tracemalloc.start()
            try:
                await raw.send(
                    raw.headers_frame(sid, UNARY),
                    DataFrame(sid, grpc_message(b"\0" * 16000, length=1 << 31)),
                )
                result = CallResultCollector(sid)
                await raw.read_until(result.feed)
                # More of the "message": ignored or refused, never an error for the connection.
                with contextlib.suppress(trio.BrokenResourceError):
                    await raw.send(DataFrame(sid, b"\0" * 16000))
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert result.status == rpc.StatusCode.RESOURCE_EXHAUSTED
            again = await raw.call(UNARY, [Blob(data=b"ok").SerializeToString()])
    assert again.grpc_status == 0
    assert peak < 16 * MiB
    await served.assert_responsive()


class CallResultCollector:
    """Feeds of ``read_until``: true once stream ``sid`` ended; keeps its grpc-status."""

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.status: int | None = None
        self.reset: int | None = None

    def feed(self, r: Received) -> bool:
        if r.frame.stream_id != self.sid:
            return False
        if r.headers is not None:
            for key, value in r.headers:
                if key == "grpc-status":
                    self.status = int(value)
        if isinstance(r.frame, RstStreamFrame):
            self.reset = r.frame.error_code
            return True
        return "END_STREAM" in r.frame.flags


async def test_connection_window_overflow(served: Served) -> None:
    """WINDOW_UPDATE on stream 0 past 2^31-1: GOAWAY FLOW_CONTROL_ERROR."""
    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            await raw.send_preface()
            await raw.send(WindowUpdateFrame(0, MAX_WINDOW))
            frames = await raw.read_to_close(max_frames=100)
    _assert_goaway(frames, FLOW_CONTROL_ERROR)
    await served.assert_responsive()


async def test_stream_window_overflow(served: Served) -> None:
    """WINDOW_UPDATE on an open stream past 2^31-1: RST_STREAM FLOW_CONTROL_ERROR."""
    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            await raw.send_preface()
            sid = raw.new_stream_id()
            hang = grpc_message(Blob(data=HANG).SerializeToString())
            await raw.send(
                raw.headers_frame(sid, UNARY), DataFrame(sid, hang, flags=["END_STREAM"])
            )
            await _wait_for(lambda: served.service.active == 1)
            await raw.send(WindowUpdateFrame(sid, MAX_WINDOW))
            result = CallResultCollector(sid)
            got, _ = await raw.read_until(result.feed)
            assert got is not None
            assert result.reset == FLOW_CONTROL_ERROR
            await served.service.idle.wait()  # the handler was cancelled
            again = await raw.call(UNARY, [Blob(data=b"ok").SerializeToString()])
    assert again.grpc_status == 0


async def test_data_after_end_stream(served: Served) -> None:
    """DATA on a stream the client already ended: RST_STREAM STREAM_CLOSED, handler cancelled."""
    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            await raw.send_preface()
            sid = raw.new_stream_id()
            hang = grpc_message(Blob(data=HANG).SerializeToString())
            await raw.send(
                raw.headers_frame(sid, UNARY), DataFrame(sid, hang, flags=["END_STREAM"])
            )
            await _wait_for(lambda: served.service.active == 1)
            await raw.send(DataFrame(sid, grpc_message(b"late")))
            result = CallResultCollector(sid)
            got, _ = await raw.read_until(
                lambda r: result.feed(r) or isinstance(r.frame, GoAwayFrame)
            )
            assert got is not None
            if isinstance(got.frame, GoAwayFrame):
                assert got.frame.error_code in (STREAM_CLOSED, PROTOCOL_ERROR)
            else:
                assert result.reset == STREAM_CLOSED
            await served.service.idle.wait()
    await served.assert_responsive()


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n",
        bytes(range(256)) * 4,
    ],
    ids=["http1", "near-preface", "binary"],
)
async def test_bad_preface(served: Served, garbage: bytes) -> None:
    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            await raw.send(garbage)
            frames = await raw.read_to_close(max_frames=100)
    goaway = goaway_of(frames)
    assert goaway is None or goaway.error_code == PROTOCOL_ERROR
    await served.assert_responsive()


async def test_tls_without_alpn_h2_is_closed(
    served: Served, client_ssl_context_for: Callable[[str], ssl.SSLContext]
) -> None:
    ctx = client_ssl_context_for("bob")
    ctx.set_alpn_protocols(["http/1.1"])
    with trio.fail_after(BOUND):
        raw = await open_raw_h2("127.0.0.1", served.port, ctx, require_h2=False)
        async with raw:
            await raw.send_preface()
            assert await raw.read_to_close(max_frames=10) == []
    await served.assert_responsive()


async def _wait_for(condition: Callable[[], bool]) -> None:
    """Let other tasks run until ``condition`` holds (the caller's fail_after bounds it)."""
    while not condition():
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("table_size", [0, 100, 4097, 65536])
async def test_header_table_size_the_client_allows(served: Served, table_size: int) -> None:
    """The server's HPACK encoder stays within the client's SETTINGS_HEADER_TABLE_SIZE (RFC
    7541 4.2), for headers and trailers, whatever size the client picks. A strict client's
    decoder refuses more. (The long fuzz run sent 4097, where a raw client of ours still
    enforced hpack's default 4096.)"""
    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            raw.decoder.max_allowed_table_size = table_size
            await raw.send_preface({SettingsFrame.HEADER_TABLE_SIZE: table_size})
            for n in range(3):
                result = await raw.call(UNARY, [Blob(data=b"x" * n).SerializeToString()])
                assert result.grpc_status == 0
                assert result.messages == [Blob(data=b"x" * n).SerializeToString()]
                assert ("content-type", "application/grpc") in result.headers
