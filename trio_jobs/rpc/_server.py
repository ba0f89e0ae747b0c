"""The trio gRPC server: TLS accept, one task per connection, one task per call.

Ownership: ``serve_tcp`` owns a nursery with the accept loops and every connection
task; a connection task owns a nursery with its reader and its call tasks. Each call has
its own cancel scope: cancelled on RST_STREAM from the client, at its grpc-timeout
deadline, and when the drain deadline of a shutdown passes.

Graceful shutdown (PROTOCOL-HTTP2.md, "GOAWAY"): GOAWAY(2^31-1) and a PING; after the
PING ack (or a bounded wait) GOAWAY(last stream id actually seen); new calls that still
arrive get UNAVAILABLE; in-flight calls run until the drain deadline, then are cancelled
with UNAVAILABLE; then the connection is closed.

One connection alone closes the same way (its own GOAWAY, drain, close) when it has had no
call running for ``idle_timeout`` (grpc's max_connection_idle: two-phase, so a request
racing the first GOAWAY is still served), or when a handler asked for it with
``ServerContext.close_connection`` (one GOAWAY with the real last stream id at once: the
peer is not wanted, so its racing requests are refused).

Admission (``_sources.py``): the accept loop closes a connection at once, before any TLS
work, when the server holds ``max_connections``, or when its source address holds
``max_connections_per_source`` or has ``max_handshakes_per_source`` TLS handshakes in
progress; refusals are logged at most every 10 s (a flood must not flood the log).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any, Final, cast

import trio
from google.protobuf.message import DecodeError

from . import _events as ev
from ._connection import CallState, Connection, log
from ._mode import RpcMode, resolve
from ._options import ServerLimits
from ._protocol import StreamGone
from ._server_protocol import ServerProtocol
from ._service import Method, Serialized, ServerContext
from ._sources import Admission, SourceCaps, ThrottledLog, source_key
from ._status import Metadata, RpcError, StatusCode
from ._transport import Transport, open_transport

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterable, Sequence

_MAX_STREAM_ID: Final = 2**31 - 1
_SHUTDOWN_PING: Final = b"trio-jgo"
_CLEANUP_TIMEOUT: Final = 2.0
YIELD_BYTES: Final = 128 * 1024
"""A streaming handler's ``send`` writes and yields once per this many bytes (see there)."""


def _unparseable(method: Method, exc: Exception) -> str:
    """The message of a request that does not parse as ``method``'s request type.

    Answered INVALID_ARGUMENT, for every method: the client sent a bad request (typically a
    string field that is not UTF-8, which proto3 forbids), and the caller must not take it
    for a server fault it may retry. grpc's statuscodes.md has its libraries answer INTERNAL
    here (grpcio: "Exception deserializing request!"); we do not, knowingly.
    """
    name = method.request_type.DESCRIPTOR.full_name
    if isinstance(exc, UnicodeDecodeError) or "UTF-8" in str(exc):
        why = "a string field is not valid UTF-8; send text as UTF-8 (bytes go in bytes fields)"
    else:
        why = "the bytes are not its protobuf encoding; check the client's .proto"
    return f"the request is not a valid {name}: {why}"


class _Call(CallState):
    """A call's one record (``_connection.CallState``), with the cancel scope its task runs in."""

    __slots__ = ("scope", "why")

    def __init__(self, stream_id: int, max_message: int) -> None:
        super().__init__(stream_id, max_message)
        self.scope = trio.CancelScope()
        self.why: RpcError | None = None  # why the scope was cancelled (None = deadline)

    def cancel(self, why: RpcError) -> None:
        if self.why is None:
            self.why = why
        self.scope.cancel()


