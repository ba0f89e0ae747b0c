"""``ServerLimits.max_connections``: exactly N connections are served, the N+1th is refused."""

from __future__ import annotations

from typing import Any, cast

import pytest
import trio
import trio.testing

from trio_jobs.rpc import Server, ServerLimits

from .echo import TrioEcho

BOUND = 20


async def served(stream: trio.SocketStream) -> bool:
    """True if the server speaks HTTP/2 on it (its SETTINGS), False if it closed it."""
    try:
        return await stream.receive_some(64) != b""
    except trio.BrokenResourceError:  # closed with RST
        return False


@pytest.mark.parametrize("cap", [1, 3])
async def test_exactly_max_connections_are_served(cap: int) -> None:
    # Plain TCP: a served connection gets the server's SETTINGS at once and then waits
    # (up to the handshake timeout) for our preface; a refused one is closed at accept.
    server = Server(
        TrioEcho().methods(), ssl_context=None, limits=ServerLimits(max_connections=cap)
    )
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            (host, port), *_ = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
            # All N+1 connect before we read anything; the kernel queues them in order.
            streams = [await trio.open_tcp_stream(host, port) for _ in range(cap + 1)]
            assert [await served(s) for s in streams] == [True] * cap + [False]
            # Freeing the slots lets new connections in again (the server notices each
            # close when its reader sees EOF, so a new one may be refused meanwhile:
            # retry, bounded).
            for s in streams:
                await s.aclose()
            for _ in range(100):
                again = await trio.open_tcp_stream(host, port)
                ok = await served(again)
                await again.aclose()
                if ok:
                    break
            else:
                pytest.fail("the freed slots were never reused")
            await server.shutdown(drain_timeout=1.0)


class BacklogListener:
    """A listener whose backlog holds the given streams: accept() returns them at once."""

    def __init__(self, streams: list[trio.abc.Stream]) -> None:
        self.backlog = streams
        self.drained = trio.Event()

    async def accept(self) -> trio.abc.Stream:
        if self.backlog:
            return self.backlog.pop(0)
        self.drained.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")


@pytest.mark.parametrize("cap", [1, 4])
async def test_a_burst_of_accepts_cannot_exceed_the_cap(cap: int) -> None:
    # The accept loop takes the whole backlog before any connection task runs: the cap
    # must be counted at accept, not when the connection task starts.
    server = Server(
        TrioEcho().methods(), ssl_context=None, limits=ServerLimits(max_connections=cap)
    )
    pairs = [trio.testing.memory_stream_pair() for _ in range(cap + 3)]
    listener = BacklogListener([server_end for _, server_end in pairs])
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server._accept_loop, cast("Any", listener), nursery)
            await listener.drained.wait()
            got = [await client.receive_some(64) != b"" for client, _ in pairs]
            assert got == [True] * cap + [False] * 3
            nursery.cancel_scope.cancel()
