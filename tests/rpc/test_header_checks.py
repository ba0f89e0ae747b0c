"""Inbound header validation (h2's rules, memoised by the protocol) still closes the connection.

h2's own inbound checks are off (``_hpack.HeaderChecker`` runs them once per distinct
header list); a malformed block must still end the connection with GOAWAY(PROTOCOL_ERROR)
on both sides, including the second time the same block arrives, and a valid block that
was memoised must still be accepted.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hpack import Encoder
from hyperframe.frame import GoAwayFrame, HeadersFrame

from trio_jobs.rpc import _events as ev
from trio_jobs.rpc._client_protocol import ClientProtocol
from trio_jobs.rpc._messages import encode_message

from .test_protocol_core import REQ, Peer

pytestmark = pytest.mark.sans_io  # protocol objects only: the transport does not apply

MiB = 1024 * 1024

BAD_REQUESTS = [
    pytest.param([*REQ, (b"X-Upper", b"v")], id="uppercase-name"),
    pytest.param([*REQ, (b"connection", b"keep-alive")], id="connection-header"),
    pytest.param([*REQ, (b"x-k", b"a\r\nb")], id="crlf-in-value"),
    pytest.param([*REQ[:4], (b"te", b"gzip"), *REQ[5:]], id="te-not-trailers"),
    pytest.param([REQ[0], (b"x-k", b"v"), *REQ[1:]], id="pseudo-after-regular"),
    pytest.param([*REQ, (b":method", b"POST")], id="duplicate-pseudo"),
    pytest.param([*REQ, (b":bogus", b"1")], id="unknown-pseudo"),
    pytest.param([(k, b"" if k == b":path" else v) for k, v in REQ], id="empty-path"),
]


def _goaway_code(peer: Peer) -> int | None:
    for e in peer.client_events:
        if isinstance(e, h2.events.ConnectionTerminated):
            return int(e.error_code or 0)
    return None


def _headers_frame(sid: int, headers: list[tuple[bytes, bytes]], encoder: Encoder) -> bytes:
    frame = HeadersFrame(sid)
    frame.data = encoder.encode(headers)
    frame.flags.add("END_HEADERS")
    return frame.serialize()


@pytest.mark.parametrize("headers", BAD_REQUESTS)
def test_malformed_request_headers_close_the_connection(headers: list[tuple[bytes, bytes]]) -> None:
    for _ in range(2):  # a second connection: nothing about a bad list is remembered as good
        p = Peer()
        p.pump()
        encoder = Encoder()
        # the valid request first, so that the same connection's memo is warm
        got = p.feed_server(_headers_frame(1, REQ, encoder))
        assert any(isinstance(e, ev.RequestReceived) for e in got)
        got = p.feed_server(_headers_frame(3, headers, encoder))
        failed = [e for e in got if isinstance(e, ev.ConnectionFailed)]
        assert failed, got
        assert failed[0].error_code == ErrorCodes.PROTOCOL_ERROR
        assert not any(isinstance(e, ev.RequestReceived) and e.stream_id == 3 for e in got)
        assert p.server.closed
        p.client_events += p.h2.receive_data(p.server.data_to_send())
        assert _goaway_code(p) == ErrorCodes.PROTOCOL_ERROR


def test_repeated_valid_requests_are_accepted_each_time() -> None:
    p = Peer()
    for sid in (1, 3, 5):
        p.h2.send_headers(sid, [*REQ, (b"x-k", b"v")])
        p.h2.send_data(sid, encode_message(b"abc"), end_stream=True)
        got = p.pump()
        req = [e for e in got if isinstance(e, ev.RequestReceived)]
        assert len(req) == 1
        assert req[0].metadata == (("x-k", "v"),)


def test_client_closes_on_malformed_response_headers() -> None:
    client = ClientProtocol(
        max_receive_message=4 * MiB,
        max_concurrent_streams=100,
        max_header_list_size=16384,
        stream_window=MiB,
        connection_window=4 * MiB,
        max_frame_size=16384,
        clock=lambda: 0.0,
    )
    client.initiate()
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    sid = client.start_request("/pkg.Svc/M", authority="localhost")
    server.receive_data(client.data_to_send())
    encoder = Encoder()
    bad = [(b":status", b"200"), (b"Content-Type", b"application/grpc")]
    got = client.receive_data(_headers_frame(sid, bad, encoder))
    failed = [e for e in got if isinstance(e, ev.ConnectionFailed)]
    assert failed, got
    assert failed[0].error_code == ErrorCodes.PROTOCOL_ERROR
    frame, _ = GoAwayFrame.explain(memoryview(client.data_to_send()))
    assert isinstance(frame, GoAwayFrame)
    assert frame.error_code == ErrorCodes.PROTOCOL_ERROR
