"""A blocking driver of the sans-IO client protocol: unary calls over one TLS socket.

For short programs that make one or a few unary calls and exit -- the CLI's one-shot
commands (``status``, ``start``, ``stop``, ``list``) -- where an event loop costs more
than the call: importing trio alone takes longer than a whole call on a local server.
It drives the same :class:`ClientProtocol` as the trio :class:`Channel` (headers, framing,
flow control, status and trailers are decided there, once); this module only moves bytes
between it and a blocking ``ssl.SSLSocket``, one call at a time.

Nothing here imports trio. Failures are :class:`RpcError` like the trio client's:
UNAVAILABLE for a connection that cannot be made or is lost, DEADLINE_EXCEEDED when the
call's ``timeout`` passes.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import TYPE_CHECKING, Final, TypeVar, final

from . import _events as ev
from ._client_protocol import ClientProtocol
from ._headers import MetadataError
from ._messages import encode_message
from ._mode import RpcMode, resolve
from ._options import ChannelOptions
from ._protocol import StreamGone
from ._status import Metadata, RpcError, StatusCode, status_from_rst_stream

if TYPE_CHECKING:
    from types import TracebackType

    from google.protobuf.message import Message

R = TypeVar("R", bound="Message")

_READ_SIZE: Final = 256 * 1024


@final
class BlockingChannel:
    """One HTTP/2 connection over a blocking TLS socket. Use :meth:`connect`.

    Not thread-safe; calls run one after the other. Close it (or use ``with``) when done.
    """

    def __init__(
        self,
        sock: ssl.SSLSocket,
        *,
        authority: str,
        options: ChannelOptions,
        mode: RpcMode | None = None,
    ) -> None:
        # The transport choice does not apply (a blocking ssl socket is neither); the fast
        # paths do.
        self.mode = resolve(mode)
        self._sock = sock
        self.authority = authority
        self.options = options
        self._proto = ClientProtocol(
            fast_paths=self.mode.effective_fast_paths,
            max_receive_message=options.max_receive_message,
            max_concurrent_streams=options.max_concurrent_streams,
            max_header_list_size=options.max_header_list_size,
            stream_window=options.stream_window,
            connection_window=options.connection_window,
            max_frame_size=options.max_frame_size,
            clock=time.monotonic,
            frames_per_call=None,
        )
        self._proto.initiate()
        self._lost: RpcError | None = None

    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        options: ChannelOptions | None = None,
        mode: RpcMode | None = None,
    ) -> BlockingChannel:
        """TCP connect, TLS handshake, ALPN ``h2`` check; raises RpcError(UNAVAILABLE)."""
        options = options or ChannelOptions()
        mode = resolve(mode)  # (a bad environment fails before any connection)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # An ASCII name goes as bytes: Python's idna codec would pass it unchanged, and
        # importing it costs a one-shot CLI command ~1 ms (getaddrinfo and ssl both use it).
        name: str | bytes = host.encode("ascii") if host.isascii() else host
        try:
            raw = socket.create_connection(
                (name, port), timeout=options.connect_timeout  # type: ignore[arg-type]  # (bytes: fine)
            )
        except OSError as exc:
            raise RpcError(
                StatusCode.UNAVAILABLE, f"cannot connect to {authority}: {exc}"
            ) from exc
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = ssl_context.wrap_socket(raw, server_hostname=name)
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            raise RpcError(
                StatusCode.UNAVAILABLE, f"TLS handshake with {authority} failed: {exc}"
            ) from exc
        if sock.selected_alpn_protocol() != "h2":
            sock.close()
            raise RpcError(StatusCode.UNAVAILABLE, f"{authority} did not negotiate ALPN h2")
        sock.settimeout(None)
        return cls(sock, authority=authority, options=options, mode=mode)

    def __enter__(self) -> BlockingChannel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def usable(self) -> bool:
        """Whether a new call may start here: not lost, no GOAWAY from the server.

        Reads what the server sent while we were idle (without waiting), since a GOAWAY
        or a close after its idle timeout is only seen by reading.
        """
        if self._lost is None and not self._proto.closed:
            try:
                self._sock.setblocking(False)
                try:
                    data = self._sock.recv(_READ_SIZE)
                finally:
                    self._sock.setblocking(True)
            except (ssl.SSLWantReadError, BlockingIOError):
                data = None  # nothing arrived: the usual case
            except (OSError, ssl.SSLError) as exc:
                self._lost = RpcError(StatusCode.UNAVAILABLE, f"connection lost: {exc}")
            else:
                if not data:
                    self._lost = RpcError(StatusCode.UNAVAILABLE, "the server closed the connection")
                else:
                    self._proto.receive_data(data)
                    while self._proto.input_pending:
                        self._proto.receive_data(b"")
                    try:
                        self._flush()  # SETTINGS and PING acks
                    except OSError as exc:
                        self._lost = RpcError(StatusCode.UNAVAILABLE, f"connection lost: {exc}")
        return self._lost is None and not self._proto.closed and self._proto.goaway_received is None

    def close(self) -> None:
        """Say GOAWAY (best effort) and close the socket."""
        if self._lost is None:
            self._lost = RpcError(StatusCode.UNAVAILABLE, "the channel is closed")
            try:
                self._proto.goaway(0)
                self._flush()
            except (OSError, ssl.SSLError):
                pass
        self._sock.close()

    def unary(
        self,
        method: str,
        request: Message,
        response_type: type[R],
        *,
        timeout: float | None = None,
        metadata: Metadata = (),
    ) -> R:
        """One request, one response. Raises RpcError with the call's status."""
        data = request.SerializeToString()
        if len(data) > self.options.max_send_message:
            raise RpcError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"request of {len(data)} bytes exceeds the limit of {self.options.max_send_message}",
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            payload = self._call(method, encode_message(data), deadline, timeout, metadata)
        except TimeoutError:
            self._lost = RpcError(StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            raise self._lost from None
        except (OSError, ssl.SSLError) as exc:
            self._lost = RpcError(StatusCode.UNAVAILABLE, f"connection to {self.authority} lost: {exc}")
            raise self._lost from exc
        response = response_type()
        try:
            response.ParseFromString(payload)
        except Exception as exc:  # protobuf's DecodeError, without importing it eagerly
            raise RpcError(StatusCode.INTERNAL, f"cannot parse the response: {exc}") from exc
        return response

    def _call(
        self,
        method: str,
        message: bytes,
        deadline: float | None,
        timeout: float | None,
        metadata: Metadata,
    ) -> bytes:
        if self._lost is not None:
            raise RpcError(self._lost.code, self._lost.message)
        proto = self._proto
        try:
            sid = proto.start_request(
                method, authority=self.authority, metadata=metadata, timeout=timeout
            )
        except MetadataError as exc:
            raise RpcError(StatusCode.INTERNAL, str(exc)) from exc
        except StreamGone:
            raise RpcError(StatusCode.UNAVAILABLE, "the connection is closing; reconnect") from None
        try:
            return self._exchange(sid, memoryview(message), deadline)
        finally:
            proto.release(sid)

    def _exchange(self, sid: int, unsent: memoryview, deadline: float | None) -> bytes:
        proto = self._proto
        response: bytes | None = None
        while True:
            if unsent:  # as much as the server's windows allow; the rest after WINDOW_UPDATE
                n = proto.send_data(sid, unsent, end_stream=True)
                unsent = unsent[n:]
            self._flush()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    proto.reset_stream(sid)
                    self._flush()
                    raise TimeoutError
                self._sock.settimeout(left)
            data = self._sock.recv(_READ_SIZE)
            events = proto.receive_data(data) if data else []
            if not data:
                raise RpcError(StatusCode.UNAVAILABLE, f"{self.authority} closed the connection")
            while proto.input_pending:
                events += proto.receive_data(b"")
            for event in events:
                if isinstance(event, ev.MessageReceived) and event.stream_id == sid:
                    proto.acknowledge(sid, event.ack)
                    if response is not None:
                        raise RpcError(StatusCode.INTERNAL, "a unary call got two responses")
                    response = bytes(event.data)
                elif isinstance(event, ev.CallCompleted) and event.stream_id == sid:
                    self._flush()
                    if event.code != StatusCode.OK:
                        raise RpcError(event.code, event.message, event.metadata)
                    if response is None:
                        raise RpcError(StatusCode.INTERNAL, "the server sent no response message")
                    return response
                elif isinstance(event, ev.StreamReset) and event.stream_id == sid:
                    raise RpcError(
                        status_from_rst_stream(event.error_code),
                        f"stream reset by the server (HTTP/2 error {event.error_code})",
                    )
                elif isinstance(event, ev.StreamFailed) and event.stream_id == sid:
                    proto.reset_stream(sid)
                    self._flush()
                    raise RpcError(event.code, event.message)
                elif isinstance(event, ev.GoAwayReceived) and sid > event.last_stream_id:
                    raise RpcError(
                        StatusCode.UNAVAILABLE, "the server is going away; retry on a new connection"
                    )
                elif isinstance(event, ev.ConnectionFailed):
                    self._flush()
                    raise RpcError(StatusCode.UNAVAILABLE, f"connection failed: {event.reason}")

    def _flush(self) -> None:
        data = self._proto.data_to_send()
        if data:
            self._sock.sendall(data)
