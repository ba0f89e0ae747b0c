"""Sans-IO core shared by the gRPC server and client protocols.

Theory of operation
-------------------
:class:`GrpcProtocol` is gRPC on one HTTP/2 session of the h2 seam (``_h2/``: the only
code that touches h2; pure h2 or its fast paths, chosen by ``fast_paths``).
``receive_data(bytes)`` returns our own events (``_events.py``); every method that produces
frames leaves them queued, handed over as pieces by ``take_output()``. No I/O, no clock
reads except through the injected ``clock``.

Flow control (receive side): the credit of a DATA frame (its flow-controlled length) is
returned to the peer

* when the application consumed the message the frame completed: every
  ``MessageReceived`` must be passed back through :meth:`acknowledge` (its ``ack`` is
  the credit attributed to it, possibly 0);
* for a frame that completes no message: at once while the application has no
  unconsumed message on the stream (the bytes sit in the stream's
  :class:`MessageDecoder`, bounded by the max message size, and holding them back would
  deadlock a message larger than the window); otherwise they are held too, and returned
  when the application has caught up.

So the decoded-but-unconsumed data of a stream is at most one stream window plus one
message: that is the backpressure policy. Credit still held is returned at
:meth:`release`, and data on discarded, refused or unknown streams is credited at once,
so the connection window never leaks (grpclib#67).

Send side: :meth:`send_data` writes only what the peer's windows allow and returns the
count; the I/O layer waits for :class:`WindowUpdated` before sending the rest, so nothing
is buffered beyond what the peer granted.

GOAWAY: the session keeps the connection open after a GOAWAY either way (h2 alone would
refuse everything after one); the protocol tracks GOAWAY state itself.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ClassVar, Final

import h2.events
import h2.exceptions
from h2.errors import ErrorCodes

from . import _events as ev
from ._h2 import Data, Failed, open_session
from ._messages import FramingError, MessageDecoder
from ._mode import RpcMode
from ._status import StatusCode

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from ._h2 import Event, Piece

DEFAULT_FRAMES_PER_CALL: Final = 32
_HEADER_EVENTS: Final = (
    h2.events.RequestReceived,
    h2.events.ResponseReceived,
    h2.events.InformationalResponseReceived,
    h2.events.TrailersReceived,
    h2.events.PushedStreamReceived,
)


class StreamGone(Exception):
    """Internal: the stream can no longer be written (reset or closed)."""


class Stream:
    """A call's record: the one object a stream has, from its start (a request received,
    a request sent) to :meth:`GrpcProtocol.release`. This part is the protocol's (framing
    and flow-control state); the I/O layer's subclass (``_connection.CallState`` and its
    server and client kinds, made by ``new_stream``) adds what its tasks wait on."""

    __slots__ = (
        "completed",
        "decoder",
        "discarding",
        "headers_sent",
        "partial",
        "queued",
        "remote_ended",
        "reset",
        "stream_id",
        "unacked",
    )

    def __init__(self, stream_id: int, max_message: int) -> None:
        self.stream_id = stream_id
        self.decoder = MessageDecoder(max_message)
        self.unacked = 0  # flow-control credit held back (messages + partial), not yet returned
        self.queued = 0  # messages handed to the app and not acknowledged yet
        self.partial = 0  # held credit of the message in progress
        self.discarding = False  # drop (and credit back) any further DATA
        self.reset = False  # RST_STREAM sent or received: nothing more can be sent
        self.headers_sent = False
        self.remote_ended = False
        self.completed = False  # client: the call's status is known


class GrpcProtocol:
    """Base of :class:`ServerProtocol` and :class:`ClientProtocol`."""

    client_side: ClassVar[bool]

    def __init__(
        self,
        *,
        max_receive_message: int,
        max_concurrent_streams: int,
        max_header_list_size: int,
        stream_window: int,
        connection_window: int,
        max_frame_size: int,
        clock: Callable[[], float],
        frames_per_call: int | None = DEFAULT_FRAMES_PER_CALL,
        fast_paths: bool | None = None,
        new_stream: Callable[[int, int], Stream] = Stream,
    ) -> None:
        self.max_receive_message = max_receive_message
        # At most this many frames are processed per receive_data() call (h2 takes ~75 us
        # per HEADERS): the I/O layer yields between calls, so one connection's flood
        # cannot hold the event loop for long. None: no limit.
        self._clock = clock
        if fast_paths is None:  # the environment's choice (TRIO_JOBS_RPC_FAST_PATHS)
            fast_paths = RpcMode.from_environ().fast_paths
        self._h2 = open_session(
            fast_paths=fast_paths,
            client_side=self.client_side,
            max_concurrent_streams=max_concurrent_streams,
            max_header_list_size=max_header_list_size,
            stream_window=stream_window,
            connection_window=connection_window,
            max_frame_size=max_frame_size,
            frames_per_call=frames_per_call,
        )
        # The session's output calls, bound once (the I/O layer calls them per frame batch):
        # take_output() -> the frames queued so far as pieces (the queue empties),
        # has_output(), pending_bytes().
        self.take_output: Callable[[], list[Piece]] = self._h2.take_output
        self.has_output: Callable[[], bool] = self._h2.has_output
        self.pending_bytes: Callable[[], int] = self._h2.pending_bytes
        # Every stream's record, created by _open_stream and removed by release() only.
        self.streams: dict[int, Stream] = {}
        self._new_stream = new_stream
        self.closed = False  # a fatal error happened; only take_output() is useful now
        self.goaway_received: int | None = None  # peer's last_stream_id
        self.goaway_sent: int | None = None  # our last announced last_stream_id

    @property
    def frames_per_call(self) -> int | None:
        return self._h2.frames_per_call

    @frames_per_call.setter
    def frames_per_call(self, value: int | None) -> None:
        self._h2.frames_per_call = value

    @property
    def fast_paths(self) -> bool:
        """Whether the session uses h2's internals (asked for, and the guard passed)."""
        return self._h2.fast

    def _open_stream(self, stream_id: int) -> Stream:
        """Create the stream's record (the only place one is made)."""
        st = self.streams[stream_id] = self._new_stream(stream_id, self.max_receive_message)
        return st

    # -- setup and output ------------------------------------------------------------
    def initiate(self) -> None:
        """Queue the preface/SETTINGS and open the connection receive window."""
        self._h2.initiate()


    def data_to_send(self) -> bytes:
        """The frames queued so far, joined (tests, simple drivers)."""
        return b"".join(self._h2.take_output())


    # -- input -------------------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ev.Event]:
        """Feed bytes from the peer (copied). Never raises: failures become ConnectionFailed.

        Processes at most ``frames_per_call`` frames; see :attr:`input_pending`.
        """
        if self.closed:
            return []
        return self._dispatch_all(self._h2.receive_data(data))

    def receive_buffer(self, n: int) -> memoryview:
        """A writable view for up to ``n`` bytes from the peer, to fill in place (TLS
        decrypts into it) and pass to :meth:`received`; release it before that."""
        return self._h2.receive_buffer(n)

    def received(self, n: int) -> list[ev.Event]:
        """``n`` bytes were written into the last :meth:`receive_buffer`: like
        :meth:`receive_data` for them, without the copy."""
        if self.closed:
            return []
        return self._dispatch_all(self._h2.received(n))

    @property
    def input_pending(self) -> bool:
        """True when the last ``receive_data`` stopped at its frame budget: call
        ``receive_data(b"")`` (after letting others run) to process the rest."""
        return self._h2.input_pending and not self.closed

    def _dispatch_all(self, events: list[Event]) -> list[ev.Event]:
        """Turn the session's events into ours; a policy that closes the connection (GOAWAY
        queued) makes the rest moot, and a ProtocolError while checking one closes it too."""
        out: list[ev.Event] = []
        try:
            for e in events:
                if self.closed:
                    break
                if type(e) is Data:
                    self._on_data_payload(e.stream_id, e.data, e.flow_controlled_length, out)
                elif type(e) is Failed:
                    out.append(self._fail(e.error_code, e.reason, not e.goaway_queued))
                else:
                    self._dispatch(e, out)  # type: ignore[arg-type]
        except h2.exceptions.ProtocolError as exc:
            out.append(self._fail(int(exc.error_code), str(exc), True))
        return out

    def _fail(self, code: int, reason: str, send_goaway: bool) -> ev.ConnectionFailed:
        self.closed = True
        if send_goaway:
            self._goaway_raw(code, reason.encode()[:128])
        return ev.ConnectionFailed(error_code=code, reason=reason)

    def fail(self, code: int, reason: str) -> ev.ConnectionFailed:
        """Close the connection for a policy violation: queue GOAWAY(code, reason)."""
        return self._fail(code, reason, True)

    def _dispatch(self, e: h2.events.Event, out: list[ev.Event]) -> None:
        if isinstance(e, h2.events.DataReceived):
            self._on_data_payload(e.stream_id or 0, e.data or b"", e.flow_controlled_length or 0, out)
        elif isinstance(e, h2.events.WindowUpdated):
            out.append(ev.WindowUpdated(stream_id=e.stream_id or 0))
        elif isinstance(e, h2.events.StreamEnded):
            self._on_stream_ended(e.stream_id or 0, out)
        elif isinstance(e, h2.events.StreamReset):
            self._on_stream_reset(e.stream_id or 0, int(e.error_code or 0), out)
        elif isinstance(e, h2.events.PingReceived):
            self._on_ping(out)
        elif isinstance(e, h2.events.PingAckReceived):
            out.append(ev.PingAcknowledged(data=bytes(e.ping_data or b"")))
        elif isinstance(e, h2.events.RemoteSettingsChanged):
            if not self._on_settings(out):
                return
            out.append(ev.SettingsReceived())
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in e.changed_settings:
                out.append(ev.WindowUpdated(stream_id=0))
        elif isinstance(e, h2.events.ConnectionTerminated):
            last = e.last_stream_id if e.last_stream_id is not None else 0
            self.goaway_received = last
            out.append(
                ev.GoAwayReceived(
                    last_stream_id=last,
                    error_code=int(e.error_code or 0),
                    debug=bytes(e.additional_data or b""),
                )
            )
        else:
            if isinstance(e, _HEADER_EVENTS):
                self._h2.check_headers(e)  # raises h2's ProtocolError
            self._dispatch_headers(e, out)

    def _dispatch_headers(self, e: h2.events.Event, out: list[ev.Event]) -> None:
        raise NotImplementedError

    def _on_ping(self, out: list[ev.Event]) -> None:
        """h2 answers pings itself; the server adds its ping policy here."""

    def _on_settings(self, out: list[ev.Event]) -> bool:
        """h2 applies and ACKs SETTINGS itself; False if a policy closed the connection."""
        return True

    def _on_data_payload(
        self, sid: int, data: bytes | memoryview, flow: int, out: list[ev.Event]
    ) -> None:
        """Decode a DATA frame's payload (``flow``: its flow-controlled length). The
        decoder copies what it keeps: ``data`` may be a view of the receive buffer."""
        st = self.streams.get(sid)
        if st is None or st.discarding:
            self._ack(sid, flow)
            return
        try:
            messages = st.decoder.feed(data)
        except FramingError as exc:
            st.discarding = True
            self._ack(sid, flow)
            code = StatusCode.RESOURCE_EXHAUSTED if exc.too_large else StatusCode.INTERNAL
            out.append(ev.StreamFailed(stream_id=sid, code=code, message=str(exc)))
            return
        if not messages:
            if st.queued:
                st.partial += flow
                st.unacked += flow
            else:
                self._ack(sid, flow)
            return
        credit = st.partial + flow
        st.unacked += flow
        st.partial = 0
        st.queued += len(messages)
        last = len(messages) - 1
        for i, m in enumerate(messages):
            out.append(ev.MessageReceived(stream_id=sid, data=m, ack=credit if i == last else 0))

    def _on_stream_ended(self, sid: int, out: list[ev.Event]) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        st.remote_ended = True
        if not st.discarding and not st.decoder.at_boundary():
            st.discarding = True
            out.append(
                ev.StreamFailed(
                    stream_id=sid,
                    code=StatusCode.INTERNAL,
                    message="stream ended in the middle of a message",
                )
            )
        out.append(ev.StreamEnded(stream_id=sid))

    def _on_stream_reset(self, sid: int, code: int, out: list[ev.Event]) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        st.remote_ended = True
        st.discarding = st.reset = True
        out.append(ev.StreamReset(stream_id=sid, error_code=code))

    # -- flow control ----------------------------------------------------------------
    def _ack(self, sid: int, n: int) -> None:
        if n > 0:
            self._h2.acknowledge(sid, n)

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The application consumed a message whose ``ack`` was ``n`` (call it for each)."""
        st = self.streams.get(stream_id)
        if st is None or self.closed:
            return
        st.queued = max(st.queued - 1, 0)
        if st.queued == 0:  # caught up: the message in progress need not wait any more
            n += st.partial
            st.partial = 0
        n = min(n, st.unacked)
        st.unacked -= n
        self._ack(stream_id, n)

    def release(self, stream_id: int) -> None:
        """The application is done with the stream: return its credit, forget it (the
        only place a record is removed). Idempotent."""
        st = self.streams.pop(stream_id, None)
        if st is not None and st.unacked and not self.closed:
            self._ack(stream_id, st.unacked)
        self._h2.forget(stream_id)

    def send_window(self, stream_id: int) -> int:
        """Bytes the peer lets us send on the stream now (0 if it is gone)."""
        return self._h2.send_window(stream_id)

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    # -- output ----------------------------------------------------------------------
    def send_data(
        self, stream_id: int, data: bytes | memoryview | Sequence[memoryview], end_stream: bool = False
    ) -> int:
        """Send as much of ``data`` (bytes, or pieces sent in order as one stretch) as the
        windows allow; return how much was sent. Pieces go out as they are (the fast
        session copies none): they must not change afterwards.

        ``end_stream`` applies only if everything was sent. Raises StreamGone.
        """
        if self.closed or stream_id not in self.streams:
            raise StreamGone(stream_id)
        parts = [memoryview(data)] if isinstance(data, bytes | memoryview) else data
        try:
            n = self._h2.send_data(stream_id, parts, end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise StreamGone(stream_id) from exc
        if n or end_stream:
            self._on_sent_data()
        return n

    def _on_sent_data(self) -> None:
        """Hook for the server's ping policy."""

    def _send_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        if self.closed:
            raise StreamGone(stream_id)
        try:
            self._h2.send_headers(stream_id, headers, end_stream)
        except h2.exceptions.ProtocolError as exc:
            raise StreamGone(stream_id) from exc
        self._on_sent_data()

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM unless the stream is already closed; never raises."""
        st = self.streams.get(stream_id)
        if st is not None:
            st.discarding = st.reset = True
        if self.closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, error_code)

    def ping(self, data: bytes) -> None:
        if not self.closed:
            self._h2.ping(data)

    def goaway(self, last_stream_id: int, error_code: int = 0, debug: bytes = b"") -> None:
        """Announce GOAWAY; the connection stays usable for streams <= last_stream_id."""
        if not self.closed:
            self.goaway_sent = last_stream_id
            self._h2.goaway(last_stream_id, error_code, debug)

    def _goaway_raw(self, code: int, debug: bytes) -> None:
        self._h2.fail(code, debug)

    @property
    def highest_inbound_stream_id(self) -> int:
        return self._h2.highest_inbound_stream_id
