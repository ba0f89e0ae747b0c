"""The trio-jobs server: worker + gRPC server + policy + signals, assembled.

Ownership (one nursery tree): :func:`serve` owns the signal watcher (outermost, so a signal
during the final cleanup is still ours) and the worker (``open_worker``), which owns the jobs;
inside the worker a nursery owns the gRPC listeners and their connections, and the task that
gives the allocator's free memory back after a peak (``heap.release_free_memory``).

Lifecycle:

- ready: ``task_status.started(ServerInfo)`` once the listeners are bound (port 0 -> the real
  port is in ``ServerInfo.addresses``).
- first SIGINT/SIGTERM (or :meth:`ServerHandle.request_shutdown`): stop accepting and send
  GOAWAY (``Server.shutdown``), while -- at the same time -- every running job is stopped with
  its grace period (``Worker.shutdown``). Both run together because a ``tail -f`` stream only
  ends when its job ends: draining the calls first would wait for the jobs. Records are
  persisted and cgroups removed by the worker; then ``serve`` returns (exit 0).
- a second signal: stop at once -- jobs are SIGKILLed (grace 0); their followers get
  ``FORCED_DRAIN_TIMEOUT`` to receive the end (the drain is never cancelled half-way, which
  would drop them mid-stream and make them retry a server that is going away), then every
  connection is cut. Still a clean exit: records say "killed by shutdown".
- ``shutdown_timeout`` bounds the graceful job stop; past it the second-signal path runs.
  The drain (GOAWAY) is bounded by the same figure.
- SIGHUP (or :meth:`ServerHandle.request_reload`): re-read the policy and certificates named
  in ``reload_from`` and reopen the audit log, all or nothing (trio_jobs/reload.py); jobs
  and open connections are untouched. Requests that arrive during a reload are merged into
  one more reload after it; once shutdown has begun, reloads stop.
- ``notify_systemd``: ``READY=1`` once listening, ``STOPPING=1`` when the shutdown begins,
  ``RELOADING=1``/``READY=1`` around a reload, to ``$NOTIFY_SOCKET`` (trio_jobs/sdnotify.py).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final, final

import trio

from . import sdnotify
from .heap import TRIM_INTERVAL, release_free_memory
from .reload import reload
from .rpc import Server, ServerLimits, health_service
from .security.dynamic_users import FILE_NAME as DYNAMIC_USERS_FILE
from .security.dynamic_users import DynamicUsers
from .security.identity import identity_from_peercert
from .service import DEFAULT_MAX_STREAMS_PER_IDENTITY, JobService, job_service_methods
from .worker import CgroupError, open_worker
from .worker.cgroups.v1 import V1Driver
from .worker.cgroups.v2 import V2Driver
from .worker.retention import DEFAULT_RETENTION, Retention

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import ssl
    from pathlib import Path

    from .audit import AuditLog
    from .reload import ReloadSources
    from .rpc import Server as RpcServer
    from .security.policy import Policy
    from .worker import Worker
    from .worker.cgroups.base import CgroupDriver

__all__ = [
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "FORCED_DRAIN_TIMEOUT",
    "RELOAD_SIGNAL",
    "SHUTDOWN_SIGNALS",
    "ServerConfig",
    "ServerHandle",
    "ServerInfo",
    "serve",
]

SHUTDOWN_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)
RELOAD_SIGNAL: Final = signal.SIGHUP
# The graceful phase: the default job grace period (5 s) plus time to reap and persist.
DEFAULT_SHUTDOWN_TIMEOUT: Final = 15.0
FORCED_DRAIN_TIMEOUT: Final = 2.0


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 4567
    data_dir: Path
    ssl_context: ssl.SSLContext
    policy: Policy
    cgroups: CgroupDriver | None = None  # None: the worker runs jobs without cgroups
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    handle_signals: bool = True
    # Connection-level caps (handshake timeout, max connections, streams per connection...).
    rpc_limits: ServerLimits = field(default_factory=ServerLimits)
    # Concurrent StreamOutput calls per identity, across all its connections.
    max_streams_per_identity: int = DEFAULT_MAX_STREAMS_PER_IDENTITY
    # Seconds between checks whether to give the C allocator's free memory back after a
    # peak (trio_jobs/heap.py); None: never.
    release_memory_interval: float | None = TRIM_INTERVAL
    # The files SIGHUP re-reads (None: a reload only reopens the audit log).
    reload_from: ReloadSources | None = None
    # Tell systemd (Type=notify) about readiness, reloads and stopping via $NOTIFY_SOCKET.
    notify_systemd: bool = False
    # Who did what (trio_jobs/audit.py); made but not opened: serve() opens it first and
    # closes it last, SIGHUP reopens it. None: no audit log.
    audit: AuditLog | None = None
    # Each identity's own Unix user (security/dynamic_users.py); None: read from
    # data_dir/dynamic-users.json.
    dynamic_users: DynamicUsers | None = None
    # How much history of ended jobs (records and output) to keep (DESIGN §7 "Retention").
    retention: Retention = DEFAULT_RETENTION


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    addresses: list[tuple[str, int]]
    cgroup_driver: str
    handle: ServerHandle = field(repr=False)


@final
class ServerHandle:
    """Lets an embedding program (or a test) ask for the same shutdown a signal causes."""

    def __init__(self) -> None:
        self._requests = 0
        self._changed = trio.Event()
        self._reloads = 0
        self._reload_requested = trio.Event()

    def request_shutdown(self) -> None:
        """First call: graceful shutdown. Second call: immediate."""
        self._requests += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_request(self, count: int) -> None:
        """Return once shutdown was requested ``count`` times (1: graceful, 2: immediate)."""
        while self._requests < count:
            await self._changed.wait()

    def request_reload(self) -> None:
        """Do what SIGHUP does: reload the configuration (see trio_jobs/reload.py)."""
        self._reloads += 1
        self._reload_requested.set()
        self._reload_requested = trio.Event()

    async def wait_for_reload_request(self, seen: int) -> int:
        """Return the count of reload requests once it is above ``seen``."""
        while self._reloads <= seen:
            await self._reload_requested.wait()
        return self._reloads


async def serve(config: ServerConfig, *, task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the server until shut down (see the module docstring). Returns normally then."""
    handle = ServerHandle()
    async with trio.open_nursery() as outer:
        # The watcher outlives the worker: a signal while jobs are being stopped must reach
        # us (as "hurry up"), never the default handler.
        if config.handle_signals:
            await outer.start(_watch_signals, handle)
        # The audit log first: a path it cannot use stops the server before any job is touched.
        async with config.audit or contextlib.nullcontext(), open_worker(
            config.data_dir, cgroups=config.cgroups, retention=config.retention
        ) as worker:
            service = JobService(worker, config.policy, max_streams_per_identity=config.max_streams_per_identity,
                                 dynamic_users=config.dynamic_users
                                 or DynamicUsers(config.data_dir / DYNAMIC_USERS_FILE))
            shutting_down = False

            def healthy(_service_name: str) -> bool:
                return not shutting_down

            methods = [
                *job_service_methods(service, audit=config.audit),
                *health_service(healthy),
            ]
            server = Server(
                methods, ssl_context=config.ssl_context, identify=identity_from_peercert, limits=config.rpc_limits
            )
            served = trio.Event()  # serve_tcp returned: every connection has closed

            async def serve_tcp(*, task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
                await server.serve_tcp(config.host, config.port, task_status=task_status)
                served.set()

            async with trio.open_nursery() as nursery:
                addresses = await nursery.start(serve_tcp)
                if config.release_memory_interval is not None:
                    nursery.start_soon(partial(release_free_memory, interval=config.release_memory_interval))
                reloads = trio.CancelScope()
                nursery.start_soon(_reload_on_request, config, handle, service, server, reloads)
                task_status.started(
                    ServerInfo(addresses=list(addresses), cgroup_driver=worker.cgroup_driver_name, handle=handle)
                )
                if config.notify_systemd:
                    sdnotify.ready()
                await handle.wait_for_request(1)
                shutting_down = True
                reloads.cancel()
                if config.notify_systemd:
                    sdnotify.stopping()
                async with trio.open_nursery() as phase:
                    # GOAWAY and drain, never cut short by a second signal: a follower of a
                    # job must get its last bytes and the final status, or it would retry.
                    phase.start_soon(server.shutdown, config.shutdown_timeout)
                    if not await _stop_jobs(worker, handle, config.shutdown_timeout):
                        # The jobs were killed at once: give their followers a moment to
                        # receive the end, then cut every connection.
                        with trio.move_on_after(FORCED_DRAIN_TIMEOUT):
                            await served.wait()
                        phase.cancel_scope.cancel()
                nursery.cancel_scope.cancel()
        await _remove_cgroup_parent(config.cgroups)
        outer.cancel_scope.cancel()


async def _remove_cgroup_parent(driver: CgroupDriver | None) -> None:
    """After a clean shutdown no job is left: remove the parent cgroups the driver made."""
    if isinstance(driver, V1Driver | V2Driver):
        try:
            await driver.remove_parent()
        except CgroupError as exc:
            log.warning("could not remove the jobs' parent cgroup: %s", exc)


async def _stop_jobs(worker: Worker, handle: ServerHandle, limit: float) -> bool:
    """Stop every job with its grace period; on a second request or after ``limit`` seconds,
    kill them at once instead. True if the graceful stop completed."""
    finished = False
    with trio.move_on_after(limit):
        async with trio.open_nursery() as phase:

            async def graceful() -> None:
                nonlocal finished
                await worker.shutdown()
                finished = True
                phase.cancel_scope.cancel()

            async def second_request() -> None:
                await handle.wait_for_request(2)
                phase.cancel_scope.cancel()

            phase.start_soon(graceful)
            phase.start_soon(second_request)
    if not finished:
        await worker.shutdown(0.0)
    return finished


async def _reload_on_request(
    config: ServerConfig, handle: ServerHandle, service: JobService, server: RpcServer, scope: trio.CancelScope
) -> None:
    """Reload once per (merged) request, one at a time, until ``scope`` is cancelled."""
    seen = 0
    with scope:
        while True:
            seen = await handle.wait_for_reload_request(seen)
            if config.notify_systemd:
                sdnotify.reloading()
            await reload(config.reload_from, service=service, server=server, audit=config.audit)
            if config.notify_systemd:
                sdnotify.ready()


async def _watch_signals(handle: ServerHandle, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS, RELOAD_SIGNAL) as signals:
        task_status.started()
        async for signum in signals:
            if signum == RELOAD_SIGNAL:
                handle.request_reload()
            else:
                handle.request_shutdown()
