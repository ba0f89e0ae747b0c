"""The receive side's own paths do exactly what h2 does (``_h2/frames.py``, ``_h2/fast.py``).

* Our :class:`~trio_jobs.rpc._h2.frames.FrameBuffer` cuts any byte stream, however it is
  split and however it arrives (copied in, or written in place), into the same frames as
  h2's own ``FrameBuffer``, and refuses the same things.
* DATA and HEADERS frames that the protocol takes without h2's frame machinery
  (``data_fast_stream``, ``headers_fast_stream``) change h2's windows and stream states
  exactly as h2 would, and yield the same events: the same random frame sequences go
  through a server and a client protocol twice, with the fast paths and with every frame
  left to h2.
"""

from __future__ import annotations

import itertools
import struct
from typing import Any, Final

import h2.exceptions
import h2.frame_buffer
import hpack
import pytest
from hyperframe.exceptions import InvalidPaddingError
from hyperframe.frame import PingFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trio_jobs.rpc import _events as ev
from trio_jobs.rpc._client_protocol import ClientProtocol
from trio_jobs.rpc._h2 import fast_session
from trio_jobs.rpc._h2.fast import receive_data_fast
from trio_jobs.rpc._h2.frames import FrameBuffer
from trio_jobs.rpc._messages import encode_message
from trio_jobs.rpc._server_protocol import ServerProtocol

from .rawh2 import GRPC_REQUEST, PREFACE

pytestmark = pytest.mark.one_rpc_mode  # compares the rpc modes itself (or uses no protocol): one run

KiB = 1024
MAX_FRAME = 16 * KiB
REQUEST = list(GRPC_REQUEST)
RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
TRAILERS = [(b"grpc-status", b"0")]


DATA, HEADERS, CONTINUATION = 0x0, 0x1, 0x9
END_STREAM, END_HEADERS, PADDED = 0x1, 0x4, 0x8


def raw(kind: int, flags: int, sid: int, payload: bytes, pad: int | None = None) -> bytes:
    """A frame as bytes, valid or not (hyperframe refuses some, such as DATA on stream 0)."""
    if pad is not None:
        flags |= PADDED
        payload = bytes([pad]) + payload + bytes(pad)
    n = len(payload)
    return struct.pack(">HBBBI", n >> 8, n & 0xFF, kind, flags, sid) + payload


def _data(draw: Any, sid: int, payload: bytes) -> bytes:
    pad = draw(st.integers(0, 30)) if draw(st.integers(0, 5)) == 0 else None
    flags = END_STREAM if draw(st.integers(0, 3)) == 0 else 0
    return raw(DATA, flags, sid, payload, pad)


# -- the frame buffer against h2's ---------------------------------------------------


def _frames(draw: Any) -> list[bytes]:
    kinds = st.sampled_from(["data", "headers", "split_headers", "ping", "window", "rst"])
    out: list[bytes] = []
    for kind in draw(st.lists(kinds, max_size=12)):
        sid = draw(st.sampled_from([0, 1, 3, 2**31 - 1]))
        if kind == "data":
            out.append(_data(draw, sid, draw(st.binary(max_size=MAX_FRAME + 300))))
        elif kind == "headers":
            out.append(raw(HEADERS, END_HEADERS, sid, draw(st.binary(max_size=200))))
        elif kind == "split_headers":
            out.append(raw(HEADERS, 0, sid, draw(st.binary(max_size=100))))
            out.append(raw(CONTINUATION, 0, draw(st.sampled_from([sid, sid + 2])), b"x"))
            out.append(raw(CONTINUATION, END_HEADERS, sid, b"yz"))
        elif kind == "ping":
            out.append(PingFrame(0, opaque_data=draw(st.binary(min_size=8, max_size=8))).serialize())
        elif kind == "window":
            inc = draw(st.integers(1, 2**31 - 1))
            out.append(WindowUpdateFrame(sid, window_increment=inc).serialize())
        else:
            out.append(RstStreamFrame(sid or 1, error_code=draw(st.integers(0, 13))).serialize())
    return out


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def _drain(buffer: Any) -> list[tuple[Any, ...]] | str:
    got: list[tuple[Any, ...]] = []
    try:
        for f in buffer:
            got.append((type(f).__mro__[-3].__name__, f.stream_id, sorted(f.flags), f.serialize()))
    except (h2.exceptions.ProtocolError, InvalidPaddingError) as exc:
        return f"{type(exc).__name__}:{got!r}"
    return got


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_frame_buffer_cuts_what_h2_cuts(data: st.DataObject) -> None:
    server = data.draw(st.booleans())
    stream = (PREFACE if server else b"") + b"".join(_frames(data.draw))
    if data.draw(st.booleans()):  # a broken preface or garbage now and then
        at = data.draw(st.integers(0, max(0, len(stream) - 1)))
        stream = stream[:at] + data.draw(st.binary(min_size=1, max_size=4)) + stream[at + 1 :]
    pieces = _split(stream, data.draw(st.lists(st.integers(0, 2**20), max_size=8)))
    in_place = data.draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)))

    theirs = h2.frame_buffer.FrameBuffer(server=server)
    theirs.max_frame_size = MAX_FRAME
    ours = FrameBuffer(server=server, max_frame_size=MAX_FRAME)
    seen_theirs: list[Any] = []
    seen_ours: list[Any] = []
    for piece, place in zip(pieces, in_place, strict=True):
        for buffer, seen, write_in_place in ((theirs, seen_theirs, False), (ours, seen_ours, place)):
            if seen and isinstance(seen[-1], str):
                continue  # this buffer already failed
            try:
                if write_in_place:
                    with ours.reserve(len(piece) + 7) as view:
                        view[: len(piece)] = piece
                    ours.commit(len(piece))
                else:
                    buffer.add_data(piece)
            except h2.exceptions.ProtocolError as exc:
                seen.append(f"{type(exc).__name__}:preface")
                continue
            drained = _drain(buffer)
            if isinstance(drained, str):
                seen.append(drained)
            else:
                seen.extend(drained)
    # h2 only refuses an overlong frame once all of it is in; we do at its header. The
    # frames before agree either way, and so does the verdict.
    if seen_theirs and isinstance(seen_theirs[-1], str) and "FrameTooLarge" in seen_theirs[-1]:
        assert isinstance(seen_ours[-1], str)
        assert "FrameTooLarge" in seen_ours[-1]
        return
    if seen_ours and isinstance(seen_ours[-1], str) and "FrameTooLarge" in seen_ours[-1]:
        assert not (seen_theirs and isinstance(seen_theirs[-1], str)), seen_theirs[-1]
        return
    assert seen_ours == seen_theirs


def test_buffer_compacts_and_lets_go_of_a_burst() -> None:
    ours = FrameBuffer(server=False, max_frame_size=MAX_FRAME)
    frame = raw(DATA, 0, 1, b"a" * 1000)
    for _ in range(3):  # leave part of a frame behind each time: it is moved to the front
        ours.add_data(frame + frame[:500])
        assert [len(f.serialize()) - 9 for f in ours] == [1000]
        ours.add_data(frame[500:])
        assert [len(f.serialize()) - 9 for f in ours] == [1000]
    assert ours.pending == 0
    with ours.reserve(1024 * KiB) as view:  # a burst...
        view[:9] = raw(DATA, 0, 1, b"")
    ours.commit(9)
    assert len(ours.buf) >= 1024 * KiB
    assert [f.serialize() for f in ours] == [raw(DATA, 0, 1, b"")]
    assert len(ours.buf) >= 1024 * KiB  # kept while reads are that large
    ours.add_data(frame)  # a small read
    assert [len(f.serialize()) - 9 for f in ours] == [1000]
    assert len(ours.buf) == 0  # the burst's capacity is let go once it is consumed


# -- the DATA fast path against h2 -----------------------------------------------------


SETTINGS: Final[dict[str, Any]] = {
    "max_receive_message": 8 * KiB,
    "max_concurrent_streams": 10,
    "max_header_list_size": 8 * KiB,
    "stream_window": 24 * KiB,
    "connection_window": 48 * KiB,
    "max_frame_size": MAX_FRAME,
    "clock": lambda: 0.0,
    "frames_per_call": 5,
}
"""What both sides of the differential tests are built with (small windows and frames)."""


