"""The sans-IO core, driven by a real h2 peer (no I/O, no trio).

The peer is ``h2.connection.H2Connection``; for what h2 refuses to send, raw frames
come from hyperframe. Every test checks that no exception escapes ``receive_data``.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_jobs.rpc import StatusCode
from trio_jobs.rpc import _events as ev
from trio_jobs.rpc._client_protocol import ClientProtocol
from trio_jobs.rpc._h2.fast import _GoAwayTolerantStateMachine
from trio_jobs.rpc._h2.session import CLOSED_STREAMS_KEPT
from trio_jobs.rpc._messages import encode_message
from trio_jobs.rpc._protocol import StreamGone
from trio_jobs.rpc._server_protocol import ServerProtocol

from .rawh2 import GRPC_REQUEST, PREFACE

pytestmark = pytest.mark.sans_io  # protocol objects only: the transport does not apply

MiB = 1024 * 1024
REQ = list(GRPC_REQUEST)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_server(clock: Clock | None = None, **over: Any) -> ServerProtocol:
    kw: dict[str, Any] = {
        "max_receive_message": 4 * MiB,
        "max_concurrent_streams": 100,
        "max_header_list_size": 8192,
        "stream_window": 1 * MiB,
        "connection_window": 4 * MiB,
        "max_frame_size": 16384,
        "ping_min_interval": 10.0,
        "max_ping_strikes": 2,
        "reset_rate": 10.0,
        "reset_burst": 20,
        "clock": clock or Clock(),
    }
    kw.update(over)
    server = ServerProtocol(**kw)
    server.initiate()
    return server


class Peer:
    """An h2 client connected to a ServerProtocol in memory."""

    def __init__(self, server: ServerProtocol | None = None) -> None:
        self.server = server or make_server()
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        # h2 refuses everything after a GOAWAY; the peer must survive ours (see _protocol.py)
        self.h2.state_machine = _GoAwayTolerantStateMachine()
        self.h2.initiate_connection()
        self.events: list[ev.Event] = []
        self.client_events: list[h2.events.Event] = []
        self.pump()

    def feed_server(self, data: bytes) -> list[ev.Event]:
        out = self.server.receive_data(data)
        self.events += out
        return out

    def pump(self) -> list[ev.Event]:
        got: list[ev.Event] = []
        for _ in range(10):
            data = self.h2.data_to_send()
            if data:
                got += self.feed_server(data)
            back = self.server.data_to_send()
            if back:
                self.client_events += self.h2.receive_data(back)
            if not data and not back:
                break
        return got

    def raw(self, frame: Frame) -> list[ev.Event]:
        self.pump()
        return self.feed_server(frame.serialize())

    def responses(self, sid: int) -> list[Any]:
        return [e for e in self.client_events if getattr(e, "stream_id", None) == sid]


def headers_of(events: list[Any]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for e in events:
        if isinstance(e, h2.events.ResponseReceived | h2.events.TrailersReceived):
            out.update(dict(e.headers))
    return out


def test_request_message_and_end() -> None:
    p = Peer()
    p.h2.send_headers(1, [*REQ, (b"grpc-timeout", b"250m"), (b"x-k", b"v")])
    p.h2.send_data(1, encode_message(b"abc"), end_stream=True)
    got = p.pump()
    req = [e for e in got if isinstance(e, ev.RequestReceived)]
    assert req == [
        ev.RequestReceived(
            stream_id=1,
            method="/pkg.Svc/M",
            metadata=(("x-k", "v"),),
            timeout=0.25,
            authority="localhost",
        )
    ]
    msgs = [e for e in got if isinstance(e, ev.MessageReceived)]
    assert [m.data for m in msgs] == [b"abc"]
    assert msgs[0].ack == 8
    assert isinstance(got[-1], ev.StreamEnded)
    p.server.acknowledge(1, msgs[0].ack)
    p.server.send_response_headers(1, (("x-r", "1"),))
    assert p.server.send_data(1, encode_message(b"out")) == 8
    p.server.send_trailers(1, StatusCode.OK)
    p.pump()
    hdrs = headers_of(p.responses(1))
    assert hdrs[b":status"] == b"200"
    assert hdrs[b"content-type"] == b"application/grpc"
    assert hdrs[b"grpc-status"] == b"0"
    assert hdrs[b"x-r"] == b"1"


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.binary(max_size=2000), min_size=1, max_size=8),
    st.lists(st.integers(1, 3000), max_size=20),
)
def test_messages_split_across_any_data_frames(messages: list[bytes], sizes: list[int]) -> None:
    p = Peer()
    p.h2.send_headers(1, REQ)
    wire = b"".join(encode_message(m) for m in messages)
    off = 0
    for size in [*sizes, len(wire)]:
        chunk = wire[off : off + size]
        off += len(chunk)
        if chunk:
            p.h2.send_data(1, chunk)
    p.h2.end_stream(1)
    got = p.pump()
    assert [e.data for e in got if isinstance(e, ev.MessageReceived)] == messages
    # the acks add up to everything the client sent minus what was credited at once
    assert not any(isinstance(e, ev.ConnectionFailed | ev.StreamFailed) for e in got)


@pytest.mark.parametrize(
    ("change", "http", "code"),
    [
        ({b":method": b"GET"}, b"405", StatusCode.INTERNAL),
        ({b"content-type": b"text/plain"}, b"415", StatusCode.INTERNAL),
        ({b"content-type": b"application/grpcx"}, b"415", StatusCode.INTERNAL),
        ({b"te": None}, b"400", StatusCode.INTERNAL),
        ({b"grpc-encoding": b"gzip"}, b"200", StatusCode.UNIMPLEMENTED),
        ({b"grpc-timeout": b"123456789S"}, b"200", StatusCode.INTERNAL),
        ({b"grpc-timeout": b"1x"}, b"200", StatusCode.INTERNAL),
        ({b"k-bin": b"%%%"}, b"200", StatusCode.INTERNAL),
    ],
)
def test_invalid_requests_answered_by_the_core(
    change: dict[bytes, bytes | None], http: bytes, code: StatusCode
) -> None:
    p = Peer()
    headers: dict[bytes, bytes | None] = dict(REQ)
    headers.update(change)
    p.h2.send_headers(1, [(k, v) for k, v in headers.items() if v is not None])
    got = p.pump()
    assert not any(isinstance(e, ev.RequestReceived) for e in got)
    hdrs = headers_of(p.responses(1))
    assert hdrs[b":status"] == http
    assert hdrs[b"content-type"] == b"application/grpc"  # Trailers-Only carries it
    assert hdrs[b"grpc-status"] == str(int(code)).encode()
    # the client had not finished: it is told to stop with RST_STREAM(NO_ERROR)
    resets = [e for e in p.responses(1) if isinstance(e, h2.events.StreamReset)]
    assert [r.error_code for r in resets] == [ErrorCodes.NO_ERROR]


def test_oversized_message_fails_stream_and_credits_window_back() -> None:
    p = Peer()
    p.h2.send_headers(1, REQ)
    p.h2.send_data(1, b"\x00\x7f\xff\xff\xff" + b"x" * 10_000)  # announces 2 GiB
    got = p.pump()
    failed = [e for e in got if isinstance(e, ev.StreamFailed)]
    assert failed == [
        ev.StreamFailed(stream_id=1, code=StatusCode.RESOURCE_EXHAUSTED, message=failed[0].message)
    ]
    for _ in range(5):  # the rest is discarded but credited: the connection never stalls
        p.h2.send_data(1, b"y" * 16_000)
        p.pump()
    assert p.h2.outbound_flow_control_window > 65_535 - 20_000
    p.server.send_trailers(1, StatusCode.RESOURCE_EXHAUSTED, "too big")
    p.pump()
    assert headers_of(p.responses(1))[b"grpc-status"] == b"8"


def test_unconsumed_messages_hold_window_until_release() -> None:
    p = Peer()
    p.h2.send_headers(1, REQ)
    wire = encode_message(b"z" * 30_000)
    for off in range(0, len(wire), 16384):
        p.h2.send_data(1, wire[off : off + 16384])
    got = p.pump()
    assert [len(e.data) for e in got if isinstance(e, ev.MessageReceived)] == [30_000]
    # the frame that completed the message is held until the app consumes it
    held = 1 * MiB - p.h2.local_flow_control_window(1)
    assert held >= len(wire) - 16384
    p.server.release(1)  # the application is done: all credit comes back
    p.pump()
    assert p.h2.outbound_flow_control_window >= 65_535 - 16384


def test_bad_preface_and_garbage_close_with_goaway() -> None:
    server = make_server()
    got = server.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(got) == 1
    assert isinstance(got[0], ev.ConnectionFailed)
    assert got[0].error_code == ErrorCodes.PROTOCOL_ERROR
    assert server.closed
    assert b"\x07\x00\x00\x00\x00\x00" in server.data_to_send()  # GOAWAY queued
    assert server.receive_data(b"more") == []


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_preface_never_raise(garbage: bytes) -> None:
    server = make_server()
    events = server.receive_data(PREFACE + garbage)
    for e in events:
        assert isinstance(e, ev.Event)
    server.data_to_send()


def test_oversized_header_list_closes_connection() -> None:
    p = Peer()
    p.h2.send_headers(1, [*REQ, (b"x-big", b"a" * 9000)])
    got = p.pump()
    failed = [e for e in got if isinstance(e, ev.ConnectionFailed)]
    assert failed, got
    assert failed[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert not any(isinstance(e, ev.RequestReceived) for e in got)


def test_data_after_end_stream_is_stream_closed() -> None:
    p = Peer()
    p.h2.send_headers(1, REQ, end_stream=True)
    p.pump()
    got = p.raw(DataFrame(1, data=b"\x00\x00\x00\x00\x00"))
    assert not any(isinstance(e, ev.MessageReceived) for e in got)
    p.pump()
    # a stream error (RFC 9113 5.1, half-closed remote): RST_STREAM(STREAM_CLOSED)
    resets = [e for e in p.responses(1) if isinstance(e, h2.events.StreamReset)]
    assert [r.error_code for r in resets] == [ErrorCodes.STREAM_CLOSED]
    with pytest.raises(StreamGone):  # the call can no longer answer, and knows it
        p.server.send_trailers(1, StatusCode.OK)
    p.h2.send_headers(3, REQ, end_stream=True)  # the connection itself is fine
    assert any(isinstance(e, ev.RequestReceived) for e in p.pump())


def test_ping_policy_too_many_pings() -> None:
    clock = Clock()
    p = Peer(make_server(clock))
    for i in range(3):
        p.h2.ping(b"%08d" % i)
        assert not any(isinstance(e, ev.ConnectionFailed) for e in p.pump())
    p.h2.ping(b"abcdefgh")
    got = p.pump()
    assert any(isinstance(e, ev.ConnectionFailed) for e in got)
    goaways = [e for e in p.client_events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaways[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaways[-1].additional_data == b"too_many_pings"


def test_pings_spaced_out_or_after_data_are_fine() -> None:
    clock = Clock()
    p = Peer(make_server(clock))
    for i in range(10):
        clock.now += 11
        p.h2.ping(b"%08d" % i)
        assert not any(isinstance(e, ev.ConnectionFailed) for e in p.pump())
    p.h2.send_headers(1, REQ, end_stream=True)
    p.pump()
    p.server.send_response_headers(1)
    for i in range(10):  # each after we sent something: strikes reset
        p.server.send_data(1, encode_message(b"d"))
        p.h2.ping(b"%08d" % i)
        p.pump()
    assert not any(isinstance(e, ev.ConnectionFailed) for e in p.events)


def test_rapid_reset_is_answered_with_enhance_your_calm() -> None:
    p = Peer()
    failed: list[ev.ConnectionFailed] = []
    for i in range(100):
        sid = 1 + 2 * i
        p.h2.send_headers(sid, REQ)
        p.h2.reset_stream(sid, ErrorCodes.CANCEL)
        failed += [e for e in p.pump() if isinstance(e, ev.ConnectionFailed)]
        if failed:
            break
        p.server.release(sid)
    assert failed
    assert failed[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_two_phase_goaway_refuses_later_streams() -> None:
    p = Peer()
    p.h2.send_headers(1, REQ, end_stream=True)
    p.pump()
    p.server.goaway(2**31 - 1)
    p.server.ping(b"shutdown")
    p.pump()
    p.h2.send_headers(3, REQ, end_stream=True)  # still accepted: raced the first GOAWAY
    assert any(isinstance(e, ev.RequestReceived) for e in p.pump())
    p.server.goaway(p.server.highest_inbound_stream_id)
    p.pump()
    late = p.raw(
        HeadersFrame(5, data=p.h2.encoder.encode(REQ), flags=["END_HEADERS", "END_STREAM"])
    )
    assert not any(isinstance(e, ev.RequestReceived) for e in late), late
    assert b"\x00\x00\x00\x07" in p.server.data_to_send()  # RST_STREAM(REFUSED_STREAM)
    # in-flight streams can still be answered after both GOAWAYs
    p.server.send_trailers(1, StatusCode.OK)
    p.server.send_trailers(3, StatusCode.OK)
    out = p.server.data_to_send()
    assert out


# -- client side ------------------------------------------------------------------------


def client_pair() -> tuple[ClientProtocol, h2.connection.H2Connection]:
    client = ClientProtocol(
        max_receive_message=1024,
        max_concurrent_streams=100,
        max_header_list_size=16384,
        stream_window=65535,
        connection_window=65535,
        max_frame_size=16384,
        clock=Clock(),
    )
    client.initiate()
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


def roundtrip(client: ClientProtocol, server: h2.connection.H2Connection) -> list[ev.Event]:
    server.receive_data(client.data_to_send())
    return client.receive_data(server.data_to_send())


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ([(b":status", b"404")], StatusCode.UNIMPLEMENTED),
        ([(b":status", b"503")], StatusCode.UNAVAILABLE),
        ([(b":status", b"401")], StatusCode.UNAUTHENTICATED),
        ([(b":status", b"418")], StatusCode.UNKNOWN),
        ([(b":status", b"200"), (b"content-type", b"application/grpc")], StatusCode.UNKNOWN),
        (
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", b"7"),
                (b"grpc-message", b"n%C3%B6"),
            ],
            StatusCode.PERMISSION_DENIED,
        ),
        (
            [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"99")],
            StatusCode.UNKNOWN,
        ),
    ],
)
def test_client_maps_trailers_only_and_http_status(
    headers: list[tuple[bytes, bytes]], code: StatusCode
) -> None:
    client, server = client_pair()
    sid = client.start_request("/a.B/C", authority="x", timeout=123.0)
    server.receive_data(client.data_to_send())
    server.send_headers(sid, headers, end_stream=True)
    got = client.receive_data(server.data_to_send())
    done = [e for e in got if isinstance(e, ev.CallCompleted)]
    assert len(done) == 1
    assert done[0].code == code
    if code == StatusCode.PERMISSION_DENIED:
        assert done[0].message == "nö"


@pytest.mark.parametrize(
    ("rst", "code"),
    [
        (ErrorCodes.CANCEL, StatusCode.CANCELLED),
        (ErrorCodes.REFUSED_STREAM, StatusCode.UNAVAILABLE),
        (ErrorCodes.ENHANCE_YOUR_CALM, StatusCode.RESOURCE_EXHAUSTED),
        (ErrorCodes.INADEQUATE_SECURITY, StatusCode.PERMISSION_DENIED),
        (ErrorCodes.PROTOCOL_ERROR, StatusCode.INTERNAL),
    ],
)
def test_client_sees_rst_stream(rst: int, code: StatusCode) -> None:
    from trio_jobs.rpc._status import status_from_rst_stream

    client, server = client_pair()
    sid = client.start_request("/a.B/C", authority="x")
    server.receive_data(client.data_to_send())
    server.reset_stream(sid, rst)
    got = client.receive_data(server.data_to_send())
    resets = [e for e in got if isinstance(e, ev.StreamReset)]
    assert resets == [ev.StreamReset(stream_id=sid, error_code=rst)]
    assert status_from_rst_stream(rst) == code


def test_client_too_large_response_and_missing_trailers() -> None:
    client, server = client_pair()
    sid = client.start_request("/a.B/C", authority="x")
    server.receive_data(client.data_to_send())
    server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_data(sid, encode_message(b"q" * 2000))
    got = client.receive_data(server.data_to_send())
    assert [e.code for e in got if isinstance(e, ev.StreamFailed)] == [
        StatusCode.RESOURCE_EXHAUSTED
    ]
    sid2 = client.start_request("/a.B/C", authority="x")
    server.receive_data(client.data_to_send())
    server.send_headers(sid2, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_data(sid2, encode_message(b"ok"), end_stream=True)
    got = client.receive_data(server.data_to_send())
    assert [e.data for e in got if isinstance(e, ev.MessageReceived)] == [b"ok"]
    assert [e.code for e in got if isinstance(e, ev.CallCompleted)] == [StatusCode.INTERNAL]


def test_client_goaway_keeps_streams_below_last_id() -> None:
    client, server = client_pair()
    sid = client.start_request("/a.B/C", authority="x")
    server.receive_data(client.data_to_send())
    server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server_bytes = server.data_to_send()
    goaway = GoAwayFrame(0, last_stream_id=sid, error_code=0).serialize()
    data = DataFrame(sid, data=encode_message(b"after"), flags=["END_STREAM"]).serialize()
    got = client.receive_data(server_bytes + goaway + data)
    assert any(isinstance(e, ev.GoAwayReceived) for e in got)
    assert [e.data for e in got if isinstance(e, ev.MessageReceived)] == [b"after"]
    rst = RstStreamFrame(sid, error_code=0)
    assert rst.serialize()
    with pytest.raises(StreamGone):
        client.start_request("/a.B/C", authority="x")  # no new streams after GOAWAY


@pytest.mark.slow
def test_100k_sequential_calls_leave_no_window_or_stream_state() -> None:
    """Both cores, one connection, 100,000 unary calls: nothing accumulates. (With the pure
    session, 20,000: still 20 times the closed streams remembered, at a fifth of its 105 s
    under coverage; the fast session's run is the one past h2's own 65,536.)"""
    server = make_server(max_frame_size=1 * MiB)
    client = ClientProtocol(
        max_receive_message=4 * MiB,
        max_concurrent_streams=100,
        max_header_list_size=16384,
        stream_window=1 * MiB,
        connection_window=4 * MiB,
        max_frame_size=1 * MiB,
        clock=Clock(),
    )
    client.initiate()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    request = encode_message(b"\n\x01p")
    completed = 0
    calls = 100_000 if client.fast_paths else 20_000
    for _ in range(calls):
        sid = client.start_request("/test.echo.Echo/Unary", authority="localhost")
        client.send_data(sid, request, end_stream=True)
        for e in server.receive_data(client.data_to_send()):
            if isinstance(e, ev.MessageReceived):
                server.acknowledge(sid, e.ack)
        server.send_response_headers(sid)
        server.send_data(sid, request)
        server.send_trailers(sid, StatusCode.OK)
        server.release(sid)
        for e in client.receive_data(server.data_to_send()):
            if isinstance(e, ev.MessageReceived):
                client.acknowledge(sid, e.ack)
            elif isinstance(e, ev.CallCompleted):
                completed += e.code == StatusCode.OK
        client.release(sid)
        server.receive_data(client.data_to_send())  # WINDOW_UPDATEs, if any
    assert completed == calls
    for proto in (server, client):
        assert proto.open_streams == 0
        assert len(proto._h2.conn.streams) <= 2  # h2 drops closed streams lazily
        assert len(proto._h2.conn._closed_streams) <= CLOSED_STREAMS_KEPT  # a bounded memory of them
        assert proto._h2.conn._inbound_flow_control_window_manager.current_window_size > 2 * MiB
        assert proto._h2.conn.outbound_flow_control_window > 2 * MiB
        assert not proto.closed


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 60_000), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.integers(1, 20_000), min_size=1, max_size=50),
)
def test_transport_reads_split_anywhere_decode_identically(
    messages: list[bytes], reads: list[int]
) -> None:
    """The bytes of the connection (preface, HEADERS, DATA) cut into arbitrary reads."""
    server = make_server()
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    client.receive_data(server.data_to_send())  # our SETTINGS: 1 MiB stream window
    client.send_headers(1, REQ)
    wire = b"".join(encode_message(m) for m in messages)
    for off in range(0, len(wire), 16384):
        client.send_data(1, wire[off : off + 16384])
    client.end_stream(1)
    data = client.data_to_send()
    got: list[ev.Event] = []
    off, i = 0, 0
    while off < len(data):
        size = reads[i % len(reads)]
        got += server.receive_data(data[off : off + size])
        off += size
        i += 1
    assert [e.data for e in got if isinstance(e, ev.MessageReceived)] == messages
    assert isinstance(got[-1], ev.StreamEnded)
    assert not any(isinstance(e, ev.ConnectionFailed | ev.StreamFailed) for e in got)


def test_oversized_frame_header_refused_before_its_body() -> None:
    p = Peer()  # our SETTINGS_MAX_FRAME_SIZE is 16 KiB here
    got = p.feed_server(b"\xa0\x00\x00\x00\x00\x00\x00\x00\x01" + b"x" * 100)  # 10 MiB DATA
    failed = [e for e in got if isinstance(e, ev.ConnectionFailed)]
    assert len(failed) == 1
    assert failed[0].error_code == ErrorCodes.FRAME_SIZE_ERROR