class _ServerConnection(Connection):
    protocol: ServerProtocol

    def __init__(
        self,
        server: Server,
        wire: Transport,
        peer_certificate: dict[str, Any] | None,
        peer_identity: str | None,
        peer: str | None,
    ) -> None:
        limits = server.limits
        protocol = ServerProtocol(
            fast_paths=server.mode.effective_fast_paths,
            max_receive_message=limits.max_receive_message,
            max_concurrent_streams=limits.max_concurrent_streams,
            max_header_list_size=limits.max_header_list_size,
            stream_window=limits.stream_window,
            connection_window=limits.connection_window,
            max_frame_size=limits.max_frame_size,
            ping_min_interval=limits.ping_min_interval,
            max_ping_strikes=limits.max_ping_strikes,
            reset_rate=limits.reset_rate,
            reset_burst=limits.reset_burst,
            settings_rate=limits.settings_rate,
            settings_burst=limits.settings_burst,
            clock=trio.current_time,
            new_stream=_Call,
        )
        super().__init__(wire, protocol, limits.read_size)
        self.server = server
        # The calls running on this connection: the protocol's records (all _Call: made by
        # new_stream), the same dictionary as self.states.
        self.calls = cast("dict[int, _Call]", protocol.streams)
        self.peer_certificate = peer_certificate
        self.peer_identity = peer_identity
        self.peer = peer  # "ip:port" of the client (ServerContext.peer)
        self.idle = trio.Event()  # set whenever no call is running
        self.idle.set()
        self.idle_since = trio.current_time()  # when the last call ended (see _idle_watchdog)
        self.ping_acked = trio.Event()
        self.preface_received = trio.Event()
        self.closing = False  # graceful_close has begun (its GOAWAY is out or going out)
        self.close_requested = False  # a handler asked for ServerContext.close_connection
        self.nursery: trio.Nursery | None = None
        self.scope = trio.CancelScope()
        self._idle_watch = trio.CancelScope()  # the idle watchdog's: ends with the reader

    async def run(self) -> None:
        self.protocol.initiate()
        with self.scope:
            try:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    await nursery.start(self.writer)
                    nursery.start_soon(self._preface_watchdog)
                    if self.server.limits.idle_timeout is not None:
                        nursery.start_soon(self._idle_watchdog, self.server.limits.idle_timeout)
                    await self.flush()
                    await self.reader()
                    self.preface_received.set()  # (ends the preface watchdog)
                    self._idle_watch.cancel()
                    # The connection is gone: calls cannot answer any more.
                    for call in self.calls.values():
                        call.cancel(
                            self.lost or RpcError(StatusCode.UNAVAILABLE, "connection lost")
                        )
            except RpcError:
                pass
        self.connection_lost(RpcError(StatusCode.UNAVAILABLE, "connection closed"))

    async def _preface_watchdog(self) -> None:
        """A peer that has not sent its HTTP/2 preface within the handshake timeout goes."""
        with trio.move_on_after(self.server.limits.handshake_timeout):
            await self.preface_received.wait()
            return
        log.info("no HTTP/2 connection preface within the handshake timeout; closing")
        self.scope.cancel()

    async def _idle_watchdog(self, limit: float) -> None:
        """Close the connection gracefully once no call has run on it for ``limit`` seconds.

        Lazy, like grpc-go's keepalive: a call costs nothing here but the time stamp
        ``_finish`` takes when the last call ends; the watchdog wakes at the earliest moment
        the connection could have been idle that long and looks. PINGs and SETTINGS do not
        touch it, so a peer that only pings is idle.
        """
        with self._idle_watch:
            deadline = self.idle_since + limit
            while True:
                await trio.sleep_until(deadline)
                if self.calls:  # busy: idle long enough a full `limit` from now at the soonest
                    deadline = trio.current_time() + limit
                    continue
                deadline = self.idle_since + limit
                if deadline <= trio.current_time():
                    break
            if self.server.shutting_down or self.closing:
                return  # shutdown() or a handler's request closes the connection already
            log.info("closing a connection without a call for %gs (idle timeout)", limit)
            await self.graceful_close(trio.current_time() + self.server.limits.drain_timeout)

    async def _close_for_handler(self) -> None:
        """A handler called ``ServerContext.close_connection``: GOAWAY now, drain, close."""
        deadline = trio.current_time() + self.server.limits.drain_timeout
        await self.graceful_close(deadline, two_phase=False)

    def handle_event(self, event: object) -> None:
        if isinstance(event, ev.MessageReceived):
            state = self.states.get(event.stream_id)
            if state is not None:
                state.messages.append((event.data, event.ack))
                state.wake()
        elif isinstance(event, ev.RequestReceived):
            self._start_call(event)
        elif isinstance(event, ev.StreamEnded):
            state = self.states.get(event.stream_id)
            if state is not None:
                state.ended = True
                state.wake()
        elif isinstance(event, ev.WindowUpdated):
            self.wake_senders(event.stream_id)
        elif isinstance(event, ev.StreamReset):
            call = self.calls.get(event.stream_id)
            if call is not None:
                err = RpcError(StatusCode.CANCELLED, "cancelled by the client")
                call.fail(err)
                call.cancel(err)
        elif isinstance(event, ev.StreamFailed):
            state = self.states.get(event.stream_id)
            if state is not None:
                state.fail(RpcError(event.code, event.message))
        elif isinstance(event, ev.SettingsReceived):
            self.preface_received.set()
        elif isinstance(event, ev.PingAcknowledged):
            if event.data == _SHUTDOWN_PING:
                self.ping_acked.set()
        elif isinstance(event, ev.ConnectionFailed):
            log.info("closing connection: %s (code %d)", event.reason, event.error_code)
        elif isinstance(event, ev.GoAwayReceived):
            pass  # a client going away just stops opening streams

    def _start_call(self, event: ev.RequestReceived) -> None:
        assert self.nursery is not None
        call = self.calls[event.stream_id]  # made by the protocol with the request
        self.idle = trio.Event()
        self.nursery.start_soon(self._run_call, event, call)

    async def _run_call(self, event: ev.RequestReceived, call: _Call) -> None:
        sid = event.stream_id
        code, message = StatusCode.OK, ""
        trailing: Metadata = ()
        ctx: ServerContext | None = None
        try:
            deadline = math.inf
            if event.timeout is not None:
                deadline = trio.current_time() + event.timeout
                call.scope.deadline = deadline
            with call.scope:
                method = self.server.methods.get(event.method)
                if self.server.shutting_down:
                    raise RpcError(StatusCode.UNAVAILABLE, "the server is shutting down; retry")
                if method is None:
                    raise RpcError(StatusCode.UNIMPLEMENTED, f"unknown method {event.method}")
                ctx = ServerContext(
                    method=event.method,
                    peer_identity=self.peer_identity,
                    peer=self.peer,
                    peer_certificate=self.peer_certificate,
                    invocation_metadata=event.metadata,
                    deadline=None if deadline == math.inf else deadline,
                )
                try:
                    request = await self._read_request(call, method)
                except RpcError as exc:
                    if method.refused is not None:
                        method.refused(ctx, exc)
                    raise
                await self._invoke(method, request, ctx, call)
            if call.scope.cancelled_caught:
                why = call.why
                if why is None:
                    code, message = StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
                else:
                    code, message = why.code, why.message
        except RpcError as exc:
            code, message, trailing = exc.code, exc.message, exc.trailing_metadata
        except Exception:
            log.exception("handler for %s failed", event.method)
            code, message = StatusCode.UNKNOWN, "internal error in the handler"
        finally:
            if ctx is not None and not trailing:
                trailing = ctx.trailing_metadata
            await self._finish(sid, call, code, message, trailing)
            if ctx is not None and ctx.close_requested and not self.close_requested:
                assert self.nursery is not None
                self.close_requested = True  # (its GOAWAY follows these trailers)
                self.nursery.start_soon(self._close_for_handler)

    async def _read_request(self, state: CallState, method: Method) -> Any:
        """Wait for exactly one request message and the end of the request stream."""
        while not (state.ended and state.messages) and state.error is None:
            if state.ended and not state.messages:
                raise RpcError(StatusCode.INTERNAL, "request stream ended without a message")
            if len(state.messages) > 1:
                raise RpcError(StatusCode.UNIMPLEMENTED, "client streaming is not supported")
            await state.wait()
        if state.error is not None:
            raise state.error
        if len(state.messages) > 1:
            raise RpcError(StatusCode.UNIMPLEMENTED, "client streaming is not supported")
        data, ack = state.messages.popleft()
        self.protocol.acknowledge(state.stream_id, ack)
        try:
            return method.request_type.FromString(data)
        except (DecodeError, UnicodeDecodeError) as exc:  # (the latter: pure-Python protobuf)
            raise RpcError(StatusCode.INVALID_ARGUMENT, _unparseable(method, exc)) from exc

    async def _invoke(
        self, method: Method, request: Any, ctx: ServerContext, state: CallState
    ) -> None:
        max_send = self.server.limits.max_send_message
        unyielded = 0  # bytes a streaming handler sent since its last schedule point

        async def send(response: Any, *, kick: bool = True) -> None:
            nonlocal unyielded
            data: bytes | tuple[bytes, ...]
            if type(response) is Serialized:
                data, size = response.data, response.size
            elif isinstance(response, method.response_type):
                data = response.SerializeToString()
                size = len(data)
            else:
                raise TypeError(f"{method.path} must send {method.response_type.__name__}")
            if size > max_send:
                raise RpcError(
                    StatusCode.RESOURCE_EXHAUSTED,
                    f"response of {size} bytes exceeds the limit of {max_send}",
                )
            self._send_headers(state)
            await self.send_message(state, data, kick=False)
            if not kick:
                return
            # A streaming handler. Messages are written to the socket (and everyone else
            # gets the loop) in batches of YIELD_BYTES: one TLS write and one round per
            # batch instead of per message. In between, the writer is told there is
            # something to send, so a handler that now waits for its next message (a
            # live follower) has its last one written at the next scheduler round.
            unyielded += size
            if unyielded >= YIELD_BYTES:
                unyielded = 0
                self.kick()
                await trio.lowlevel.checkpoint()
            else:
                self.want_write()
                await trio.lowlevel.checkpoint_if_cancelled()

        if method.server_streaming:
            await method.handler(request, ctx, send)  # type: ignore[call-arg]
        else:
            # headers, message and trailers (from _finish) go out in one write
            await send(await method.handler(request, ctx), kick=False)  # type: ignore[call-arg]

    def _send_headers(self, state: CallState) -> None:
        if state.error is not None:
            raise state.error
        try:
            self.protocol.send_response_headers(state.stream_id)
        except StreamGone:
            raise state.error or RpcError(StatusCode.CANCELLED, "stream closed") from None

    async def _finish(
        self, sid: int, call: _Call, code: StatusCode, message: str, trailing: Any
    ) -> None:
        """Send the status (unless the client reset), release the stream, bounded."""
        try:
            if not self.protocol.is_reset(sid) and self.lost is None:
                with contextlib.suppress(StreamGone):
                    self.protocol.send_trailers(sid, code, message, trailing)
        finally:
            self.protocol.release(sid)  # (the call's record goes here, and only here)
            self.kick()
            if not self.calls:
                self.idle.set()
                self.idle_since = trio.current_time()

    async def graceful_close(self, drain_deadline: float, *, two_phase: bool = True) -> None:
        """GOAWAY, drain until ``drain_deadline``, cancel the rest, close.

        ``two_phase``: GOAWAY(2^31-1) and a PING first, the real last stream id after the
        ack, so requests already on their way are served; else the real one at once.
        Several callers may overlap (an idle timeout and a shutdown): the first sends the
        GOAWAY, each closes the connection at its own deadline at the latest.
        Bounded even if the peer stopped reading: every wait is under the drain deadline
        or a cleanup timeout, and closing the stream ends a write blocked on the peer.
        """
        limits = self.server.limits
        first = not self.closing
        self.closing = True
        with trio.move_on_at(drain_deadline):
            try:
                if first:
                    if two_phase:
                        self.protocol.goaway(_MAX_STREAM_ID)
                        self.protocol.ping(_SHUTDOWN_PING)
                        await self.flush()
                        with trio.move_on_after(limits.shutdown_ping_timeout):
                            await self.ping_acked.wait()
                    # (never a higher last stream id than an earlier GOAWAY: only the first
                    # caller sends any)
                    self.protocol.goaway(self.protocol.highest_inbound_stream_id)
                    await self.flush()
            except RpcError:
                pass
            await self.idle.wait()
        err = RpcError(StatusCode.UNAVAILABLE, "the server is shutting down; retry")
        for call in list(self.calls.values()):
            call.cancel(err)
        with trio.move_on_after(_CLEANUP_TIMEOUT):
            await self.idle.wait()
        await self.flush_quietly(_CLEANUP_TIMEOUT)  # the last calls' trailers
        self.scope.cancel()
        await self.transport.aclose()


