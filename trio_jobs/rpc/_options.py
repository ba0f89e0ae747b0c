"""Tunables of the server and the client, with the defaults documented in architecture.md.

What both ends of a connection set alike (message size caps, the HTTP/2 settings they
advertise, receive windows, read size) is defined once, in :class:`_ConnectionSettings`;
:class:`ServerLimits` and :class:`ChannelOptions` add their own, and each gives
``max_header_list_size`` its own default (8 KiB on the server, 16 KiB on the client). Both
keep their keyword names and defaults; only the common fields come first in ``repr``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

KiB: Final = 1024
MiB: Final = 1024 * KiB


@dataclass(frozen=True, kw_only=True)
class _ConnectionSettings:
    """The settings of one end of a connection, server or client (see the subclasses)."""

    max_receive_message: int = 4 * MiB
    """A larger message received fails its call with RESOURCE_EXHAUSTED; it is never
    buffered."""
    max_send_message: int = 4 * MiB
    """Sending a larger message (a handler's response, a client's request) fails with
    RESOURCE_EXHAUSTED."""
    max_concurrent_streams: int = 100
    """SETTINGS_MAX_CONCURRENT_STREAMS we advertise: streams the peer may open at once on
    one connection (h2 enforces it). Only clients open streams, so a client's value changes
    nothing."""
    max_header_list_size: int
    """SETTINGS_MAX_HEADER_LIST_SIZE we advertise; a larger header block closes the
    connection. No default here: each subclass has its own."""
    stream_window: int = 1 * MiB
    connection_window: int = 4 * MiB
    max_frame_size: int = 1 * MiB
    """Our receive-side HTTP/2 settings: large windows/frames keep h2's per-frame cost low."""
    read_size: int = 256 * KiB
    """Bytes read from the transport per receive call."""


@dataclass(frozen=True, kw_only=True)
class ServerLimits(_ConnectionSettings):
    max_header_list_size: int = 8 * KiB
    handshake_timeout: float = 10.0
    """Seconds for TCP accept -> TLS handshake done -> ALPN checked."""
    max_connections: int = 1000
    """Connections beyond this are closed right after accept (accept loop keeps going)."""
    max_connections_per_source: int = 64
    """Connections one source address may hold (IPv4-mapped IPv6 counts as its IPv4
    address, IPv6 per /64: ``_sources.py``); more are closed right after accept, before any
    TLS work. 64: a CI fleet behind one NAT address still fits (as many connections as one
    identity may hold ``tail`` streams by default), while 1000 / 64 keeps any one address
    to a sixteenth of ``max_connections``."""
    max_handshakes_per_source: int = 32
    """TLS handshakes in progress from one source address; a connection beyond this is
    closed right after accept. Clients that start together all wait in their handshakes
    at once (the server does them one after the other, a millisecond or more each): 32
    admits such a burst (our own soak smoke starts 20 clients at once; a CI matrix behind
    one NAT address does the same), while the connections nobody has authenticated yet
    (anyone who can reach the port) stay half of that address's share."""
    idle_timeout: float | None = 300.0
    """A connection with no call running for this long (PINGs do not count) gets
    GOAWAY(NO_ERROR) and is closed, like grpc's ``max_connection_idle``. 5 min: an
    interactive client never notices, a forgotten one gives its slot back. None = never."""
    ping_min_interval: float = 10.0
    """A PING sooner than this after the previous one, with no HEADERS/DATA sent in
    between, is a strike (grpc-go's default is 5 min; ours allows keepalive >= 10 s)."""
    max_ping_strikes: int = 2
    """More strikes than this -> GOAWAY(ENHANCE_YOUR_CALM, "too_many_pings")."""
    reset_rate: float = 200.0
    reset_burst: int = 400
    """Token bucket for streams the client resets while we serve them (Rapid Reset):
    exhausting it -> GOAWAY(ENHANCE_YOUR_CALM, "too_many_resets")."""
    settings_rate: float = 10.0
    settings_burst: int = 100
    """Token bucket for SETTINGS frames from the client (each one is applied and ACKed):
    exhausting it -> GOAWAY(ENHANCE_YOUR_CALM, "too_many_settings")."""
    drain_timeout: float = 10.0
    """Default deadline for in-flight calls in :meth:`Server.shutdown`."""
    shutdown_ping_timeout: float = 2.0
    """How long graceful shutdown waits for the PING ack between its two GOAWAYs."""


@dataclass(frozen=True, kw_only=True)
class ChannelOptions(_ConnectionSettings):
    max_header_list_size: int = 16 * KiB
    connect_timeout: float = 20.0
    """Seconds for TCP connect + TLS handshake + ALPN check."""
