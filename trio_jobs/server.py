"""The trio-jobs server: worker + gRPC server + policy + signals, assembled.

Ownership (one nursery tree): :func:`serve` owns the signal watcher (outermost, so a signal
during the final cleanup is still ours) and the worker (``open_worker``), which owns the jobs;
inside the worker a nursery owns the gRPC listeners and their connections, and the task that
gives the allocator's free memory back after a peak (``heap.release_free_memory``).

Lifecycle:

- ready: ``task_status.started(ServerInfo)`` once the listeners are bound (port 0 -> the real
  port is in ``ServerInfo.addresses``).
- embedding: ``ServerConfig.listeners`` serves on the caller's listeners instead of binding
  host:port -- ``trio.open_ssl_over_tcp_listeners`` (TLS by the listeners' ``SSLContext``;
  the config has ``ssl_context=None``) or plain ``trio.open_tcp_listeners`` (TLS by
  ``ssl_context``). ``ServerConfig.extra_methods`` serves the caller's own services beside
  JobService and health, on the same connections: GOAWAY and the drain cover their calls
  exactly as JobService's. trio-jobs never serves plaintext: every listener has TLS.
- cgroups: by default (``DETECT_CGROUPS``) the driver ``trio-jobs serve`` would pick
  (``worker/cgroups/detect.py::detect_server_driver``: v2, else v1, else none with a warning;
  ``require_limits`` refuses instead). ``NO_CGROUPS`` runs jobs without limits, with a
  warning; a ``CgroupDriver`` is used as it is.
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
  one more reload after it; once shutdown has begun, reloads stop. On the caller's TLS
  listeners a reload cannot rotate the certificates (they are the listeners' context,
  the caller's to change); it logs so and reloads the rest.
- ``notify_systemd``: ``READY=1`` once listening, ``STOPPING=1`` when the shutdown begins,
  ``RELOADING=1``/``READY=1`` around a reload, to ``$NOTIFY_SOCKET`` (trio_jobs/sdnotify.py).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import signal
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final, final

import trio

from . import sdnotify
from .heap import TRIM_INTERVAL, release_free_memory
from .reload import reload
from .rpc import RpcMode, Server, ServerLimits, health_service
from .security.dynamic_users import FILE_NAME as DYNAMIC_USERS_FILE
from .security.dynamic_users import DynamicUsers
from .security.identity import identity_from_peercert
from .service import DEFAULT_MAX_STREAMS_PER_IDENTITY, JobService, job_service_methods
from .worker import CgroupError, NoCgroupDriver, open_worker
from .worker.cgroups.detect import NO_LIMITS_WARNING, detect_server_driver
from .worker.cgroups.v1 import V1Driver
from .worker.cgroups.v2 import V2Driver
from .worker.retention import DEFAULT_RETENTION, Retention

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Sequence
    from pathlib import Path

    from .audit import AuditLog
    from .reload import ReloadSources
    from .rpc import Method
    from .rpc import Server as RpcServer
    from .security.policy import Policy
    from .worker import Worker
    from .worker.cgroups.base import CgroupDriver

__all__ = [
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "DETECT_CGROUPS",
    "FORCED_DRAIN_TIMEOUT",
    "NO_CGROUPS",
    "RELOAD_SIGNAL",
    "SHUTDOWN_SIGNALS",
    "CgroupChoice",
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
# Paths of the services serve() itself answers: extra_methods may not take them over.
_OWN_SERVICES: Final = ("/trio_jobs.v1.JobService/", "/grpc.health.v1.Health/")


class CgroupChoice(enum.Enum):
    """``ServerConfig.cgroups`` when it is not a driver."""

    DETECT = "detect"  # the best driver of this host, as `trio-jobs serve` picks it
    NONE = "none"  # no cgroups: jobs run without limits (logged as a warning)


DETECT_CGROUPS: Final = CgroupChoice.DETECT
NO_CGROUPS: Final = CgroupChoice.NONE


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """What :func:`serve` runs. Checked when made: a ``ValueError`` names what is wrong."""

    host: str = "127.0.0.1"  # where serve() listens, unless ``listeners`` is given
    port: int = 4567
    # The caller's own listeners instead of host/port: serve() binds nothing, serves every
    # one of them until shutdown, and closes them when it returns (it takes them over, as
    # trio.serve_listeners does: a config with listeners serves once). Either all of them do
    # the TLS themselves (trio.SSLListener, e.g. trio.open_ssl_over_tcp_listeners with a
    # context from security.tls.server_ssl_context -- ALPN h2 and client certificates
    # required) and ssl_context is None, or none does and ssl_context is the TLS.
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]] | None = None
    data_dir: Path
    # The server's TLS (security.tls.server_ssl_context); None only with TLS listeners.
    ssl_context: ssl.SSLContext | None = None
    policy: Policy
    # The caller's own services (e.g. rpc.service_from_descriptor(...)), served beside
    # JobService and health on the same listeners, with the same limits and shutdown.
    # Their handlers see the caller's identity in ServerContext.peer_identity.
    extra_methods: Sequence[Method] = ()
    # DETECT_CGROUPS: detect (worker/cgroups/detect.py::detect_server_driver) under
    # cgroup_parent (None: default_cgroup_parent(data_dir)), falling back to no limits with
    # a warning, or raising CgroupError with require_limits. NO_CGROUPS: no limits, with a
    # warning. A CgroupDriver: that one. After a clean shutdown a v1/v2 driver's parent
    # cgroups are removed.
    cgroups: CgroupDriver | CgroupChoice = DETECT_CGROUPS
    cgroup_parent: str | None = None  # only with DETECT_CGROUPS (--cgroup-parent)
    require_limits: bool = False  # only with DETECT_CGROUPS (--require-limits)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    handle_signals: bool = True
    # Connection-level caps (handshake timeout, max connections, streams per connection...).
    rpc_limits: ServerLimits = field(default_factory=ServerLimits)
    # The rpc transport and fast paths (rpc.RpcMode); None: the environment's
    # (TRIO_JOBS_RPC_TRANSPORT, TRIO_JOBS_RPC_FAST_PATHS; DESIGN §5).
    rpc_mode: RpcMode | None = None
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

    def __post_init__(self) -> None:
        problem = _tls_problem(self.listeners, self.ssl_context) or _cgroups_problem(self) or _methods_problem(
            self.extra_methods
        )
        if problem is not None:
            raise ValueError(f"ServerConfig: {problem}")


def _tls_problem(listeners: Sequence[trio.abc.Listener[Any]] | None, ctx: ssl.SSLContext | None) -> str | None:
    """Why these listeners and context would not make a TLS server (None: they do)."""
    if listeners is None:
        if ctx is None:
            return ("an ssl_context is needed (security.tls.server_ssl_context), or listeners that do "
                    "their own TLS (trio.open_ssl_over_tcp_listeners): trio-jobs does not serve plaintext")
        return None
    if not listeners:
        return "listeners is empty: nothing to serve on"
    for ln in listeners:
        if ctx is None and not isinstance(ln, trio.SSLListener):
            return (f"listener {ln!r} does not do TLS and there is no ssl_context: pass one, or use "
                    "trio.open_ssl_over_tcp_listeners (trio-jobs does not serve plaintext)")
        if ctx is not None and isinstance(ln, trio.SSLListener):
            return (f"listener {ln!r} does its own TLS: pass ssl_context=None (its SSLContext is the "
                    "server's; a reload cannot rotate it)")
    return None


def _cgroups_problem(config: ServerConfig) -> str | None:
    if config.cgroups is None:  # untyped callers of old
        return "cgroups=None no longer means 'no limits': pass cgroups=NO_CGROUPS for that, or leave the default (detect)"
    if config.cgroups is not DETECT_CGROUPS and (config.cgroup_parent is not None or config.require_limits):
        return "cgroup_parent and require_limits apply to detection (cgroups=DETECT_CGROUPS) only"
    return None


def _methods_problem(methods: Sequence[Method]) -> str | None:
    seen: set[str] = set()
    for m in methods:
        if m.path.startswith(_OWN_SERVICES):
            return f"extra method {m.path}: that service is trio-jobs' own"
        if m.path in seen:
            return f"extra method {m.path} given twice"
        seen.add(m.path)
    return None


@dataclass(frozen=True, kw_only=True)
class ServerInfo:
    # (host, port) of each listener: the bound ones, or the caller's that are TCP sockets
    # (possibly under TLS); other listeners (Unix sockets, memory) are not listed.
    addresses: list[tuple[str, int]]
    cgroup_driver: str  # "v2", "v1" or "none"
    rpc_mode: str  # "transport=lean fast-paths=on": what the rpc server really uses
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
    """Run the server until shut down (see the module docstring). Returns normally then.

    Raises ``CgroupError`` when ``require_limits`` finds no usable cgroups (before anything
    is opened), ``WorkerError`` for an unusable data directory, ``AuditLogError`` for an
    unusable audit log, ``OSError`` when host:port cannot be bound. The caller's
    ``listeners`` are closed when it returns, whatever happened.
    """
    try:
        await _serve(config, task_status)
    finally:
        for listener in config.listeners or ():
            with trio.CancelScope(shield=True):  # closing forcefully does not block
                await trio.aclose_forcefully(listener)


async def _serve(config: ServerConfig, task_status: trio.TaskStatus[ServerInfo]) -> None:
    driver = await _cgroup_driver(config)
    handle = ServerHandle()
    async with trio.open_nursery() as outer:
        # The watcher outlives the worker: a signal while jobs are being stopped must reach
        # us (as "hurry up"), never the default handler.
        if config.handle_signals:
            await outer.start(_watch_signals, handle)
        # The audit log first: a path it cannot use stops the server before any job is touched.
        async with config.audit or contextlib.nullcontext(), open_worker(
            config.data_dir, cgroups=driver, retention=config.retention
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
                *config.extra_methods,
            ]
            server = Server(
                methods,
                ssl_context=config.ssl_context,
                identify=identity_from_peercert,
                limits=config.rpc_limits,
                mode=config.rpc_mode,
            )
            served = trio.Event()  # the listeners are closed and every connection too

            async def serve_tcp(*, task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
                await server.serve_tcp(config.host, config.port, task_status=task_status)
                served.set()

            async def serve_given(
                listeners: Sequence[trio.abc.Listener[trio.abc.Stream]], *, task_status: trio.TaskStatus[None]
            ) -> None:
                await server.serve_listeners(listeners, task_status=task_status)
                served.set()

            async with trio.open_nursery() as nursery:
                if config.listeners is None:
                    addresses = await nursery.start(serve_tcp)
                else:
                    await nursery.start(serve_given, config.listeners)
                    addresses = _bound_addresses(config.listeners)
                if config.release_memory_interval is not None:
                    nursery.start_soon(partial(release_free_memory, interval=config.release_memory_interval))
                reloads = trio.CancelScope()
                nursery.start_soon(_reload_on_request, config, handle, service, server, reloads)
                task_status.started(
                    ServerInfo(
                        addresses=list(addresses),
                        cgroup_driver=worker.cgroup_driver_name,
                        rpc_mode=_mode_used(server.mode, config.listeners),
                        handle=handle,
                    )
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
        await _remove_cgroup_parent(driver)
        outer.cancel_scope.cancel()


async def _cgroup_driver(config: ServerConfig) -> CgroupDriver:
    """``config.cgroups`` made a driver (see ``ServerConfig.cgroups``)."""
    if config.cgroups is NO_CGROUPS:
        log.warning("no cgroups (cgroups=NO_CGROUPS): %s", NO_LIMITS_WARNING)
        return NoCgroupDriver("cgroups=NO_CGROUPS")
    if config.cgroups is DETECT_CGROUPS:
        detect = partial(
            detect_server_driver, config.data_dir, parent=config.cgroup_parent, require=config.require_limits
        )
        return await trio.to_thread.run_sync(detect)  # reads /proc and /sys
    assert not isinstance(config.cgroups, CgroupChoice)
    return config.cgroups


def _bound_addresses(listeners: Sequence[trio.abc.Listener[Any]]) -> list[tuple[str, int]]:
    """(host, port) of each listener that is a TCP socket, under any layers of TLS."""
    addresses: list[tuple[str, int]] = []
    for listener in listeners:
        inner = listener
        while isinstance(inner, trio.SSLListener):
            inner = inner.transport_listener
        if not isinstance(inner, trio.SocketListener):
            continue
        name = inner.socket.getsockname()
        if isinstance(name, tuple) and len(name) >= 2 and isinstance(name[0], str):
            addresses.append((name[0], int(name[1])))
    return addresses


def _mode_used(mode: RpcMode, listeners: Sequence[trio.abc.Listener[Any]] | None) -> str:
    """What the connections really run: the caller's TLS listeners hand over trio.SSLStreams
    (transport=ssl-stream whatever the mode says); else the server's mode."""
    if listeners and all(isinstance(ln, trio.SSLListener) for ln in listeners):
        mode = RpcMode(transport="ssl-stream", fast_paths=mode.fast_paths)
    return mode.describe()


async def _remove_cgroup_parent(driver: CgroupDriver) -> None:
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