class Server:
    """A gRPC server for the given methods (see docs/architecture.md, rpc/)."""

    def __init__(
        self,
        methods: Iterable[Method],
        *,
        ssl_context: ssl.SSLContext | None,
        identify: Callable[[dict[str, Any]], str | None] | None = None,
        limits: ServerLimits | None = None,
        mode: RpcMode | None = None,
    ) -> None:
        self.methods: dict[str, Method] = {}
        for m in methods:
            if m.path in self.methods:
                raise ValueError(f"method {m.path} registered twice")
            self.methods[m.path] = m
        self.ssl_context = ssl_context
        self.identify = identify
        self.limits = limits or ServerLimits()
        self.mode = resolve(mode)  # None: the environment's (TRIO_JOBS_RPC_TRANSPORT, ..._FAST_PATHS)
        self.shutting_down = False
        self._connections: set[_ServerConnection] = set()
        self._accept_scope = trio.CancelScope()
        self._handshakes: set[trio.CancelScope] = set()
        self._shutdown_done = trio.Event()
        self._active = 0
        self._sources = SourceCaps(
            max_connections=self.limits.max_connections_per_source,
            max_handshakes=self.limits.max_handshakes_per_source,
        )
        self._global_refusals = ThrottledLog()
        self._source_refusals = ThrottledLog()

    def set_ssl_context(self, ssl_context: ssl.SSLContext) -> None:
        """Use ``ssl_context`` for the handshakes of connections accepted from now on (e.g.
        rotated certificates). Each connection wraps the context it was accepted with once
        (``_transport.py``), so connections already open keep their TLS session untouched."""
        if self.ssl_context is None:
            raise ValueError("this server was created without TLS; it cannot switch to TLS")
        self.ssl_context = ssl_context

    async def serve_tcp(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on host:port; ``started`` gets the bound addresses; returns after shutdown()."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = [tuple(ln.socket.getsockname()[:2]) for ln in listeners]
        await self._serve(listeners, [(str(h), int(p)) for h, p in bound], task_status)

    async def serve_listeners(
        self,
        listeners: Sequence[trio.abc.Listener[Any]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve connections from the caller's listeners until shutdown(); then close them.

        Any trio listener: ``trio.open_tcp_listeners`` (TLS by this server's
        ``ssl_context``), ``trio.open_ssl_over_tcp_listeners`` (TLS by the listener's
        ``trio.SSLStream``: create the server with ``ssl_context=None``; the handshake runs
        under ``handshake_timeout``, ALPN h2 is required and the peer certificate reaches
        ``identify`` exactly as with the built-in TLS), or memory listeners in tests.
        Takes the listeners over: they are closed when this returns.
        """
        await self._serve(list(listeners), None, task_status)

    async def _serve(self, listeners: Sequence[trio.abc.Listener[Any]], started: Any,
                     task_status: trio.TaskStatus[Any]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                with self._accept_scope:
                    if self.shutting_down:
                        self._accept_scope.cancel()
                    async with trio.open_nursery() as accepters:
                        for ln in listeners:
                            accepters.start_soon(self._accept_loop, ln, nursery)
                        task_status.started(started)
                # Accepting stopped (shutdown); connections drain inside ``nursery``.
        finally:
            for ln in listeners:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(ln)

    async def _accept_loop(self, listener: trio.abc.Listener[Any], nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except trio.ClosedResourceError:
                return  # the caller closed this listener: the others go on
            except OSError as exc:  # EMFILE and friends: log and keep serving
                log.warning("accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            # Refused here, before a task or any TLS work: a flood costs accept + close.
            peer = _peer(stream)
            admitted = self._admit(peer)
            if isinstance(admitted, str):
                await trio.aclose_forcefully(stream)
                continue
            # Counted here, not in the connection task: that task only starts running
            # later, and connections accepted meanwhile would slip past the caps.
            self._active += 1
            nursery.start_soon(self._serve_counted, stream, peer, admitted)

    def _admit(self, peer: tuple[str, int] | None) -> Admission | str | None:
        """The connection's share of its source's counts (None: no IP source), or why it
        is refused (logged here, throttled)."""
        limits = self.limits
        if self._active >= limits.max_connections:
            why = f"connection limit {limits.max_connections} reached"
            throttle = self._global_refusals
        else:
            if peer is None:
                return None
            verdict = self._sources.admit(source_key(peer[0]))
            if isinstance(verdict, Admission):
                return verdict
            why, throttle = verdict, self._source_refusals
        suppressed = throttle.due(trio.current_time())
        if suppressed is not None:
            more = f" ({suppressed} more refused since the last report)" if suppressed else ""
            log.warning("%s; closing a new connection%s", why, more)
        return why

    async def _serve_counted(self, stream: trio.abc.Stream, peer: tuple[str, int] | None,
                             admission: Admission | None) -> None:
        try:
            await self._serve_connection(stream, peer, admission)
        finally:
            self._active -= 1
            if admission is not None:
                admission.release()

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one connection (TLS handshake first when the server has an ssl_context).

        Returns when the connection is closed; never raises for a peer's misbehaviour.
        Counts towards ``max_connections`` and its source's caps while it runs (refused
        by the accept loop; the caller of this method decided to serve it).
        """
        peer = _peer(stream)
        self._active += 1
        admission = None if peer is None else self._sources.add(source_key(peer[0]))
        await self._serve_counted(stream, peer, admission)

    async def _serve_connection(self, stream: trio.abc.Stream, peer: tuple[str, int] | None,
                                admission: Admission | None) -> None:
        if self.shutting_down:
            await trio.aclose_forcefully(stream)
            return
        wire = self._transport_for(stream)
        try:
            try:
                if not await self._handshake(wire):
                    return
            finally:
                if admission is not None:
                    admission.handshake_done()
            cert = wire.getpeercert()
            identity: str | None = None
            if self.identify is not None and cert:
                try:
                    identity = self.identify(cert)
                except Exception:
                    log.exception("identify() failed; the peer has no identity")
            conn = _ServerConnection(self, wire, cert, identity, _shown(peer))
            self._connections.add(conn)
            try:
                await conn.run()
            except Exception:  # a bug must not take the other connections down with it
                log.exception("connection task failed")
            finally:
                self._connections.discard(conn)
        finally:
            await wire.aclose()  # bounded, and closes even when cancelled

    def _transport_for(self, stream: trio.abc.Stream) -> Transport:
        """The connection's transport (``_transport.open_transport``): a trio.SSLStream (the
        caller's listener) does its own TLS; a socket gets the lean TLS, or a
        trio.SSLStream with ``transport=ssl-stream``."""
        ctx = None if isinstance(stream, trio.SSLStream) else self.ssl_context
        return open_transport(stream, ctx, server_side=True, lean=self.mode.transport == "lean")

    async def _handshake(self, wire: Transport) -> bool:
        """TLS (if the connection has it) under the handshake timeout, ALPN h2; True if
        the connection may go on."""
        if not wire.has_tls:
            return True
        # Cancelled by shutdown() too: a half-open connection must not delay it.
        with trio.move_on_after(self.limits.handshake_timeout) as hs:
            self._handshakes.add(hs)
            try:
                await wire.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.info("TLS handshake failed: %s", exc.__cause__ or exc)
                return False
            finally:
                self._handshakes.discard(hs)
        if hs.cancelled_caught or self.shutting_down:
            log.info("TLS handshake timed out (or the server is shutting down)")
            return False
        if wire.selected_alpn_protocol() != "h2":
            log.info("client did not negotiate ALPN h2; closing")
            return False
        return True

    async def shutdown(self, drain_timeout: float | None = None) -> None:
        """Stop accepting, drain every connection within ``drain_timeout``, close them.

        Idempotent: a second call waits for the first to finish.
        """
        if self.shutting_down:
            await self._shutdown_done.wait()
            return
        self.shutting_down = True
        self._accept_scope.cancel()
        for handshake in list(self._handshakes):
            handshake.cancel()
        timeout = self.limits.drain_timeout if drain_timeout is None else drain_timeout
        deadline = trio.current_time() + timeout
        try:
            async with trio.open_nursery() as nursery:
                for conn in list(self._connections):
                    nursery.start_soon(conn.graceful_close, deadline)
        finally:
            self._shutdown_done.set()


def _peer(stream: trio.abc.Stream) -> tuple[str, int] | None:
    """The remote (ip, port) of ``stream`` (a socket, or TLS over one), read once per
    connection before a transport takes the socket over: it gives the source a connection is
    counted under (``_sources.source_key``) and the handlers' ``peer``. None for any other
    stream, or a peer already gone (the connection then fails at its first read)."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return None
    try:
        addr = stream.socket.getpeername()
    except OSError:
        return None
    if not (isinstance(addr, tuple) and len(addr) >= 2 and isinstance(addr[0], str)):
        return None
    return addr[0], addr[1]


def _shown(peer: tuple[str, int] | None) -> str | None:
    """``ip:port``, IPv6 in brackets (``[::1]:port``), for ``ServerContext.peer``."""
    if peer is None:
        return None
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
