"""The trio gRPC client: ``connect()`` -> :class:`Channel` -> unary / server_stream calls.

A channel owns one connection and a nursery with its reader task. A call is run by the
task that makes it: it sends the request, then reads messages and the status from its
:class:`_CallState`. Cancelling that task (any trio cancel scope) resets the stream with
RST_STREAM(CANCEL), so the server's handler is cancelled too. ``timeout=`` is sent as
``grpc-timeout`` and enforced locally as well (DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Generic, TypeVar, cast

import trio
from google.protobuf.message import DecodeError
from h2.errors import ErrorCodes

from . import _events as ev
from ._client_protocol import ClientProtocol
from ._connection import CallState, Connection
from ._headers import MetadataError
from ._mode import RpcMode, resolve
from ._nursery import background_nursery
from ._options import ChannelOptions
from ._protocol import StreamGone
from ._status import Metadata, RpcError, StatusCode, status_from_rst_stream
from ._transport import Transport, open_transport

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator

    from google.protobuf.message import Message

R = TypeVar("R", bound="Message")


class _CallState(CallState):
    """A call's one record (``_connection.CallState``), with its response metadata and status."""

    __slots__ = ("initial_metadata", "status")

    def __init__(self, stream_id: int, max_message: int) -> None:
        super().__init__(stream_id, max_message)
        self.status: ev.CallCompleted | None = None
        self.initial_metadata: Metadata = ()

    def fail(self, error: RpcError) -> None:
        # A call whose status arrived is over: losing the connection before its caller
        # read that status (the server closes right after it) must not turn it into
        # UNAVAILABLE.
        if self.status is None:
            super().fail(error)
        else:
            self.wake()