def _server(fast_paths: bool = True) -> ServerProtocol:
    p = ServerProtocol(
        **SETTINGS, ping_min_interval=10.0, max_ping_strikes=2, reset_rate=10.0, reset_burst=20,
        fast_paths=fast_paths,
    )
    p.initiate()
    return p


def _client(fast_paths: bool = True) -> ClientProtocol:
    p = ClientProtocol(**SETTINGS, fast_paths=fast_paths)
    p.initiate()
    for _ in range(3):  # streams 1, 3, 5
        p.start_request("/pkg.Svc/M", authority="localhost")
    p.data_to_send()
    return p


def _payload(draw: Any) -> bytes:
    """gRPC messages (whole, split or oversized) or anything else."""
    kind = draw(st.sampled_from(["messages", "raw", "too_large"]))
    if kind == "messages":
        msgs = draw(st.lists(st.binary(max_size=3000), max_size=4))
        return b"".join(encode_message(m) for m in msgs)
    if kind == "too_large":
        return encode_message(b"m" * (9 * KiB))[: draw(st.integers(5, MAX_FRAME))]
    garbage: bytes = draw(st.binary(max_size=MAX_FRAME + 100))
    return garbage


def _conversation(draw: Any, server: bool) -> list[bytes]:
    enc = hpack.Encoder()
    out: list[bytes] = [SettingsFrame(0).serialize()]
    streams = [1, 3, 5] if not server else []
    for _ in range(draw(st.integers(1, 14))):
        kinds = ["open", "data", "data", "data", "end", "headers", "rst", "window", "ping"]
        kind = draw(st.sampled_from(kinds))
        sid = draw(st.sampled_from([*streams, 0, 7, 2**31 - 1])) if streams else 1
        if kind == "open":
            if server:
                # mostly the next stream; sometimes one already used, skipped or even
                sid = 1 + 2 * len(streams)
                if draw(st.integers(0, 4)) == 0:
                    sid = draw(st.sampled_from([1, 2, sid + 2, sid + 3]))
                streams.append(sid)
                block = enc.encode(REQUEST)
            else:
                block = enc.encode(RESPONSE)
            flags = END_HEADERS | (END_STREAM if draw(st.booleans()) else 0)
            out.append(raw(HEADERS, flags, sid, block))
        elif kind == "data":
            out.append(_data(draw, sid, _payload(draw)))
        elif kind == "end":
            if server:
                out.append(raw(DATA, END_STREAM, sid, b""))
            else:
                out.append(raw(HEADERS, END_HEADERS | END_STREAM, sid, enc.encode(TRAILERS)))
        elif kind == "headers":
            out.append(_odd_headers(draw, enc, sid, server))
        elif kind == "rst":
            out.append(RstStreamFrame(sid or 1, error_code=8).serialize())
        elif kind == "window":
            inc = WindowUpdateFrame(draw(st.sampled_from([0, sid])), window_increment=1000)
            out.append(inc.serialize())
        else:
            out.append(PingFrame(0, opaque_data=b"12345678").serialize())
    return out


def _odd_headers(draw: Any, enc: hpack.Encoder, sid: int, server: bool) -> bytes:
    """A header block h2 treats in some other way: informational, trailers without
    END_STREAM, with priority or padding, split over CONTINUATION, undecodable."""
    kind = draw(st.sampled_from(["info", "trailers", "priority", "padded", "split", "garbage"]))
    end = END_STREAM if draw(st.booleans()) else 0
    if kind == "info":
        return raw(HEADERS, END_HEADERS | end, sid, enc.encode([(b":status", b"100")]))
    if kind == "trailers":  # with or without END_STREAM
        return raw(HEADERS, END_HEADERS | end, sid, enc.encode(TRAILERS))
    block = enc.encode(REQUEST if server else RESPONSE)
    if kind == "priority":
        return raw(HEADERS, END_HEADERS | 0x20 | end, sid, b"\x00\x00\x00\x00\x10" + block)
    if kind == "padded":
        return raw(HEADERS, END_HEADERS | end, sid, block, pad=draw(st.integers(0, 20)))
    if kind == "split":
        return raw(HEADERS, end, sid, block[:2]) + raw(CONTINUATION, END_HEADERS, sid, block[2:])
    return raw(HEADERS, END_HEADERS | end, sid, draw(st.binary(min_size=1, max_size=20)))


