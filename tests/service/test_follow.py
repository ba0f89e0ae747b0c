"""``JobsClient.follow``: the output as an async iterator, across reconnects, with the job's
final status at the end; closing the client ends its follows; the reconnect policy.

A real server in this process (rpc over loopback mutual TLS, a worker running real
processes, no cgroups) and a trio TCP proxy between it and the client that can cut every
connection it carries and stop accepting new ones: the "network" the tests break.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import pytest
import trio
import trio.testing

from trio_jobs.client import JobOutput, JobsClient, JobsError, Reconnect
from trio_jobs.rpc import Server, ServerLimits, StatusCode
from trio_jobs.security.identity import identity_from_peercert
from trio_jobs.security.policy import Policy
from trio_jobs.service import JobService, job_service_methods
from trio_jobs.worker import open_worker

from .test_service import client_ctx, server_ctx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

BOUND: Final = 60.0  # every test's safety bound, never a way of waiting
POLICY: Final = """
[defaults]
run_as = ""
programs = ["*"]
[identities.alice]
"""
# Output that outlasts the client's flow-control windows (1 MiB a stream), so a cut after
# the first chunks lands while the server still has most of it to send.
LINES: Final = 400_000
SEQ_OUTPUT: Final = b"".join(b"%d\n" % i for i in range(1, LINES + 1))
SILENT_JOB: Final = ["-c", "echo ready; exec sleep 600"]


class Proxy:
    """A TCP proxy on 127.0.0.1:0 to ``upstream`` that can cut its connections (both ways,
    at once) and stop accepting (new connections are then refused)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self.connections = 0  # accepted so far
        self.open = 0  # carried now
        self.ended = trio.Event()  # set once a connection it carried has ended
        self._cuts: set[trio.CancelScope] = set()
        self._listening = trio.CancelScope()

    async def run(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as connections:
            with self._listening:  # stop() closes the listener, not the connections
                await trio.serve_listeners(self._carry, listeners, handler_nursery=connections,
                                           task_status=task_status)  # fmt: skip
            await trio.sleep_forever()

    async def _carry(self, client: trio.SocketStream) -> None:
        self.connections += 1
        self.open += 1
        try:
            with trio.CancelScope() as scope:
                self._cuts.add(scope)
                upstream = await trio.open_tcp_stream(*self.upstream)
                async with upstream, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, upstream, nursery.cancel_scope)
                    nursery.start_soon(self._pump, upstream, client, nursery.cancel_scope)
            self._cuts.discard(scope)
        finally:
            self.open -= 1
            await trio.aclose_forcefully(client)
            self.ended.set()

    @staticmethod
    async def _pump(src: trio.SocketStream, dst: trio.SocketStream, both: trio.CancelScope) -> None:
        try:
            async for data in src:
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        both.cancel()  # one side ended: end the other too

    def cut(self) -> None:
        """Drop every connection now (a failing network path)."""
        for scope in self._cuts:
            scope.cancel()

    def stop(self) -> None:
        """Stop listening: connecting is refused from now on (the server is gone)."""
        self._listening.cancel()


@dataclass(frozen=True, kw_only=True)
class Served:
    service: JobService
    address: tuple[str, int]
    pki: Path


