"""A raw HTTP/2 client over TLS for attack tests.

Unlike ``h2.H2Connection`` it keeps no state machine of its own: it serializes whatever
frames (or hand-made bytes) a test asks for, so a test can send sequences a correct client
never would (a CONTINUATION flood, a WINDOW_UPDATE past 2^31-1, DATA after END_STREAM, a
bad preface). Incoming frames are parsed with ``hyperframe`` and header blocks decoded with
``hpack`` so a test can read exactly what the server answered: GOAWAY codes, RST_STREAM
codes, gRPC status trailers.

Every read is bounded: :meth:`RawH2.next_frame` returns ``None`` once the server has closed
the connection (cleanly, with a TCP reset, or with a ragged TLS EOF), and the helpers that
loop take a frame budget. Time bounds are the caller's ``trio.fail_after``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, final

import trio
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable, Iterable, Sequence

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GRPC_REQUEST: Final = (
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":path", b"/pkg.Svc/M"),
    (b":authority", b"localhost"),
    (b"te", b"trailers"),
    (b"content-type", b"application/grpc"),
)
"""A gRPC request's headers as bytes pairs, for sans-IO tests that drive h2 directly."""
FRAME_HEADER_LEN: Final = 9
# Refuse to parse absurd frames from a buggy server: 16 MiB is the protocol maximum.
MAX_FRAME_LEN: Final = (1 << 24) - 1
READ_CHUNK: Final = 65536

# HTTP/2 error codes (RFC 9113 section 7).
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
ENHANCE_YOUR_CALM: Final = 0xB

# SETTINGS identifiers.
SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
SETTINGS_ENABLE_PUSH: Final = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS: Final = 0x3
SETTINGS_INITIAL_WINDOW_SIZE: Final = 0x4
SETTINGS_MAX_FRAME_SIZE: Final = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE: Final = 0x6

MAX_WINDOW: Final = (1 << 31) - 1
DEFAULT_WINDOW: Final = 65535
MIN_MAX_FRAME: Final = 16384  # SETTINGS_MAX_FRAME_SIZE every peer must accept


class RawH2Error(Exception):
    """The server sent something this test client cannot parse, or a helper's budget ran out."""