class Channel(Connection):
    """One HTTP/2 connection to a gRPC server. Use :func:`connect` or :func:`open_channel`."""

    protocol: ClientProtocol

    def __init__(
        self,
        stream: trio.abc.Stream | Transport,
        *,
        authority: str,
        options: ChannelOptions,
        mode: RpcMode | None = None,
    ) -> None:
        self.mode = resolve(mode)
        protocol = ClientProtocol(
            fast_paths=self.mode.effective_fast_paths,
            max_receive_message=options.max_receive_message,
            max_concurrent_streams=options.max_concurrent_streams,
            max_header_list_size=options.max_header_list_size,
            stream_window=options.stream_window,
            connection_window=options.connection_window,
            max_frame_size=options.max_frame_size,
            clock=trio.current_time,
            new_stream=_CallState,
        )
        wire = stream if isinstance(stream, Transport) else open_transport(stream)
        super().__init__(wire, protocol, options.read_size)
        self.authority = authority
        self.options = options
        # Woken whenever a call ends: callers beyond the server's concurrent-stream limit
        # wait here for a free stream instead of failing.
        self._slot_freed = trio.Event()

    # -- events ----------------------------------------------------------------------
    def handle_event(self, event: object) -> None:
        if isinstance(event, ev.MessageReceived):
            state = self.states.get(event.stream_id)
            if state is not None:
                state.messages.append((event.data, event.ack))
                state.wake()
        elif isinstance(event, ev.CallCompleted):
            state = self.states.get(event.stream_id)
            if isinstance(state, _CallState):
                state.status = event
                state.ended = True
                state.wake()
        elif isinstance(event, ev.ResponseHeadersReceived):
            state = self.states.get(event.stream_id)
            if isinstance(state, _CallState):
                state.initial_metadata = event.metadata
        elif isinstance(event, ev.WindowUpdated):
            self.wake_senders(event.stream_id)
        elif isinstance(event, ev.StreamReset):
            state = self.states.get(event.stream_id)
            if state is not None:
                code = status_from_rst_stream(event.error_code)
                state.fail(
                    RpcError(code, f"stream reset by the server (HTTP/2 error {event.error_code})")
                )
        elif isinstance(event, ev.StreamFailed):
            state = self.states.get(event.stream_id)
            if state is not None:
                self.protocol.reset_stream(event.stream_id, ErrorCodes.CANCEL)
                state.fail(RpcError(event.code, event.message))
        elif isinstance(event, ev.GoAwayReceived):
            err = RpcError(
                StatusCode.UNAVAILABLE, "the server is going away; retry on a new connection"
            )
            for sid, state in self.states.items():
                if sid > event.last_stream_id:
                    state.fail(err)
        elif isinstance(event, ev.ConnectionFailed):
            self.connection_lost(
                RpcError(StatusCode.UNAVAILABLE, f"connection failed: {event.reason}")
            )

    # -- calls -----------------------------------------------------------------------
    async def _open(
        self, method: str, request: Message, grpc_timeout: float | None, metadata: Metadata
    ) -> _CallState:
        if self.lost is not None:
            raise RpcError(self.lost.code, self.lost.message)
        data = request.SerializeToString()
        if len(data) > self.options.max_send_message:
            raise RpcError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"request of {len(data)} bytes exceeds the limit of {self.options.max_send_message}",
            )
        while not self.protocol.stream_slots_free and self.lost is None:
            await self._slot_freed.wait()
        if self.lost is not None:
            raise RpcError(self.lost.code, self.lost.message)
        try:
            sid = self.protocol.start_request(
                method, authority=self.authority, metadata=metadata, timeout=grpc_timeout
            )
        except MetadataError as exc:
            raise RpcError(StatusCode.INTERNAL, str(exc)) from exc
        except StreamGone:
            raise RpcError(StatusCode.UNAVAILABLE, "the connection is closing; reconnect") from None
        state = cast("_CallState", self.protocol.streams[sid])  # made by start_request
        try:
            await self.send_message(state, data, end_stream=True)
        except BaseException:  # cancelled or failed half-way: reset, forget, re-raise
            if self._close_call(state):
                self.kick()
            raise
        return state

    def _close_call(self, state: _CallState) -> bool:
        """Forget the call; reset it if it is not finished. True if a frame is pending."""
        if state.status is None:  # not finished (or failed on our side): stop the server
            self.protocol.reset_stream(state.stream_id, ErrorCodes.CANCEL)
        self.protocol.release(state.stream_id)
        self._slot_freed.set()
        self._slot_freed = trio.Event()
        return self.protocol.has_output()

    async def _next_message(self, state: _CallState) -> bytes | None:
        """The next response message, or None after an OK status; raises RpcError."""
        while True:
            if state.messages:
                # Not a wait, but still a cancellation point: a cancelled consumer stops
                # here even when the reader has queued more messages.
                await trio.lowlevel.checkpoint_if_cancelled()
                data, ack = state.messages.popleft()
                self.protocol.acknowledge(state.stream_id, ack)
                self.kick()  # a WINDOW_UPDATE, if h2 decided one is due
                return data
            if state.error is not None:
                raise state.error
            if state.status is not None:
                st = state.status
                if st.code != StatusCode.OK:
                    raise RpcError(st.code, st.message, st.metadata)
                return None
            await state.wait()

    async def unary(
        self,
        method: str,
        request: Message,
        response_type: type[R],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the API contract; sent as grpc-timeout)
        metadata: Metadata = (),
    ) -> R:
        """One request, one response. Raises RpcError with the call's status."""
        if timeout is None:  # no cancel scope of our own to enter and leave
            return await self._unary(method, request, response_type, None, metadata)
        with trio.move_on_after(timeout) as scope:
            return await self._unary(method, request, response_type, grpc_timeout=timeout, metadata=metadata)
        assert scope.cancelled_caught
        raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    async def _unary(
        self, method: str, request: Message, response_type: type[R], grpc_timeout: float | None,
        metadata: Metadata,
    ) -> R:
        """The call itself; ``grpc_timeout`` is only sent (the caller's scope enforces it)."""
        state = None
        try:
            state = await self._open(method, request, grpc_timeout, metadata)
            data = await self._next_message(state)
            if data is None:
                raise RpcError(StatusCode.INTERNAL, "the server sent no response message")
            if await self._next_message(state) is not None:
                raise RpcError(StatusCode.INTERNAL, "the server sent more than one response")
            return _parse(response_type, data)
        finally:
            if state is not None and self._close_call(state):
                self.kick()

    @asynccontextmanager
    async def server_stream(
        self,
        method: str,
        request: Message,
        response_type: type[R],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (the API contract; sent as grpc-timeout)
        metadata: Metadata = (),
    ) -> AsyncIterator[ResponseStream[R]]:
        """Server-streaming call: ``async for msg in stream``. Leaving early cancels it."""
        deadline = trio.current_time() + timeout if timeout is not None else math.inf
        state = None
        try:
            with trio.move_on_at(deadline) as scope:
                state = await self._open(method, request, timeout, metadata)
            if scope.cancelled_caught:
                raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            assert state is not None
            yield ResponseStream(self, state, response_type, deadline)
        finally:
            if state is not None and self._close_call(state):
                self.kick()

    def connection_lost(self, error: RpcError) -> None:
        super().connection_lost(error)
        self._slot_freed.set()

    async def aclose(self) -> None:
        """Close the connection; calls still running fail with UNAVAILABLE. Idempotent."""
        self.connection_lost(RpcError(StatusCode.UNAVAILABLE, "channel closed"))
        await self.transport.aclose()


