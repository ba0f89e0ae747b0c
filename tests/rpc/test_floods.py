"""Floods of small frames: processed in slices, cut short by a GOAWAY, SETTINGS budget.

The sans-IO core takes at most ``frames_per_call`` frames per ``receive_data`` (the reader
yields between calls, so one connection's flood cannot hold the event loop), stops handing
out events once a policy queued GOAWAY, and answers a SETTINGS flood with
GOAWAY(ENHANCE_YOUR_CALM, "too_many_settings") like a PING flood.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h2.events
import h2.settings
import trio
import trio.testing
from h2.errors import ErrorCodes
from hyperframe.frame import PingFrame, SettingsFrame, WindowUpdateFrame

from trio_jobs import rpc
from trio_jobs.rpc import _events as ev
from trio_jobs.rpc._protocol import DEFAULT_FRAMES_PER_CALL

from .rawh2 import ENHANCE_YOUR_CALM, PREFACE, SETTINGS_INITIAL_WINDOW_SIZE, RawH2
from .test_attacks import BOUND, Served, _assert_goaway, _flood_and_read, served
from .test_protocol_core import REQ, Clock, Peer, make_server

if TYPE_CHECKING:
    from collections.abc import Iterable

    from hyperframe.frame import Frame

__all__ = ["served"]  # the fixture, shared with test_attacks

WINDOW_UPDATES = 100


def _window_updates(n: int) -> bytes:
    return b"".join(WindowUpdateFrame(0, 1).serialize() for _ in range(n))


# --- the sans-IO core --------------------------------------------------------------------


def test_a_large_read_is_processed_in_slices() -> None:
    p = Peer()
    data = _window_updates(WINDOW_UPDATES)
    tail = WindowUpdateFrame(0, 1).serialize()
    got = p.server.receive_data(data + tail[:5])  # and half a frame
    assert len(got) == DEFAULT_FRAMES_PER_CALL
    assert p.server.input_pending
    calls = 1
    while p.server.input_pending:
        more = p.server.receive_data(b"")
        assert len(more) <= DEFAULT_FRAMES_PER_CALL
        got += more
        calls += 1
        assert calls <= WINDOW_UPDATES, "no progress"
    assert len(got) == WINDOW_UPDATES
    assert all(isinstance(e, ev.WindowUpdated) for e in got)
    assert calls == -(-WINDOW_UPDATES // DEFAULT_FRAMES_PER_CALL)
    assert p.server.receive_data(tail[5:]) == [ev.WindowUpdated(stream_id=0)]
    assert not p.server.input_pending


def test_no_frame_budget_processes_everything_at_once() -> None:
    p = Peer(make_server(frames_per_call=None))
    got = p.server.receive_data(_window_updates(WINDOW_UPDATES))
    assert len(got) == WINDOW_UPDATES
    assert not p.server.input_pending


def test_no_events_after_a_policy_queued_goaway() -> None:
    # All in one call: a Rapid Reset batch (burst of 20 resets, see make_server).
    p = Peer(make_server(frames_per_call=None))
    for i in range(60):
        sid = 1 + 2 * i
        p.h2.send_headers(sid, REQ)
        p.h2.reset_stream(sid, ErrorCodes.CANCEL)
    got = p.server.receive_data(p.h2.data_to_send())
    failed = [i for i, e in enumerate(got) if isinstance(e, ev.ConnectionFailed)]
    assert failed == [len(got) - 1], "events handed out after the GOAWAY"
    last = got[-1]
    assert isinstance(last, ev.ConnectionFailed)
    assert last.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert sum(isinstance(e, ev.RequestReceived) for e in got) <= 21
    assert not p.server.input_pending
    assert p.server.receive_data(_window_updates(3)) == []


def _settings_update(p: Peer) -> list[ev.Event]:
    p.h2.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535})
    return p.pump()


def test_settings_policy_too_many_settings() -> None:
    clock = Clock()
    p = Peer(make_server(clock, settings_rate=1.0, settings_burst=5))  # the preface took 1
    for _ in range(4):
        assert ev.SettingsReceived() in _settings_update(p)
    clock.now += 2.0  # two more tokens
    for _ in range(2):
        assert ev.SettingsReceived() in _settings_update(p)
    got = _settings_update(p)
    assert ev.SettingsReceived() not in got
    failed = [e for e in got if isinstance(e, ev.ConnectionFailed)]
    assert failed
    assert failed[0].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    goaways = [e for e in p.client_events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaways[-1].error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaways[-1].additional_data == b"too_many_settings"


def test_settings_spaced_out_are_fine() -> None:
    clock = Clock()
    p = Peer(make_server(clock, settings_rate=1.0, settings_burst=5))
    for _ in range(50):
        clock.now += 1.0
        assert ev.SettingsReceived() in _settings_update(p)
    assert not any(isinstance(e, ev.ConnectionFailed) for e in p.events)


# --- the trio layer ----------------------------------------------------------------------


async def test_the_reader_lets_other_tasks_run_during_a_flood() -> None:
    """One read of 3,200 frames: other tasks run between the slices, not after all of it."""
    frames = 3200
    server = rpc.Server([], ssl_context=None)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    raw = RawH2(client_stream)
    ticks = 0
    done = trio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_connection, server_stream)
            await raw.send_preface()
            got, _ = await raw.read_until(
                lambda r: isinstance(r.frame, SettingsFrame) and "ACK" in r.frame.flags
            )
            assert got is not None
            nursery.start_soon(ticker)
            before = ticks
            # the flood and a PING after it, in one write (one read on the server side)
            await raw.send(_window_updates(frames), PingFrame(0, b"afterall"))
            got, _ = await raw.read_until(
                lambda r: isinstance(r.frame, PingFrame) and "ACK" in r.frame.flags
            )
            assert got is not None
            during = ticks - before
            done.set()
            await raw.aclose()
    # about frames / DEFAULT_FRAMES_PER_CALL = 100 slices; all at once gave < 10 ticks
    assert during >= frames // DEFAULT_FRAMES_PER_CALL // 2, f"{during} ticks"


# --- the attack over TLS -----------------------------------------------------------------


async def test_settings_flood(served: Served) -> None:
    """20,000 legal SETTINGS frames: GOAWAY too_many_settings after about the budget."""
    count, per_batch = 20_000, 1000

    def batches() -> Iterable[list[Frame | bytes]]:
        yield [PREFACE, SettingsFrame(0)]
        settings = {SETTINGS_INITIAL_WINDOW_SIZE: 65535}
        for _ in range(count // per_batch):
            yield [SettingsFrame(0, settings=settings) for _ in range(per_batch)]

    with trio.fail_after(BOUND):
        async with await served.raw() as raw:
            _, frames = await _flood_and_read(raw, batches(), max_frames=count + 100)
    goaway = _assert_goaway(frames, ENHANCE_YOUR_CALM)
    assert b"too_many_settings" in goaway.additional_data
    acks = [r for r in frames if isinstance(r.frame, SettingsFrame) and "ACK" in r.frame.flags]
    burst = rpc.ServerLimits().settings_burst
    assert len(acks) <= burst + DEFAULT_FRAMES_PER_CALL, f"{len(acks)} SETTINGS answered"
    await served.assert_responsive()
