"""Per-source admission: one source address cannot take every connection slot (DESIGN §3).

The server's ``max_connections`` protects the process; on its own it lets one address that
opens a thousand silent TCP connections lock every other client out. So the accept loop
also counts, per source, the connections it holds and the TLS handshakes still in progress,
and closes a connection over either cap at once: before the TLS handshake, so a flood costs
an ``accept`` and a ``close`` per connection and no cryptography.

What a *source* is: the peer's IP address, with an IPv4-mapped IPv6 address
(``::ffff:192.0.2.1``, what a dual-stack listener reports for IPv4 peers) counted as its
IPv4 address, and an IPv6 address counted as its /64 network: one host or subscriber is
given a whole /64 (RFC 6177), so per-address counting would give an IPv6 attacker 2^64
sources. Peers that are not IP sockets (memory streams, a caller's own stream) have no
source and are only under the global cap.

Sans-IO: plain counters, no trio. The server calls :meth:`SourceCaps.admit` at accept,
:meth:`Admission.handshake_done` when the handshake ended (either way) and
:meth:`Admission.release` when the connection ended.
"""

from __future__ import annotations

import ipaddress
from typing import Final, final

IPV6_SOURCE_PREFIX: Final = 64
"""IPv6 peers are counted per network of this prefix length (see the module docstring)."""


def source_key(host: str) -> str:
    """The source that ``host`` (an address from ``getpeername``) is counted as."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:  # not an IP address (e.g. an AF_UNIX path): counted as it is
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        net = ipaddress.IPv6Network((int(addr), IPV6_SOURCE_PREFIX), strict=False)
        return str(net)
    return str(addr)


@final
class Admission:
    """One admitted connection's share of its source's counts; both methods are idempotent."""

    __slots__ = ("_caps", "_handshaking", "_held", "source")

    def __init__(self, caps: SourceCaps, source: str) -> None:
        self._caps = caps
        self.source = source
        self._handshaking = True
        self._held = True

    def handshake_done(self) -> None:
        """The TLS handshake ended (done, failed or timed out): no longer pending."""
        if self._handshaking:
            self._handshaking = False
            self._caps.end_handshake(self.source)

    def release(self) -> None:
        """The connection ended: its slot is free again."""
        self.handshake_done()
        if self._held:
            self._held = False
            self._caps.end_connection(self.source)


@final
class SourceCaps:
    """Connections and handshakes in progress per source, each under its cap.

    Memory: one dict entry per source with a connection open (entries at zero are
    removed), so at most ``max_connections`` of the server.
    """

    def __init__(self, *, max_connections: int, max_handshakes: int) -> None:
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self._connections: dict[str, int] = {}
        self._handshakes: dict[str, int] = {}

    def admit(self, source: str) -> Admission | str:
        """Count a new connection from ``source``, or say why it is refused (not counted)."""
        held = self._connections.get(source, 0)
        if held >= self.max_connections:
            return (
                f"{source} already holds {held} connections, the most per source address"
                " (max_connections_per_source)"
            )
        pending = self._handshakes.get(source, 0)
        if pending >= self.max_handshakes:
            return (
                f"{source} already has {pending} TLS handshakes in progress, the most per"
                " source address (max_handshakes_per_source)"
            )
        return self.add(source)

    def add(self, source: str) -> Admission:
        """Count a connection from ``source`` without checking the caps."""
        self._connections[source] = self._connections.get(source, 0) + 1
        self._handshakes[source] = self._handshakes.get(source, 0) + 1
        return Admission(self, source)

    def connections(self, source: str) -> int:
        return self._connections.get(source, 0)

    def handshakes(self, source: str) -> int:
        return self._handshakes.get(source, 0)

    def end_handshake(self, source: str) -> None:
        """(Through :class:`Admission`, which calls it once per connection.)"""
        _drop(self._handshakes, source)

    def end_connection(self, source: str) -> None:
        """(Through :class:`Admission`, which calls it once per connection.)"""
        _drop(self._connections, source)


def _drop(counts: dict[str, int], source: str) -> None:
    left = counts[source] - 1
    if left:
        counts[source] = left
    else:
        del counts[source]


@final
class ThrottledLog:
    """Rate-limits one kind of warning: a flood of refusals must not flood the log.

    The first occurrence is reported at once; later ones only once ``interval`` seconds
    have passed since the last report, with how many were not reported in between.
    """

    __slots__ = ("_interval", "_last", "_suppressed")

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last: float | None = None
        self._suppressed = 0

    def due(self, now: float) -> int | None:
        """None: do not log this one; else log it, with this many suppressed before it."""
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return None
        self._last = now
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed
