"""How a connection is carried: which transport, and whether h2's fast paths are used.

Two independent choices (DESIGN §5), each an environment variable that the server and the
client read, so that any deployment can fall back without a code change:

* ``TRIO_JOBS_RPC_TRANSPORT=lean|ssl-stream`` (default ``lean``): ``lean`` does TLS with
  ``ssl.SSLObject`` on the raw socket (``_transport.SocketTransport``); ``ssl-stream`` runs
  the connection over a ``trio.SSLStream`` (``_transport.StreamTransport``), exactly as a
  caller's own ``trio.open_ssl_over_tcp_listeners`` does.
* ``TRIO_JOBS_RPC_FAST_PATHS=1|0`` (default ``1``): ``0`` uses h2 through its public API
  only (``_h2``'s pure session). ``1`` asks for the fast paths; they are used only if the
  installed h2 passed the version guard (``_h2.guard``), else the mode says why not.

A value that is neither is refused with :class:`ValueError` naming the variable: a typo must
not silently select the other mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from collections.abc import Mapping

TRANSPORT_ENV: Final = "TRIO_JOBS_RPC_TRANSPORT"
FAST_PATHS_ENV: Final = "TRIO_JOBS_RPC_FAST_PATHS"
Transport = Literal["lean", "ssl-stream"]
TRANSPORTS: Final[tuple[Transport, ...]] = ("lean", "ssl-stream")
_FAST_VALUES: Final = {"1": True, "0": False}


@dataclass(frozen=True, kw_only=True)
class RpcMode:
    """The transport and fast-path choice of a server or a channel (module docstring)."""

    transport: Transport = "lean"
    fast_paths: bool = True

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, not {self.transport!r}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> RpcMode:
        """The mode the environment asks for (unset or empty = the default)."""
        env = os.environ if environ is None else environ
        transport = env.get(TRANSPORT_ENV, "") or "lean"
        if transport not in TRANSPORTS:
            raise ValueError(f"{TRANSPORT_ENV} must be lean or ssl-stream, not {transport!r}")
        fast = env.get(FAST_PATHS_ENV, "") or "1"
        if fast not in _FAST_VALUES:
            raise ValueError(f"{FAST_PATHS_ENV} must be 1 or 0, not {fast!r}")
        return cls(transport=transport, fast_paths=_FAST_VALUES[fast])

    @property
    def effective_fast_paths(self) -> bool:
        """Whether the fast paths are really used: asked for, and the installed h2 has them."""
        if not self.fast_paths:
            return False
        from ._h2.guard import FAST_PATHS_AVAILABLE

        return FAST_PATHS_AVAILABLE

    def describe(self) -> str:
        """``transport=lean fast-paths=on``: the banner line's words (DESIGN §5)."""
        if self.effective_fast_paths:
            fast = "on"
        elif self.fast_paths:
            from ._h2.guard import UNAVAILABLE_REASON

            fast = f"off ({UNAVAILABLE_REASON})"
        else:
            fast = "off"
        return f"transport={self.transport} fast-paths={fast}"


def resolve(mode: RpcMode | None) -> RpcMode:
    """``mode``, or the environment's when None (what Server and connect() do)."""
    return RpcMode.from_environ() if mode is None else mode