def _run(proto: Any, pieces: list[bytes], acks: list[bool]) -> tuple[Any, ...]:
    events: list[ev.Event] = []
    wire = bytearray(proto.data_to_send())
    ack_at = itertools.cycle(acks)
    for piece in pieces:
        got = proto.receive_data(piece)
        while True:
            for e in got:
                events.append(e)
                if isinstance(e, ev.MessageReceived) and next(ack_at):
                    proto.acknowledge(e.stream_id, e.ack)
            if not proto.input_pending:
                break
            got = proto.receive_data(b"")
        wire += proto.data_to_send()
    conn = proto._h2.conn
    state = (
        conn._inbound_flow_control_window_manager.current_window_size,
        conn.state_machine.state,
        sorted(
            (sid, s.state_machine.state, s._inbound_window_manager.current_window_size,
             s._actual_content_length, s.closed_by)
            for sid, s in conn.streams.items()
        ),
        sorted(conn._closed_streams.items()),
    )  # fmt: skip
    return events, bytes(wire), state


def _failed(result: tuple[Any, ...]) -> ev.ConnectionFailed | None:
    return next((e for e in result[0] if isinstance(e, ev.ConnectionFailed)), None)


@pytest.mark.parametrize("server", [True, False], ids=["server", "client"])
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fast_data_path_does_what_h2_does(server: bool, data: st.DataObject) -> None:
    frames = _conversation(data.draw, server)
    stream = (PREFACE if server else b"") + b"".join(frames)
    pieces = _split(stream, data.draw(st.lists(st.integers(0, 2**20), max_size=6)))
    acks = data.draw(st.lists(st.booleans(), min_size=1, max_size=5))
    make = _server if server else _client

    fast = _run(make(), pieces, acks)
    with pytest.MonkeyPatch.context() as m:  # the fast session, every frame through h2
        m.setattr(fast_session, "data_fast_stream", lambda *a: None)
        m.setattr(fast_session, "headers_fast_stream", lambda *a: None)
        m.setattr(fast_session, "request_fast_ok", lambda *a: False)
        slow = _run(make(), pieces, acks)
    pure = _run(make(False), pieces, acks)  # the pure session: h2's public API only
    _same_verdict(fast, slow)
    _same_verdict(fast, pure)


def _same_verdict(fast: tuple[Any, ...], slow: tuple[Any, ...]) -> None:
    fast_failure, slow_failure = _failed(fast), _failed(slow)
    if fast_failure is None and slow_failure is None:
        assert fast == slow
    else:
        # A connection error: h2 drops the events of the whole read it fails in; a session
        # that hands it fewer frames per read keeps those of the frames before. The
        # verdict is the same, and the events before it agree as far as both have them.
        assert fast_failure is not None
        assert slow_failure is not None
        assert fast_failure.error_code == slow_failure.error_code
        assert fast[0][-1] is fast_failure  # nothing after the connection failed
        assert slow[0][-1] is slow_failure
        n = min(len(fast[0]), len(slow[0])) - 1
        assert fast[0][:n] == slow[0][:n]


def test_bulk_data_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above is only worth something if the fast path is taken: it is, for
    every DATA frame of an ordinary response (and h2 sees none of them)."""
    taken: list[int] = []
    real = receive_data_fast

    def counting(conn: Any, stream: Any, length: int, end_stream: bool) -> None:
        taken.append(length)
        real(conn, stream, length, end_stream)

    monkeypatch.setattr(fast_session, "receive_data_fast", counting)
    client = _client()
    enc = hpack.Encoder()
    messages = [encode_message(bytes([i]) * 1000) for i in range(5)]
    stream = SettingsFrame(0).serialize() + raw(HEADERS, END_HEADERS, 1, enc.encode(RESPONSE))
    stream += b"".join(raw(DATA, 0, 1, m) for m in messages)
    stream += raw(HEADERS, END_HEADERS | END_STREAM, 1, enc.encode(TRAILERS))
    events, _, _ = _run(client, [stream[:2000], stream[2000:]], [True])
    got = [e.data for e in events if isinstance(e, ev.MessageReceived)]
    assert got == [bytes([i]) * 1000 for i in range(5)]
    assert taken == [len(m) for m in messages]
    assert any(isinstance(e, ev.CallCompleted) for e in events)
