"""Connection-level closes: the idle timeout and a handler's ``ctx.close_connection()``.

Memory streams and the autojump clock: the timing is exact and nothing sleeps for real.
The client is :class:`~rpc.rawh2.RawH2`, so the tests see every frame the server sends
(which GOAWAY, with which code and last stream id, and when the connection closes).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import pytest
import trio
import trio.testing
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame, RstStreamFrame, SettingsFrame

from trio_jobs.rpc import Method, Server, ServerContext, ServerLimits, StatusCode

from .echo import STREAM, UNARY, EchoReply, EchoRequest, TrioEcho
from .rawh2 import NO_ERROR, REFUSED_STREAM, RawH2, grpc_message

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

IDLE: Final = 60.0
MAX_STREAM_ID: Final = 2**31 - 1
DENY: Final = "/test.deny.Deny/Call"


async def deny(request: Any, ctx: ServerContext) -> Any:
    """Refuses every call and asks for the connection to be closed (the unknown-identity case)."""
    ctx.close_connection()
    ctx.abort(StatusCode.PERMISSION_DENIED, "who are you?")


def make_server(**limits: Any) -> Server:
    extra = Method(path=DENY, request_type=EchoRequest, response_type=EchoReply, handler=deny)
    return Server([*TrioEcho().methods(), extra], ssl_context=None, limits=ServerLimits(**limits))


@dataclass
class Watch:
    """Every frame the server sent, when, and when it closed the connection."""

    start: float
    frames: list[tuple[float, Any]] = field(default_factory=list)
    closed_at: float | None = None

    def goaways(self) -> list[tuple[float, GoAwayFrame]]:
        return [(t, f) for t, f in self.frames if isinstance(f, GoAwayFrame)]


@contextlib.asynccontextmanager
async def connected(server: Server) -> AsyncIterator[tuple[RawH2, Watch, trio.Event]]:
    """A raw client on a memory stream served by ``server``; a task reads every frame,
    ACKs SETTINGS and PINGs like a real client, and records the close. The event is set
    once the server has closed the connection."""
    client_end, server_end = trio.testing.memory_stream_pair()
    raw = RawH2(client_end)
    watch = Watch(start=trio.current_time())
    gone = trio.Event()

    async def read() -> None:
        while (got := await raw.next_frame()) is not None:
            frame = got.frame
            watch.frames.append((trio.current_time() - watch.start, frame))
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                    await raw.send(SettingsFrame(0, flags=["ACK"]))
                elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
                    await raw.send(PingFrame(0, frame.opaque_data, flags=["ACK"]))
        watch.closed_at = trio.current_time() - watch.start
        gone.set()

    with trio.fail_after(10_000):  # virtual seconds (autojump): a hang fails, never waits
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_connection, server_end)
            await raw.send_preface()
            nursery.start_soon(read)
            yield raw, watch, gone
            await gone.wait()


def request(sid: int, raw: RawH2, path: str, msg: Any) -> list[Any]:
    """HEADERS and the one DATA frame (END_STREAM) of a unary or server-streaming request."""
    return [
        raw.headers_frame(sid, path),
        DataFrame(sid, grpc_message(msg.SerializeToString()), flags=["END_STREAM"]),
    ]


async def test_an_idle_connection_gets_goaway_no_error_and_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected(make_server(idle_timeout=IDLE)) as (_raw, watch, gone):
        await gone.wait()
    (t1, first), (t2, second) = watch.goaways()
    # grpc's max_connection_idle: GOAWAY(2^31-1) + PING, then the real last stream id.
    assert t1 == pytest.approx(IDLE, abs=0.01)
    assert (first.error_code, first.last_stream_id) == (NO_ERROR, MAX_STREAM_ID)
    assert (second.error_code, second.last_stream_id) == (NO_ERROR, 0)
    assert t2 == pytest.approx(IDLE, abs=0.01)  # our PING ack came at once
    assert watch.closed_at == pytest.approx(IDLE, abs=0.01)


async def test_pings_alone_do_not_keep_a_connection_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected(make_server(idle_timeout=IDLE)) as (raw, watch, gone):
        # A PING every 25 s: within the ping policy (10 s), and answered by the server, but
        # no call: the connection is still idle.
        for _ in range(20):
            with trio.move_on_after(25):
                await gone.wait()
            if gone.is_set():
                break
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await raw.send(PingFrame(0, b"keepaliv"))
    acks = [t for t, f in watch.frames if isinstance(f, PingFrame) and "ACK" in f.flags]
    assert acks == [25, 50]  # the server did see them
    assert watch.closed_at == pytest.approx(IDLE, abs=0.01)


async def test_a_long_stream_is_not_idle_and_the_idle_time_starts_when_it_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A follower (like ``tail``) that gets a message every 100 s, five times: 500 s of one
    # stream on a connection whose idle timeout is 60 s.
    async with connected(make_server(idle_timeout=IDLE)) as (raw, watch, gone):
        await raw.send(*request(1, raw, STREAM, EchoRequest(count=5, size=8, sleep=100)))
        await gone.wait()
    data_times = [t for t, f in watch.frames if f.stream_id == 1 and isinstance(f, DataFrame)]
    ended = [t for t, f in watch.frames if f.stream_id == 1 and "END_STREAM" in f.flags]
    assert len(data_times) == 5
    assert ended == [pytest.approx(500, abs=0.01)]
    (t1, first), _ = watch.goaways()
    assert t1 == pytest.approx(500 + IDLE, abs=0.01)
    assert first.error_code == NO_ERROR
    assert watch.closed_at == pytest.approx(500 + IDLE, abs=0.01)


async def test_each_call_restarts_the_idle_time(autojump_clock: trio.testing.MockClock) -> None:
    async with connected(make_server(idle_timeout=IDLE)) as (raw, watch, gone):
        for sid in (1, 3, 5):  # calls at 40, 80, 120 s: never 60 s without one
            await trio.sleep(40)
            await raw.send(*request(sid, raw, UNARY, EchoRequest(payload=b"hi")))
        await gone.wait()
    assert [t for t, f in watch.frames if "END_STREAM" in f.flags] == [
        pytest.approx(t, abs=0.01) for t in (40, 80, 120)
    ]
    (t1, _), (_, second) = watch.goaways()
    assert t1 == pytest.approx(120 + IDLE, abs=0.01)
    assert second.last_stream_id == 5
    assert watch.closed_at == pytest.approx(120 + IDLE, abs=0.01)


async def test_no_idle_timeout_when_disabled(autojump_clock: trio.testing.MockClock) -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    raw = RawH2(client_end)
    server = make_server(idle_timeout=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_connection, server_end)
        await raw.send_preface()
        await raw.send(SettingsFrame(0, flags=["ACK"]))
        with trio.move_on_after(100 * IDLE):
            while (got := await raw.next_frame()) is not None:
                assert not isinstance(got.frame, GoAwayFrame)
            pytest.fail("the server closed a connection without an idle timeout")
        with trio.fail_after(10):
            await server.shutdown(drain_timeout=1)


async def test_close_connection_closes_right_after_the_refusal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected(make_server()) as (raw, watch, gone):
        await raw.send(*request(1, raw, DENY, EchoRequest()))
        await gone.wait()
    trailers = [f for _, f in watch.frames if f.stream_id == 1]
    assert trailers
    assert "END_STREAM" in trailers[-1].flags
    [(t, goaway)] = watch.goaways()
    # One GOAWAY with the real last stream id at once (no PING round: the peer is not
    # wanted), after the refusal, and the close right after it.
    assert (goaway.error_code, goaway.last_stream_id) == (NO_ERROR, 1)
    order = [f for _, f in watch.frames]
    assert order.index(goaway) > order.index(trailers[-1])
    assert t == pytest.approx(0, abs=0.01)
    assert watch.closed_at == pytest.approx(0, abs=0.01)


async def test_close_connection_lets_running_calls_finish_and_refuses_new_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connected(make_server(drain_timeout=30)) as (raw, watch, gone):
        # stream 1: a call that takes 5 s; stream 3: the refusal that closes the connection
        await raw.send(*request(1, raw, UNARY, EchoRequest(payload=b"slow", sleep=5)))
        await trio.testing.wait_all_tasks_blocked()
        await raw.send(*request(3, raw, DENY, EchoRequest()))
        await trio.sleep(1)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await raw.send(*request(5, raw, UNARY, EchoRequest(payload=b"late")))
        await gone.wait()
    [(_, goaway)] = watch.goaways()
    assert goaway.last_stream_id == 3
    ends = {f.stream_id: t for t, f in watch.frames if "END_STREAM" in f.flags}
    assert ends[1] == pytest.approx(5, abs=0.01)  # the running call finished
    late = [f for _, f in watch.frames if f.stream_id == 5]
    assert late
    assert all(isinstance(f, RstStreamFrame) for f in late)  # never served
    assert late[0].error_code == REFUSED_STREAM
    assert watch.closed_at == pytest.approx(5, abs=0.01)


async def test_shutdown_during_an_idle_close_is_bounded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The peer never ACKs our PING, so the idle close waits shutdown_ping_timeout; a
    # shutdown meanwhile must not send a second, contradicting GOAWAY, and both end.
    client_end, server_end = trio.testing.memory_stream_pair()
    raw = RawH2(client_end)
    server = make_server(idle_timeout=IDLE, shutdown_ping_timeout=30)
    frames: list[Any] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_connection, server_end)
        await raw.send_preface()
        await raw.send(SettingsFrame(0, flags=["ACK"]))

        async def read() -> None:
            while (got := await raw.next_frame()) is not None:
                frames.append(got.frame)

        nursery.start_soon(read)
        await trio.sleep(IDLE + 5)  # the idle close has begun and waits for the PING ack
        assert [f.last_stream_id for f in frames if isinstance(f, GoAwayFrame)] == [MAX_STREAM_ID]
        t0 = trio.current_time()
        with trio.fail_after(10):
            await server.shutdown(drain_timeout=1)
        assert trio.current_time() - t0 <= 1 + 2.01  # drain deadline + cleanup at most
    # Only the first closer sends GOAWAYs (``graceful_close``): the shutdown sends none of
    # its own, not even a second two-phase GOAWAY(2^31-1), and the idle close never got the
    # ack it waits for before its final one. (No stream was opened, so no later GOAWAY could
    # raise the last stream id here: the next test covers that.)
    goaways = [(f.error_code, f.last_stream_id) for f in frames if isinstance(f, GoAwayFrame)]
    assert goaways == [(NO_ERROR, MAX_STREAM_ID)]


async def test_shutdown_after_close_connection_never_raises_the_last_stream_id(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # close_connection sends GOAWAY(3) at once and drains the running call on stream 1; a
    # shutdown's own two-phase close would send GOAWAY(2^31-1) after it, raising the last
    # stream id (RFC 9113 6.8 forbids it). It must only bring the drain deadline forward.
    server = make_server(drain_timeout=30)
    async with connected(server) as (raw, watch, gone):
        await raw.send(*request(1, raw, UNARY, EchoRequest(payload=b"slow", sleep=5)))
        await trio.testing.wait_all_tasks_blocked()
        await raw.send(*request(3, raw, DENY, EchoRequest()))
        await trio.sleep(1)
        assert [f.last_stream_id for _, f in watch.goaways()] == [3]
        with trio.fail_after(10):
            await server.shutdown(drain_timeout=1)
        await gone.wait()
    assert [(f.error_code, f.last_stream_id) for _, f in watch.goaways()] == [(NO_ERROR, 3)]
    ends = {f.stream_id: t for t, f in watch.frames if "END_STREAM" in f.flags}
    assert ends[1] == pytest.approx(1 + 1, abs=0.01)  # cut at the shutdown's deadline
    assert watch.closed_at == pytest.approx(1 + 1, abs=0.01)


async def test_a_connection_the_client_closes_ends_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The idle watchdog must not keep a connection's task alive after the peer left.
    client_end, server_end = trio.testing.memory_stream_pair()
    raw = RawH2(client_end)
    server = make_server(idle_timeout=IDLE)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_connection, server_end)
        await raw.send_preface()
        await raw.send(SettingsFrame(0, flags=["ACK"]))
        await trio.sleep(1)
        t0 = trio.current_time()
        await raw.aclose()
    assert trio.current_time() - t0 < 1
