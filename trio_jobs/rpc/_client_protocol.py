"""Sans-IO client side: requests out, responses and final statuses in.

Every call ends with exactly one :class:`CallCompleted` or :class:`StreamReset` (or the
connection fails): from trailers, a Trailers-Only response, a non-200 HTTP status
(http-grpc-status-mapping.md), or a stream that ended without trailers (INTERNAL).
"""

from __future__ import annotations

from typing import Final

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from . import _events as ev
from ._headers import (
    MetadataError,
    decode_grpc_message,
    decode_metadata,
    encode_metadata,
    format_timeout,
)
from ._protocol import GrpcProtocol, StreamGone
from ._server_protocol import is_grpc_content_type
from ._status import Metadata, StatusCode, status_from_http

USER_AGENT: Final = b"trio-jobs-rpc/0.1"


class ClientProtocol(GrpcProtocol):
    client_side = True

    def start_request(
        self,
        method: str,
        *,
        authority: str,
        metadata: Metadata = (),
        timeout: float | None = None,
    ) -> int:
        """Send request headers; return the stream id. Raises MetadataError, StreamGone."""
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            (b":path", method.encode()),
            (b":authority", authority.encode()),
            (b"te", b"trailers"),
            (b"content-type", b"application/grpc"),
            (b"user-agent", USER_AGENT),
        ]
        if timeout is not None:
            headers.append((b"grpc-timeout", format_timeout(timeout)))
        headers += encode_metadata(metadata)
        if self.closed or self.goaway_received is not None:
            raise StreamGone(0)
        try:
            sid = self._h2.next_stream_id()
        except h2.exceptions.NoAvailableStreamIDError as exc:
            raise StreamGone(0) from exc
        self._open_stream(sid)
        try:
            self._send_headers(sid, headers, False)
        except StreamGone:
            self.release(sid)
            raise
        return sid

    @property
    def stream_slots_free(self) -> bool:
        """False while the server's SETTINGS_MAX_CONCURRENT_STREAMS is reached."""
        # Our streams are released after h2 closes them, so this count is never below
        # h2's; and it is O(1) where h2's open_outbound_streams walks every stream.
        return len(self.streams) < self._h2.peer_max_concurrent_streams

    def _dispatch_headers(self, e: h2.events.Event, out: list[ev.Event]) -> None:
        if isinstance(e, h2.events.ResponseReceived):
            self._on_response(e.stream_id or 0, e.headers or [], e.stream_ended is not None, out)
        elif isinstance(e, h2.events.TrailersReceived):
            self._complete_from(e.stream_id or 0, e.headers or [], out)

    def _on_response(
        self, sid: int, headers: list[tuple[bytes, bytes]], ended: bool, out: list[ev.Event]
    ) -> None:
        st = self.streams.get(sid)
        if st is None or st.completed:
            return
        get = dict(headers).get
        status = get(b":status", b"")
        if status != b"200":
            if get(b"grpc-status") is not None and ended:
                self._complete_from(sid, headers, out)
                return
            code = status_from_http(int(status) if status.isdigit() else 0)
            self._complete(sid, out, code, f"HTTP status {status.decode(errors='replace')}", ())
            return
        if ended:  # Trailers-Only
            self._complete_from(sid, headers, out)
            return
        if not is_grpc_content_type(get(b"content-type")):
            ctype = (get(b"content-type") or b"").decode(errors="replace")
            self._complete(sid, out, StatusCode.UNKNOWN, f"unexpected content-type {ctype!r}", ())
            return
        try:
            metadata = decode_metadata(headers)
        except MetadataError as exc:
            self._complete(sid, out, StatusCode.INTERNAL, str(exc), ())
            return
        out.append(ev.ResponseHeadersReceived(stream_id=sid, metadata=metadata))

    def _complete_from(
        self, sid: int, headers: list[tuple[bytes, bytes]], out: list[ev.Event]
    ) -> None:
        st = self.streams.get(sid)
        if st is not None:
            st.remote_ended = True  # trailers (and Trailers-Only) always carry END_STREAM
        get = dict(headers).get
        raw = get(b"grpc-status")
        try:
            metadata = decode_metadata(headers)
        except MetadataError as exc:
            self._complete(sid, out, StatusCode.INTERNAL, str(exc), ())
            return
        if raw is None or not raw.isdigit():
            self._complete(sid, out, StatusCode.UNKNOWN, "response without grpc-status", metadata)
            return
        n = int(raw)
        code = StatusCode(n) if n in StatusCode._value2member_map_ else StatusCode.UNKNOWN
        message = decode_grpc_message(get(b"grpc-message", b""))
        self._complete(sid, out, code, message, metadata)

    def _complete(
        self, sid: int, out: list[ev.Event], code: StatusCode, message: str, md: Metadata
    ) -> None:
        st = self.streams.get(sid)
        if st is None or st.completed:
            return
        st.completed = True
        if not st.remote_ended:
            # The status is final; stop whatever the server would still send.
            self.reset_stream(sid, ErrorCodes.CANCEL)
        out.append(ev.CallCompleted(stream_id=sid, code=code, message=message, metadata=md))

    def _on_stream_ended(self, sid: int, out: list[ev.Event]) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        if st.completed:
            st.remote_ended = True
            return
        super()._on_stream_ended(sid, out)
        self._complete(
            sid, out, StatusCode.INTERNAL, "server closed the stream without sending trailers", ()
        )

    def _on_stream_reset(self, sid: int, code: int, out: list[ev.Event]) -> None:
        st = self.streams.get(sid)
        if st is not None and st.completed:
            st.remote_ended = True
            return
        super()._on_stream_reset(sid, code, out)
