"""The fast session (``rpc/_h2/fast_session.py``) writes exactly what the pure one does.

The same conversation between our ClientProtocol and ServerProtocol runs twice: with the
fast paths, and with ``fast_paths=False`` (the pure session: h2's public API alone).
Every byte each side writes, every event each side sees and h2's flow-control and stream
state along the way must be identical. Spies on both runs prove which path each one took:
the fast run sends every HEADERS and DATA frame through the fast paths and never calls
h2's ``send_headers``/``send_data``; the pure run never reaches a fast path.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import h2.connection
import pytest

from trio_jobs.rpc import StatusCode, _protocol
from trio_jobs.rpc import _events as ev
from trio_jobs.rpc._client_protocol import ClientProtocol
from trio_jobs.rpc._h2 import fast_session
from trio_jobs.rpc._messages import encode_message
from trio_jobs.rpc._server_protocol import ServerProtocol

pytestmark = pytest.mark.one_rpc_mode  # compares the rpc modes itself (or uses no protocol): one run

if TYPE_CHECKING:
    from collections.abc import Callable

KiB = 1024
MiB = 1024 * KiB


def _common(max_frame_size: int, fast_paths: bool) -> dict[str, Any]:
    return {
        "fast_paths": fast_paths,
        "max_receive_message": 4 * MiB,
        "max_concurrent_streams": 100,
        "stream_window": 64 * KiB,  # small, so the conversation runs out of window
        "connection_window": 128 * KiB,
        "max_frame_size": max_frame_size,
        "clock": lambda: 0.0,
    }


class Conversation:
    def __init__(self, fast_paths: bool) -> None:
        self.client = ClientProtocol(max_header_list_size=16 * KiB, **_common(16 * KiB, fast_paths))
        self.server = ServerProtocol(
            max_header_list_size=8 * KiB,
            ping_min_interval=10.0,
            max_ping_strikes=2,
            reset_rate=10.0,
            reset_burst=20,
            **_common(32 * KiB, fast_paths),
        )
        self.wire: list[tuple[str, bytes]] = []
        self.client_events: list[ev.Event] = []
        self.server_events: list[ev.Event] = []
        self.snapshots: list[tuple[Any, ...]] = []
        self.client.initiate()
        self.server.initiate()
        self.pump()

    def _feed(self, proto: Any, data: bytes, into: list[ev.Event]) -> None:
        got = proto.receive_data(data)
        while True:
            into += got
            if not proto.input_pending:
                return
            got = proto.receive_data(b"")

    def pump(self) -> None:
        for _ in range(100):
            a, b = self.client.data_to_send(), self.server.data_to_send()
            if a:
                self.wire.append(("c", a))
                self._feed(self.server, a, self.server_events)
            if b:
                self.wire.append(("s", b))
                self._feed(self.client, b, self.client_events)
            if not a and not b:
                return
        raise AssertionError("the conversation does not settle")

    def consume(self) -> None:
        """Both applications take every message they were given (returning credit)."""
        for proto, events in ((self.server, self.server_events), (self.client, self.client_events)):
            for e in events:
                if isinstance(e, ev.MessageReceived):
                    proto.acknowledge(e.stream_id, e.ack)
            events.append(ev.SettingsReceived())  # a marker: consumed up to here
        self.pump()

    def state(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for proto in (self.client, self.server):
            conn = proto._h2.conn
            out.append(conn.outbound_flow_control_window)
            # (the fast session forgets a closed stream at release, h2 later: open ones)
            live = sorted((sid, s) for sid, s in conn.streams.items() if not s.closed)
            out.append([sid for sid, _ in live])
            for sid, s in live:
                out.append((sid, s.state_machine.state, s.outbound_flow_control_window))
                out.append((s.state_machine.headers_sent, s.state_machine.trailers_sent))
                out.append((s._authority, s.request_method))
        return tuple(out)

    def snap(self) -> None:
        self.snapshots.append(self.state())


def _run(fast_paths: bool) -> tuple[Any, ...]:
    c = Conversation(fast_paths)
    assert c.client.fast_paths is c.server.fast_paths is fast_paths
    client, server = c.client, c.server
    # unary calls with metadata, one after the other and two at once
    for payload in (b"a", b"", b"x" * 1000):
        sid = client.start_request("/p.S/U", authority="h:1", metadata=(("k", "v"),))
        client.send_data(sid, encode_message(payload), end_stream=True)
        c.pump()
        c.snap()
        server.send_response_headers(sid, (("r-bin", b"\x00\x01"),))
        server.send_data(sid, encode_message(payload[::-1]))
        server.send_trailers(sid, StatusCode.OK, "", (("t", "1"),))
        c.pump()
        c.consume()
        client.release(sid)
        server.release(sid)
    one = client.start_request("/p.S/U", authority="h:1", timeout=1.5)
    two = client.start_request("/p.S/U", authority="h:1")
    client.send_data(one, encode_message(b"1"), end_stream=True)
    client.send_data(two, encode_message(b"2"), end_stream=True)
    c.pump()
    c.snap()
    server.send_trailers(two, StatusCode.NOT_FOUND, "nicht gefunden ☃")  # Trailers-Only
    server.send_response_headers(one)
    c.pump()
    c.snap()
    # a server stream larger than the windows: partial sends, then WINDOW_UPDATEs
    big = encode_message(b"z" * (200 * KiB))
    sent = server.send_data(one, big)
    assert 0 < sent < len(big)
    c.pump()
    c.consume()
    for _ in range(20):  # a few rounds of window updates (bounded: a bug must not hang)
        c.snap()
        if sent == len(big):
            break
        sent += server.send_data(one, big[sent:])
        c.pump()
        c.consume()
    assert sent == len(big)
    server.send_trailers(one, StatusCode.OK)
    c.pump()
    # a stream the client resets while the server answers
    three = client.start_request("/p.S/U", authority="h:1")
    client.send_data(three, encode_message(b"3"))
    c.pump()
    server.send_response_headers(three)
    client.reset_stream(three)
    c.pump()
    with pytest.raises(_protocol.StreamGone):
        server.send_data(three, encode_message(b"late"))
    for sid in (one, two, three):
        client.release(sid)
        server.release(sid)
    c.pump()
    c.snap()
    return (c.wire, c.client_events, c.server_events, c.snapshots)


def _spy(m: pytest.MonkeyPatch, owner: object, name: str, calls: Counter[str]) -> None:
    """Replace ``owner.name`` by a wrapper that counts its calls (``name``) and, for the
    fast paths that may decline, the calls it accepted (``name:True``)."""
    real: Callable[..., Any] = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        result = real(*args, **kwargs)
        if result is True:
            calls[f"{name}:True"] += 1
        return result

    m.setattr(owner, name, spy)


def _spy_h2(m: pytest.MonkeyPatch, calls: Counter[str]) -> None:
    for name in ("send_headers", "send_data"):
        _spy(m, h2.connection.H2Connection, name, calls)


# The HEADERS frames `_run` sends: 6 requests the client starts, and on the server 6
# response headers or trailers in the three unary calls, then Trailers-Only for `two`,
# response headers and trailers for `one`, response headers for `three`.
CLIENT_STARTS = 6
SERVER_HEADERS = 10


def test_fast_paths_write_what_h2_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    fast_calls: Counter[str] = Counter()
    with monkeypatch.context() as m:
        _spy_h2(m, fast_calls)
        for name in ("send_headers_fast", "start_stream_fast", "data_frame_header"):
            _spy(m, fast_session, name, fast_calls)
        fast = _run(True)
    slow_calls: Counter[str] = Counter()
    with monkeypatch.context() as m:
        _spy_h2(m, slow_calls)
        for name in ("send_headers_fast", "start_stream_fast", "data_frame_header"):
            _spy(m, fast_session, name, slow_calls)
        slow = _run(False)
    # The fast run took the fast paths for every frame, h2's send calls never ...
    assert fast_calls["start_stream_fast:True"] == CLIENT_STARTS, fast_calls
    assert fast_calls["send_headers_fast:True"] == SERVER_HEADERS, fast_calls
    # (the 200 KiB message alone takes 13 frames of at most 16 KiB, the 9 small ones 9 more)
    assert fast_calls["data_frame_header"] >= 13 + 9, fast_calls
    assert fast_calls["send_headers"] == fast_calls["send_data"] == 0, fast_calls
    # ... and the pure run sent the same frames through h2 alone.
    assert slow_calls["send_headers"] == CLIENT_STARTS + SERVER_HEADERS, slow_calls
    assert slow_calls["send_data"] == fast_calls["data_frame_header"], (slow_calls, fast_calls)
    assert not any(k in slow_calls for k in ("send_headers_fast", "start_stream_fast", "data_frame_header"))
    assert fast[0] == slow[0]  # every byte on the wire, in order
    assert fast[1:3] == slow[1:3]  # every event on both sides
    assert fast[3] == slow[3]  # h2's windows and stream states along the way
