"""Sans-IO server side: request validation, responses, ping and reset policies.

Requests that are not valid gRPC are answered here, never reach the application:
wrong ``:method`` -> HTTP 405, wrong ``content-type`` -> HTTP 415, missing ``te: trailers``
-> HTTP 400, unsupported ``grpc-encoding`` -> UNIMPLEMENTED, malformed ``grpc-timeout`` or
metadata -> INTERNAL; streams above our GOAWAY's last stream id -> RST_STREAM(REFUSED_STREAM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import h2.events
from h2.errors import ErrorCodes

from . import _events as ev
from ._headers import (
    MetadataError,
    decode_metadata,
    encode_grpc_message,
    encode_metadata,
    parse_timeout,
)
from ._protocol import GrpcProtocol, StreamGone
from ._status import Metadata, StatusCode

if TYPE_CHECKING:
    from collections.abc import Callable

GRPC_CONTENT_TYPE: Final = b"application/grpc"
_RESPONSE_HEADERS: Final = [(b":status", b"200"), (b"content-type", GRPC_CONTENT_TYPE)]


def is_grpc_content_type(value: bytes | None) -> bool:
    if value is None or not value.startswith(GRPC_CONTENT_TYPE):
        return False
    rest = value[len(GRPC_CONTENT_TYPE) :]
    return rest == b"" or rest[:1] in (b"+", b";")


class _TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; :meth:`take` is False when empty."""

    __slots__ = ("_burst", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._clock = clock
        self._stamp = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        self._tokens -= 1.0
        return self._tokens >= 0


class ServerProtocol(GrpcProtocol):
    client_side = False

    def __init__(
        self,
        *,
        ping_min_interval: float,
        max_ping_strikes: int,
        reset_rate: float,
        reset_burst: int,
        clock: Callable[[], float],
        settings_rate: float = 10.0,
        settings_burst: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(clock=clock, **kwargs)
        self._ping_min_interval = ping_min_interval
        self._max_ping_strikes = max_ping_strikes
        self._ping_strikes = 0
        self._last_ping: float | None = None
        # Token bucket against Rapid Reset (CVE-2023-44487): each stream the peer resets
        # while we still work on it costs a token; tokens refill at reset_rate per second.
        self._resets = _TokenBucket(reset_rate, reset_burst, clock)
        # Against SETTINGS floods: h2 applies and ACKs every SETTINGS frame (no budget in
        # HTTP/2 itself); each costs a token. A client sends one at the start and rarely
        # more (grpc-go's BDP probe: a few per second at most).
        self._settings = _TokenBucket(settings_rate, settings_burst, clock)

    # -- policies ----------------------------------------------------------------------
    def _on_sent_data(self) -> None:
        # Like grpc-go: pings are fine again once we have sent HEADERS or DATA.
        self._ping_strikes = 0
        self._last_ping = None

    def _on_ping(self, out: list[ev.Event]) -> None:
        now = self._clock()
        if self._last_ping is not None and now - self._last_ping < self._ping_min_interval:
            self._ping_strikes += 1
            if self._ping_strikes > self._max_ping_strikes:
                out.append(self.fail(ErrorCodes.ENHANCE_YOUR_CALM, "too_many_pings"))
                return
        self._last_ping = now

    def _on_stream_reset(self, sid: int, code: int, out: list[ev.Event]) -> None:
        if sid in self.streams and not self._resets.take():
            out.append(self.fail(ErrorCodes.ENHANCE_YOUR_CALM, "too_many_resets"))
            return
        super()._on_stream_reset(sid, code, out)

    def _on_settings(self, out: list[ev.Event]) -> bool:
        if self._settings.take():
            return True
        out.append(self.fail(ErrorCodes.ENHANCE_YOUR_CALM, "too_many_settings"))
        return False

    # -- requests ----------------------------------------------------------------------
    def _dispatch_headers(self, e: h2.events.Event, out: list[ev.Event]) -> None:
        if isinstance(e, h2.events.RequestReceived):
            self._on_request(e, out)
        elif isinstance(e, h2.events.TrailersReceived):
            # Request trailers are legal HTTP/2 but gRPC has no use for them; the
            # END_STREAM they carry arrives as StreamEnded.
            pass

    def _on_request(self, e: h2.events.RequestReceived, out: list[ev.Event]) -> None:
        sid = e.stream_id or 0
        ended = e.stream_ended is not None
        if self.goaway_sent is not None and sid > self.goaway_sent:
            self.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        pseudo: dict[bytes, bytes] = {}
        regular: list[tuple[bytes, bytes]] = []
        for k, v in e.headers or ():
            name, value = bytes(k), bytes(v)
            if name.startswith(b":"):
                pseudo[name] = value
            else:
                regular.append((name, value))
        get = dict(regular).get
        if pseudo.get(b":method") != b"POST":
            self._reject(sid, ended, b"405", StatusCode.INTERNAL, "method must be POST")
            return
        if not is_grpc_content_type(get(b"content-type")):
            self._reject(
                sid, ended, b"415", StatusCode.INTERNAL, "content-type must be application/grpc"
            )
            return
        if get(b"te") != b"trailers":
            self._reject(sid, ended, b"400", StatusCode.INTERNAL, "te: trailers is required")
            return
        encoding = get(b"grpc-encoding")
        if encoding not in (None, b"identity"):
            self._reject(
                sid, ended, b"200", StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {encoding!r} is not supported; use identity",
            )  # fmt: skip
            return
        timeout: float | None = None
        raw_timeout = get(b"grpc-timeout")
        try:
            if raw_timeout is not None:
                timeout = parse_timeout(raw_timeout)
            metadata = decode_metadata(regular)
        except (ValueError, MetadataError) as exc:
            self._reject(sid, ended, b"200", StatusCode.INTERNAL, str(exc))
            return
        path = pseudo.get(b":path", b"")
        st = self._open_stream(sid)
        st.remote_ended = ended
        out.append(
            ev.RequestReceived(
                stream_id=sid,
                method=path.decode("utf-8", "replace"),
                metadata=metadata,
                timeout=timeout,
                authority=pseudo.get(b":authority", b"").decode("utf-8", "replace"),
            )
        )
        if ended:
            out.append(ev.StreamEnded(stream_id=sid))

    def _reject(self, sid: int, ended: bool, http: bytes, code: StatusCode, message: str) -> None:
        headers = [
            (b":status", http),
            (b"content-type", GRPC_CONTENT_TYPE),
            (b"grpc-status", b"%d" % code),
            (b"grpc-message", encode_grpc_message(message)),
        ]
        if code == StatusCode.UNIMPLEMENTED:
            headers.append((b"grpc-accept-encoding", b"identity"))
        try:
            self._h2.send_headers(sid, headers, True)
        except Exception:  # the stream may have been closed by a racing frame
            return
        if not ended:
            self.reset_stream(sid, ErrorCodes.NO_ERROR)

    # -- responses ---------------------------------------------------------------------
    def send_response_headers(self, stream_id: int, metadata: Metadata = ()) -> None:
        """Initial response headers; raises StreamGone, MetadataError."""
        st = self.streams.get(stream_id)
        if st is None:
            raise StreamGone(stream_id)
        if st.headers_sent:
            return
        self._send_headers(stream_id, _RESPONSE_HEADERS + encode_metadata(metadata), False)
        st.headers_sent = True

    def send_trailers(
        self, stream_id: int, code: StatusCode, message: str = "", metadata: Metadata = ()
    ) -> None:
        """End the call with a status (Trailers-Only if no headers went out).

        If the client is still sending, RST_STREAM(NO_ERROR) tells it to stop. Raises
        StreamGone; invalid trailing metadata is dropped rather than losing the status.
        """
        st = self.streams.get(stream_id)
        if st is None:
            raise StreamGone(stream_id)
        try:
            md = encode_metadata(metadata)
        except MetadataError:
            md = []
        headers = [] if st.headers_sent else list(_RESPONSE_HEADERS)
        headers.append((b"grpc-status", b"%d" % code))
        if message:
            headers.append((b"grpc-message", encode_grpc_message(message)))
        self._send_headers(stream_id, headers + md, True)
        st.headers_sent = True
        if not st.remote_ended:
            self.reset_stream(stream_id, ErrorCodes.NO_ERROR)

    def is_reset(self, stream_id: int) -> bool:
        """True when nothing can be sent on the stream any more (reset, or unknown)."""
        st = self.streams.get(stream_id)
        return st is None or st.reset