def grpc_message(payload: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message; ``length`` overrides the announced length (attacks)."""
    announced = len(payload) if length is None else length
    return struct.pack(">BI", 1 if compressed else 0, announced) + payload


def split_grpc_messages(data: bytes) -> list[bytes]:
    """Split a concatenation of complete length-prefixed messages (raises on a partial one)."""
    out: list[bytes] = []
    view = memoryview(data)
    while view:
        if len(view) < 5:
            raise RawH2Error(f"truncated gRPC prefix: {bytes(view)!r}")
        _flag, length = struct.unpack(">BI", view[:5])
        if len(view) < 5 + length:
            raise RawH2Error(f"truncated gRPC message: want {length}, have {len(view) - 5}")
        out.append(bytes(view[5 : 5 + length]))
        view = view[5 + length :]
    return out


@dataclass(frozen=True, kw_only=True)
class Received:
    """One frame from the server; ``headers`` is the decoded block when it completed here."""

    frame: Frame
    headers: tuple[tuple[str, str], ...] | None = None


@dataclass(kw_only=True)
class CallResult:
    """What a well-behaved unary/streaming call received on one stream."""

    stream_id: int
    headers: tuple[tuple[str, str], ...] = ()
    trailers: tuple[tuple[str, str], ...] = ()
    data: bytearray = field(default_factory=bytearray)
    reset_code: int | None = None

    @property
    def messages(self) -> list[bytes]:
        return split_grpc_messages(bytes(self.data))

    @property
    def grpc_status(self) -> int | None:
        # Trailers-Only responses carry grpc-status in the (only) HEADERS block.
        for key, value in (*self.trailers, *self.headers):
            if key == "grpc-status":
                return int(value)
        return None


@final
class RawH2:
    """A frame-level HTTP/2 client over any trio stream (``trio.SSLStream`` in the tests).

    It answers nothing by itself (no automatic SETTINGS or PING ACK), except in the
    well-behaved helper :meth:`call`, so attack tests decide exactly what the server sees.
    Not safe for concurrent senders (one task sends, like a real connection's writer) —
    but one task may read while another sends.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.encoder = Encoder()
        self.decoder = Decoder()
        # Tests send any SETTINGS, raw bytes included, and the server's encoder may then use
        # up to the HEADER_TABLE_SIZE sent (RFC 7541 4.2): accept any size it announces. Found
        # by the long fuzz run: SETTINGS_HEADER_TABLE_SIZE=4097 and hpack's default limit.
        self.decoder.max_allowed_table_size = 2**32 - 1
        self._buf = bytearray()
        self._eof = False
        self._header_block: bytearray | None = None
        self.next_stream_id = 1
        self.bytes_sent = 0
        self.bytes_received = 0
        # True when the connection ended with a TCP reset or a ragged TLS EOF rather than a
        # clean close: both are how a server that slams the door looks from here.
        self.broken = False

    # --- sending -----------------------------------------------------------------------

    async def send(self, *items: Frame | bytes) -> None:
        """Serialize and write ``items`` in one write (frames and hand-made bytes)."""
        out = b"".join(i if isinstance(i, bytes | bytearray) else i.serialize() for i in items)
        await self.stream.send_all(out)
        self.bytes_sent += len(out)

    async def send_preface(self, settings: dict[int, int] | None = None) -> None:
        await self.send(PREFACE, SettingsFrame(0, settings=settings or {}))

    def new_stream_id(self) -> int:
        sid = self.next_stream_id
        self.next_stream_id += 2
        return sid

    def request_block(
        self,
        path: str,
        *,
        authority: str = "127.0.0.1",
        extra: Sequence[tuple[str, str]] = (),
        content_type: str = "application/grpc",
    ) -> bytes:
        """An HPACK-encoded gRPC request header block (encoder state advances)."""
        headers = [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", path),
            (":authority", authority),
            ("content-type", content_type),
            ("te", "trailers"),
            *extra,
        ]
        data: bytes = self.encoder.encode(headers)
        return data

    def headers_frame(
        self,
        stream_id: int,
        path: str,
        *,
        end_stream: bool = False,
        end_headers: bool = True,
        extra: Sequence[tuple[str, str]] = (),
    ) -> HeadersFrame:
        flags = [f for f, on in (("END_STREAM", end_stream), ("END_HEADERS", end_headers)) if on]
        return HeadersFrame(stream_id, data=self.request_block(path, extra=extra), flags=flags)

    # --- receiving ---------------------------------------------------------------------

    async def _fill(self, need: int) -> bool:
        while len(self._buf) < need:
            if self._eof:
                return False
            try:
                chunk = await self.stream.receive_some(READ_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._eof = True
                self.broken = True
                return False
            if not chunk:
                self._eof = True
                return False
            self.bytes_received += len(chunk)
            self._buf += chunk
        return True

    async def next_frame(self) -> Received | None:
        """The next frame, or ``None`` once the server has closed the connection."""
        if not await self._fill(FRAME_HEADER_LEN):
            return None
        frame, length = Frame.parse_frame_header(memoryview(bytes(self._buf[:FRAME_HEADER_LEN])))
        if length > MAX_FRAME_LEN:  # pragma: no cover - a 24-bit field cannot exceed it
            raise RawH2Error(f"frame length {length}")
        if not await self._fill(FRAME_HEADER_LEN + length):
            return None
        body = bytes(self._buf[FRAME_HEADER_LEN : FRAME_HEADER_LEN + length])
        del self._buf[: FRAME_HEADER_LEN + length]
        frame.parse_body(memoryview(body))
        return Received(frame=frame, headers=self._decode_headers(frame))

    def _decode_headers(self, frame: Frame) -> tuple[tuple[str, str], ...] | None:
        if isinstance(frame, HeadersFrame | PushPromiseFrame):
            self._header_block = bytearray(frame.data)
        elif isinstance(frame, ContinuationFrame):
            if self._header_block is None:
                raise RawH2Error("CONTINUATION without a header block in progress")
            self._header_block += frame.data
        else:
            return None
        if "END_HEADERS" not in frame.flags:
            return None
        block, self._header_block = bytes(self._header_block), None
        decoded = self.decoder.decode(block, raw=False)
        return tuple((str(k), str(v)) for k, v in decoded)

    async def read_until(
        self, predicate: Callable[[Received], bool], *, max_frames: int = 10_000
    ) -> tuple[Received | None, list[Received]]:
        """Read until ``predicate`` matches (returned first) or the connection closes (None).

        The second item is every frame read, the match included. Raises
        :class:`RawH2Error` when ``max_frames`` frames went by without a match.
        """
        seen: list[Received] = []
        for _ in range(max_frames):
            got = await self.next_frame()
            if got is None:
                return None, seen
            seen.append(got)
            if predicate(got):
                return got, seen
        raise RawH2Error(f"no matching frame within {max_frames} frames")

    async def read_to_close(self, *, max_frames: int = 100_000) -> list[Received]:
        """Read everything until the server closes the connection."""
        _, seen = await self.read_until(lambda _r: False, max_frames=max_frames)
        return seen

    # --- a well-behaved gRPC call ----------------------------------------------------

    async def call(
        self,
        path: str,
        messages: Iterable[bytes],
        *,
        stream_id: int | None = None,
        max_frames: int = 100_000,
        seen: list[Received] | None = None,
    ) -> CallResult:
        """Run one gRPC call correctly: ACK SETTINGS and PINGs, return flow-control credit.

        Frames of other streams are ignored (``seen``, if given, gets every frame received,
        of any stream, e.g. to check that no GOAWAY came). Returns when the stream ends
        (END_STREAM or RST_STREAM); raises :class:`RawH2Error` if the connection closes first.
        """
        sid = self.new_stream_id() if stream_id is None else stream_id
        body = b"".join(grpc_message(m) for m in messages)
        if len(body) > DEFAULT_WINDOW:
            # Waiting for the server's WINDOW_UPDATEs would need send-window bookkeeping this
            # test tool does not keep; the calls it makes are small on purpose.
            raise RawH2Error(f"request body {len(body)} > the initial window {DEFAULT_WINDOW}")
        chunks = [body[i : i + MIN_MAX_FRAME] for i in range(0, len(body), MIN_MAX_FRAME)] or [b""]
        frames: list[Frame] = [self.headers_frame(sid, path)]
        frames += [DataFrame(sid, c) for c in chunks[:-1]]
        frames.append(DataFrame(sid, chunks[-1], flags=["END_STREAM"]))
        await self.send(*frames)
        result = CallResult(stream_id=sid)
        for _ in range(max_frames):
            got = await self.next_frame()
            if got is None:
                raise RawH2Error(f"connection closed during the call on stream {sid}")
            if seen is not None:
                seen.append(got)
            frame = got.frame
            if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                await self.send(SettingsFrame(0, flags=["ACK"]))
            elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
                await self.send(PingFrame(0, frame.opaque_data, flags=["ACK"]))
            elif isinstance(frame, GoAwayFrame) and frame.last_stream_id < sid:
                raise RawH2Error(f"GOAWAY before stream {sid}: code {frame.error_code}")
            if frame.stream_id != sid:
                continue
            if isinstance(frame, DataFrame):
                result.data += frame.data
                credit = frame.flow_controlled_length
                if credit:
                    await self.send(WindowUpdateFrame(0, credit), WindowUpdateFrame(sid, credit))
            elif got.headers is not None:
                if result.headers:
                    result.trailers = got.headers
                else:
                    result.headers = got.headers
            elif isinstance(frame, RstStreamFrame):
                result.reset_code = frame.error_code
                return result
            if "END_STREAM" in frame.flags:
                return result
        raise RawH2Error(f"stream {sid} did not end within {max_frames} frames")

    async def aclose(self) -> None:
        """Close the transport; idempotent, never raises for an already broken peer."""
        await trio.aclose_forcefully(self.stream)

    async def __aenter__(self) -> RawH2:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def goaway_of(frames: Iterable[Received]) -> GoAwayFrame | None:
    """The first GOAWAY among ``frames``."""
    for r in frames:
        if isinstance(r.frame, GoAwayFrame):
            return r.frame
    return None


async def open_raw_h2(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    server_hostname: str = "localhost",
    require_h2: bool = True,
) -> RawH2:
    """Connect over TCP+TLS (handshake done) and return the raw client; no preface sent."""
    tcp = await trio.open_tcp_stream(host, port)
    tls = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname)
    try:
        await tls.do_handshake()
        if require_h2 and tls.selected_alpn_protocol() != "h2":
            raise RawH2Error(f"ALPN selected {tls.selected_alpn_protocol()!r}, not h2")
    except BaseException:
        await trio.aclose_forcefully(tls)
        raise
    return RawH2(tls)
