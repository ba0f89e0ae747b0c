"""A hostile peer's GOAWAY frames, in both sessions (the pure one reads GOAWAY itself).

A short, misplaced or mid-header-block GOAWAY must close the connection with h2's verdict
(a GOAWAY of ours naming the error), never raise or be taken as a graceful GOAWAY; a valid
one must leave the streams at or below its last stream id running.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import hpack
import pytest
from h2.errors import ErrorCodes

from trio_jobs.rpc import StatusCode
from trio_jobs.rpc import _events as ev
from trio_jobs.rpc._messages import encode_message

from .rawh2 import PREFACE
from .test_protocol_core import REQ, make_server

if TYPE_CHECKING:
    from trio_jobs.rpc._server_protocol import ServerProtocol

pytestmark = pytest.mark.sans_io  # protocol objects only: runs with the fast paths on and off

HEADERS, CONTINUATION, GOAWAY, SETTINGS = 0x1, 0x9, 0x7, 0x4
END_STREAM, END_HEADERS = 0x1, 0x4


def frame(kind: int, flags: int, sid: int, payload: bytes) -> bytes:
    n = len(payload)
    return struct.pack(">HBBBI", n >> 8, n & 0xFF, kind, flags, sid) + payload


def goaway(last: int, code: int = 0, debug: bytes = b"", sid: int = 0) -> bytes:
    return frame(GOAWAY, 0, sid, struct.pack(">II", last, code) + debug)


def opened() -> tuple[ServerProtocol, bytes]:
    """A server that took the preface and SETTINGS, and a request block for stream 1."""
    server = make_server()
    server.receive_data(PREFACE + frame(SETTINGS, 0, 0, b""))
    server.data_to_send()
    return server, hpack.Encoder().encode(REQ)


@pytest.mark.parametrize(
    ("attack", "code"),
    [
        (frame(GOAWAY, 0, 0, b"\x00" * 4), ErrorCodes.FRAME_SIZE_ERROR),  # a body under 8 bytes
        (goaway(0, sid=1), ErrorCodes.PROTOCOL_ERROR),  # on a stream
    ],
    ids=["short-body", "on-a-stream"],
)
def test_malformed_goaway_closes_with_the_error(attack: bytes, code: int) -> None:
    server, _ = opened()
    got = server.receive_data(attack)
    assert [e.error_code for e in got if isinstance(e, ev.ConnectionFailed)] == [code], got
    assert not any(isinstance(e, ev.GoAwayReceived) for e in got)
    assert server.closed
    out = server.data_to_send()
    assert b"\x07\x00\x00\x00\x00" in out  # our GOAWAY says why
    assert server.receive_data(goaway(0)) == []


def test_goaway_inside_a_header_block_is_a_protocol_error() -> None:
    server, block = opened()
    half = frame(HEADERS, END_STREAM, 1, block[:3])  # no END_HEADERS: CONTINUATION must follow
    got = server.receive_data(half + goaway(1) + frame(CONTINUATION, END_HEADERS, 1, block[3:]))
    assert [e.error_code for e in got if isinstance(e, ev.ConnectionFailed)] == [ErrorCodes.PROTOCOL_ERROR]
    assert not any(isinstance(e, ev.GoAwayReceived | ev.RequestReceived) for e in got)


def test_a_valid_goaway_keeps_the_streams_below_its_last_id() -> None:
    server, block = opened()
    got = server.receive_data(frame(HEADERS, END_HEADERS, 1, block))
    assert any(isinstance(e, ev.RequestReceived) for e in got)
    got = server.receive_data(goaway(1, 0, b"bye") + frame(0x0, END_STREAM, 1, encode_message(b"\n\x01p")))
    assert [(e.last_stream_id, e.debug) for e in got if isinstance(e, ev.GoAwayReceived)] == [(1, b"bye")]
    assert any(isinstance(e, ev.MessageReceived) and e.stream_id == 1 for e in got)  # stream 1 goes on
    assert any(isinstance(e, ev.StreamEnded) and e.stream_id == 1 for e in got)
    assert not server.closed
    server.send_response_headers(1)
    server.send_trailers(1, StatusCode.OK)
    assert server.data_to_send()  # (it can still answer)