@pytest.fixture
async def served(tmp_path: Path, dev_pki: Path, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    """The server; ``indirect`` parametrization gives its idle timeout (default 300 s)."""
    limits = ServerLimits(idle_timeout=getattr(request, "param", 300.0))
    async with open_worker(tmp_path / "data", default_grace=1.0) as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        server = Server(job_service_methods(service), ssl_context=server_ctx(dev_pki), identify=identity_from_peercert,
                        limits=limits)  # fmt: skip
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
            yield Served(service=service, address=addresses[0], pki=dev_pki)
            await worker.shutdown(0)
            await server.shutdown(2.0)
            nursery.cancel_scope.cancel()


@pytest.fixture
async def proxy(served: Served, nursery: trio.Nursery) -> Proxy:
    p = Proxy(served.address)
    await nursery.start(p.run)
    return p


def alice_via(proxy: Proxy, served: Served, reconnect: Reconnect | None = None) -> AbstractAsyncContextManager[JobsClient]:
    return JobsClient.connect(f"127.0.0.1:{proxy.port}", ssl_context=client_ctx(served.pki, "alice"), reconnect=reconnect)


async def follow_until_error(
    jobs: JobsClient, job_id: str, on_data: Callable[[bytes], None], *, reconnect: Reconnect | None = None
) -> tuple[JobOutput, JobsError]:
    """Follow until the iteration raises; the output and the error."""
    try:
        async with jobs.follow(job_id, reconnect=reconnect) as output:
            async for data in output:
                on_data(data)
    except JobsError as exc:
        return output, exc
    raise AssertionError("the follow ended without an error")


async def settled() -> None:
    """Everything in this process (server, proxy, client) has handled what is in flight:
    the loopback delivers at once, so all tasks blocked means nothing more is coming. A
    task sleeping less than the cushion (the first reconnect's 50 ms) wakes before it."""
    await trio.testing.wait_all_tasks_blocked(cushion=0.1)


async def test_follow_yields_exactly_the_bytes_from_offset_across_cuts(served: Served, proxy: Proxy) -> None:
    """Two cuts while the server still has megabytes to send: the chunks joined are the
    job's output from the offset, byte for byte, and the final status is the job's."""
    offset = 12_345
    with trio.fail_after(BOUND):
        async with alice_via(proxy, served) as jobs:
            job = await jobs.start("sh", ["-c", f"seq 1 {LINES}; exit 3"])
            got = bytearray()
            cut_after = [1, 700_000]  # bytes taken: after the first chunk, then mid-way
            async with jobs.follow(job.job_id, offset) as output:
                async for data in output:
                    got += data
                    assert output.offset == offset + len(got)
                    if cut_after and len(got) >= cut_after[0]:
                        del cut_after[0]
                        proxy.cut()
    assert not cut_after
    assert len(got) == len(SEQ_OUTPUT) - offset
    assert bytes(got) == SEQ_OUTPUT[offset:]
    assert output.final.job_id == job.job_id
    assert (output.final.state, output.final.exit_code) == ("exited", 3)
    assert output.reconnects == 2
    assert proxy.connections == 3
    assert output.last_error is not None
    assert output.last_error.code == StatusCode.UNAVAILABLE


async def test_tail_is_follow_with_a_callback(served: Served, proxy: Proxy) -> None:
    """tail keeps its signature: a sink, a cut connection resumed, the status returned."""
    got = bytearray()

    async def sink(data: bytes) -> None:
        if not got:
            proxy.cut()
        got.extend(data)

    with trio.fail_after(BOUND):
        async with alice_via(proxy, served) as jobs:
            job = await jobs.start("sh", ["-c", f"seq 1 {LINES}; exit 4"])
            final = await jobs.tail(job.job_id, sink, offset=100)
            assert bytes(got) == SEQ_OUTPUT[100:]
            assert final.exit_status == 4
            assert proxy.connections == 2
            rest = bytearray()

            async def keep(data: bytes) -> None:
                rest.extend(data)

            again = await jobs.tail(job.job_id, keep, offset=len(SEQ_OUTPUT) - 7, follow=False)
            assert bytes(rest) == SEQ_OUTPUT[-7:]
            assert again.exit_status == 4


@pytest.mark.parametrize("served", [0.5], indirect=True)  # the server's idle timeout
async def test_a_follow_on_a_connection_the_server_closed_starts_on_a_new_one_at_once(
    served: Served, proxy: Proxy
) -> None:
    """The server closes an idle connection (GOAWAY, then the close): a follow made on the
    client afterwards is no reconnect -- no failure, no backoff, a new connection at once."""
    with trio.fail_after(BOUND):
        async with alice_via(proxy, served) as jobs:
            job = await jobs.start("echo", ["hi"])
            await proxy.ended.wait()
            await settled()
            async with jobs.follow(job.job_id) as output:
                assert [data async for data in output] == [b"hi\n"]
    assert output.final.exit_code == 0
    assert (output.reconnects, output.last_error) == (0, None)
    assert proxy.connections == 2


async def test_errors_of_the_sink_and_of_the_body_propagate_unchanged(served: Served, proxy: Proxy) -> None:
    """A sink's exception is the very one tail raises (not wrapped in an exception group),
    and the server's call ends with it: no stream of alice's stays open."""

    class SinkFull(Exception):
        pass

    async def sink(data: bytes) -> None:
        raise SinkFull(data[:5])

    with trio.fail_after(BOUND):
        async with alice_via(proxy, served) as jobs:
            job = await jobs.start("sh", SILENT_JOB)
            with pytest.raises(SinkFull) as raised:
                await jobs.tail(job.job_id, sink)
            assert raised.value.args == (b"ready",)
            await settled()
            assert served.service.open_streams("alice") == 0
            assert (await jobs.status(job.job_id)).state == "running"


async def test_leaving_the_block_early_ends_the_call(served: Served, proxy: Proxy) -> None:
    with trio.fail_after(BOUND):
        async with alice_via(proxy, served) as jobs:
            job = await jobs.start("sh", SILENT_JOB)
            async with jobs.follow(job.job_id) as output:
                async for data in output:
                    assert data == b"ready\n"
                    await settled()
                    assert served.service.open_streams("alice") == 1
                    break
            await settled()
            assert served.service.open_streams("alice") == 0
            assert output.offset == 6
            with pytest.raises(RuntimeError, match="has not ended"):
                output.final  # noqa: B018 (the property is what is tested)
            # and without waiting: what exists now, then the status of a job still running
            async with jobs.follow(job.job_id, 2, wait=False) as output:
                assert [data async for data in output] == [b"ady\n"]
            assert output.final.state == "running"


async def test_the_servers_answer_is_raised_by_the_iteration_and_not_retried(served: Served, proxy: Proxy) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    got = bytearray()
    with trio.fail_after(BOUND):
        async with alice_via(proxy, served) as jobs:
            output, error = await follow_until_error(jobs, missing, got.extend)
    assert error.code == StatusCode.NOT_FOUND
    assert not got
    assert output.reconnects == 0
    assert output.last_error is None
    assert proxy.connections == 1


@dataclass
class Consumer:
    """A follow run by another task than the one holding the client."""

    first_byte: trio.Event
    done: trio.Event
    output: JobOutput | None = None
    error: JobsError | None = None
    ended_at: float = math.inf

    @classmethod
    def new(cls) -> Consumer:
        return cls(first_byte=trio.Event(), done=trio.Event())

    async def run(self, jobs: JobsClient, job_id: str) -> None:
        try:
            async with jobs.follow(job_id) as self.output:
                async for _ in self.output:
                    self.first_byte.set()
        except JobsError as exc:
            self.error = exc
        self.ended_at = trio.current_time()
        self.done.set()


@pytest.mark.parametrize("where", ["main connection", "fresh connection", "backoff"])
async def test_closing_the_client_ends_its_follows_promptly(served: Served, proxy: Proxy, where: str) -> None:
    """A follow in another task -- reading on the client's connection, on a connection of
    its own after a reconnect, or waiting 30 s before its next attempt -- ends as soon as
    the client's ``async with`` does, with CANCELLED, and never reconnects after it."""
    consumer = Consumer.new()
    slow = Reconnect(first_delay=30.0, max_delay=30.0)  # a retry would come long after BOUND
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            async with alice_via(proxy, served, slow if where == "backoff" else None) as jobs:
                job = await jobs.start("sh", SILENT_JOB)
                nursery.start_soon(consumer.run, jobs, job.job_id)
                await consumer.first_byte.wait()
                if where != "main connection":
                    if where == "backoff":
                        proxy.stop()
                    proxy.cut()
                    await settled()
                    assert consumer.output is not None
                    assert consumer.output.last_error is not None, "the follow did not see the cut"
                    assert proxy.open == (1 if where == "fresh connection" else 0)
                    assert served.service.open_streams("alice") == 1 - (where == "backoff")
                connections = proxy.connections
                closed_at = trio.current_time()
            with trio.fail_after(1.0):
                await consumer.done.wait()
            await settled()
    assert consumer.error is not None
    assert consumer.error.code == StatusCode.CANCELLED
    assert "the client was closed" in consumer.error.message
    assert consumer.ended_at - closed_at < 1.0
    assert proxy.connections == connections, "reconnected after the client was closed"
    assert proxy.open == 0
    assert served.service.open_streams("alice") == 0


async def test_the_reconnect_window_gives_up_naming_the_last_error(served: Served, proxy: Proxy) -> None:
    window = 0.5
    policy = Reconnect(window=window, first_delay=0.05, max_delay=0.1)
    with trio.fail_after(BOUND):
        async with alice_via(proxy, served) as jobs:
            job = await jobs.start("sh", SILENT_JOB)
            cut_at = math.inf

            def server_gone(data: bytes) -> None:
                nonlocal cut_at
                proxy.stop()  # connecting is refused from now on
                proxy.cut()
                cut_at = trio.current_time()

            output, error = await follow_until_error(jobs, job.job_id, server_gone, reconnect=policy)
            gave_up_after = trio.current_time() - cut_at
    print(f"gave up after {gave_up_after:.2f}s, {output.reconnects} reconnects: {error.message}")
    assert error.code == StatusCode.UNAVAILABLE
    assert error.message.startswith(f"gave up following job {job.job_id} at offset 6: ")
    assert "reconnect window 0.5s" in error.message
    assert isinstance(error.__cause__, JobsError)
    assert error.__cause__ is output.last_error
    last = error.__cause__.message
    # the cause, down to the reason of trio's "all attempts to connect to ... failed"
    assert last.startswith(f"cannot connect to 127.0.0.1:{proxy.port}"), last
    assert last.endswith("(Connection refused)"), last
    assert error.message.endswith(f"the last error: {last}")
    assert window <= gave_up_after < window + 2.0  # the last attempt is at the window's end
    assert output.reconnects >= 3  # 0.05 + 0.1 + 0.1 + ... before 0.5 s
    assert proxy.connections == 1


async def test_window_zero_never_reconnects(served: Served, proxy: Proxy) -> None:
    with trio.fail_after(BOUND):
        async with alice_via(proxy, served, Reconnect(window=0)) as jobs:
            job = await jobs.start("sh", SILENT_JOB)
            output, error = await follow_until_error(jobs, job.job_id, lambda data: proxy.cut())
    assert error.code == StatusCode.UNAVAILABLE
    assert "1 failed attempt(s)" in error.message
    assert output.reconnects == 0
    assert proxy.connections == 1


def test_reconnect_policy_is_validated_and_backs_off() -> None:
    policy = Reconnect(first_delay=0.1, max_delay=1.0, factor=3.0)
    delays = [policy.first_delay]
    for _ in range(3):
        delays.append(policy.next_delay(delays[-1]))
    assert delays == pytest.approx([0.1, 0.3, 0.9, 1.0])
    assert Reconnect(window=math.inf).window == math.inf
    for bad in ({"window": -1.0}, {"window": math.nan}, {"first_delay": 0.0}, {"max_delay": 0.01},
                {"factor": 0.5}, {"max_delay": math.inf}):  # fmt: skip
        with pytest.raises(ValueError, match="Reconnect"):
            Reconnect(**bad)
