"""systemd's readiness protocol (``sd_notify``) without libsystemd.

A service of ``Type=notify`` tells the service manager how it is doing by sending one
datagram of ``KEY=VALUE`` lines to the unix socket named in ``$NOTIFY_SOCKET``: ``READY=1``
once it serves, ``RELOADING=1`` (with ``MONOTONIC_USEC``) while it reloads and ``READY=1``
again after, ``STOPPING=1`` when it begins to shut down (sd_notify(3)). A name starting with
``@`` is a socket in the abstract namespace (its first byte is NUL on the wire).

Notification is advisory: a missing variable, a socket that does not exist, a full queue or
any other error is logged once at debug level and otherwise ignored -- the server never
fails because nobody listens. The send never blocks (``MSG_DONTWAIT``), so it is safe to call
from the event loop. Only the server's own process notifies: jobs get a clean environment
without ``$NOTIFY_SOCKET``, and the unit sets ``NotifyAccess=main`` besides.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Mapping

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV: Final = "NOTIFY_SOCKET"


def _address(name: str) -> str | bytes | None:
    """The sockaddr for ``$NOTIFY_SOCKET``: a path, or ``@name`` -> b"\\0name" (abstract)."""
    if name.startswith("@") and len(name) > 1:
        return b"\0" + os.fsencode(name[1:])
    if name.startswith("/"):
        return name
    return None  # systemd only ever sets these two forms (vsock is not for us)


def notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` lines) to ``$NOTIFY_SOCKET``.

    Returns True if the datagram was sent; False when there is no socket to tell or the
    send failed (never raises).
    """
    env = os.environ if environ is None else environ
    name = env.get(NOTIFY_SOCKET_ENV, "")
    if not name:
        return False
    address = _address(name)
    if address is None:
        log.debug("ignoring %s=%r: not a path or an abstract socket name", NOTIFY_SOCKET_ENV, name)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), socket.MSG_DONTWAIT, address)
    except OSError as exc:
        log.debug("sd_notify %r to %s failed: %s", state, name, exc)
        return False
    return True


def ready(*, environ: Mapping[str, str] | None = None) -> bool:
    """``READY=1``: startup finished, or a reload did (either way the service is serving)."""
    return notify("READY=1", environ=environ)


def reloading(*, environ: Mapping[str, str] | None = None) -> bool:
    """``RELOADING=1`` with the CLOCK_MONOTONIC time the reload began (systemd >= 253 wants
    it; older versions ignore the extra field). Follow it with :func:`ready`."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", environ=environ)


def stopping(*, environ: Mapping[str, str] | None = None) -> bool:
    """``STOPPING=1``: the graceful shutdown (drain, stopping jobs) has begun."""
    return notify("STOPPING=1", environ=environ)