class ResponseStream(Generic[R]):
    """The messages of a server-streaming call, then its status (RpcError if not OK)."""

    def __init__(
        self, channel: Channel, state: _CallState, response_type: type[R], deadline: float
    ) -> None:
        self._channel = channel
        self._state = state
        self._type = response_type
        self._deadline = deadline

    @property
    def initial_metadata(self) -> Metadata:
        return self._state.initial_metadata

    @property
    def trailing_metadata(self) -> Metadata:
        status = self._state.status
        return status.metadata if status is not None else ()

    def __aiter__(self) -> ResponseStream[R]:
        return self

    async def __anext__(self) -> R:
        if self._deadline == math.inf:
            data = await self._channel._next_message(self._state)
            if data is None:
                raise StopAsyncIteration
            return _parse(self._type, data)
        with trio.move_on_at(self._deadline):
            data = await self._channel._next_message(self._state)
            if data is None:
                raise StopAsyncIteration
            return _parse(self._type, data)
        self._state.fail(RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))
        raise RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")


def _parse(response_type: type[R], data: bytes) -> R:
    try:
        return response_type.FromString(data)
    except DecodeError as exc:
        raise RpcError(StatusCode.INTERNAL, "could not parse the response message") from exc


@asynccontextmanager
async def open_channel(
    stream: trio.abc.Stream,
    *,
    authority: str = "localhost",
    options: ChannelOptions | None = None,
    mode: RpcMode | None = None,
) -> AsyncIterator[Channel]:
    """A channel over an established stream: a plain one (memory streams in tests), or a
    ``trio.SSLStream`` (its handshake is run here if not yet done; ALPN h2 is required).
    ``mode``'s transport does not apply (the stream is given); its fast paths do. The
    handshake is bounded by ``options.connect_timeout``."""
    opts = options or ChannelOptions()
    wire = open_transport(stream)
    try:
        with trio.move_on_after(opts.connect_timeout) as scope:
            await _secure(wire, "the server")
        if scope.cancelled_caught:
            raise RpcError(StatusCode.UNAVAILABLE, "the TLS handshake timed out")
    except BaseException:
        await wire.aclose()
        raise
    async with _run_channel(wire, authority, opts, mode) as channel:
        yield channel


async def _secure(wire: Transport, peer: str) -> None:
    """The TLS handshake (if the transport has TLS) and ALPN h2; RpcError(UNAVAILABLE)."""
    if not wire.has_tls:
        return
    try:
        await wire.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__ or exc
        raise RpcError(StatusCode.UNAVAILABLE, f"TLS handshake with {peer} failed: {cause}") from exc
    if wire.selected_alpn_protocol() != "h2":
        raise RpcError(StatusCode.UNAVAILABLE, f"{peer} did not negotiate ALPN h2")


@asynccontextmanager
async def _run_channel(
    wire: Transport, authority: str, options: ChannelOptions, mode: RpcMode | None
) -> AsyncIterator[Channel]:
    channel = Channel(wire, authority=authority, options=options, mode=mode)
    try:
        async with background_nursery() as nursery:  # the body's exception comes out as it is
            await nursery.start(channel.writer)
            channel.protocol.initiate()
            await channel.flush()
            nursery.start_soon(channel.reader)
            yield channel
    finally:
        await channel.aclose()


@asynccontextmanager
async def connect(
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    server_hostname: str | None = None,
    options: ChannelOptions | None = None,
    mode: RpcMode | None = None,
) -> AsyncIterator[Channel]:
    """Connect over TCP (+ TLS with ALPN h2 when ``ssl_context`` is given).

    Raises RpcError(UNAVAILABLE) when the server cannot be reached, the TLS handshake
    fails, or the server does not speak h2. ``mode`` (None: the environment's) picks the
    TLS: the lean one of ``_transport.py``, or a ``trio.SSLStream``.
    """
    opts = options or ChannelOptions()
    mode = resolve(mode)
    hostname = server_hostname or host
    wire: Transport | None = None
    try:
        with trio.move_on_after(opts.connect_timeout) as scope:
            try:
                tcp = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                raise RpcError(
                    StatusCode.UNAVAILABLE, f"cannot connect to {host}:{port}: {exc}"
                ) from exc
            wire = open_transport(
                tcp, ssl_context, server_hostname=hostname, lean=mode.transport == "lean"
            )
            await _secure(wire, f"{host}:{port}")
        if scope.cancelled_caught:
            raise RpcError(StatusCode.UNAVAILABLE, f"connecting to {host}:{port} timed out")
    except BaseException:
        if wire is not None:
            await wire.aclose()
        raise
    assert wire is not None
    authority = f"[{hostname}]:{port}" if ":" in hostname else f"{hostname}:{port}"  # (IPv6)
    async with _run_channel(wire, authority, opts, mode) as channel:
        yield channel
