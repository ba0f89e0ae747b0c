"""The h2 seam: the only code in trio-jobs that holds an h2 connection or touches h2's
internals (the protocol modules use h2's public events, exceptions and ``ErrorCodes``).

``session.Session`` documents the interface the gRPC protocol uses (input as events,
output as pieces, the sending and flow-control calls); it is implemented twice:
``session.Session`` on h2's public API (pure h2) and ``fast_session.FastSession`` on its
internals (``fast.py``, ``frames.py``, ``hpack.py``), which ``guard.py`` checks at first
use. :func:`open_session` picks one.
"""

from __future__ import annotations

from .session import Data, Event, Failed, Piece, Session

__all__ = ["Data", "Event", "Failed", "Piece", "Session", "open_session"]


def open_session(*, fast_paths: bool, **settings: object) -> Session:
    """A session: the fast one if asked for and the installed h2 passed the guard."""
    if fast_paths:
        from .guard import FAST_PATHS_AVAILABLE

        if FAST_PATHS_AVAILABLE:
            from .fast_session import FastSession

            return FastSession(**settings)  # type: ignore[arg-type]
    return Session(**settings)  # type: ignore[arg-type]
