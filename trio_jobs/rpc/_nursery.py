"""A nursery for the background tasks of an async context manager, whose body's exception
reaches the caller as it is.

The body of such a context manager runs inside the nursery, but what it raises must come
out unchanged (``except RpcError``, plain Cancelled or KeyboardInterrupt), not wrapped in
an ExceptionGroup: it is caught, the nursery is cancelled and exits cleanly (its tasks end
on cancellation without raising), and the very same exception object is re-raised outside
it (trio's advice for context managers that own a nursery). A failure of a background task
itself (a bug) still surfaces as a group. When an outer cancel scope was cancelled, the
tasks end with Cancelled too (the nursery's own scope does not catch what an outer scope
caused): that group says nothing the body's own exception does not, and is dropped.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import AsyncIterator


@asynccontextmanager
async def background_nursery() -> AsyncIterator[trio.Nursery]:
    """``async with background_nursery() as nursery:`` start tasks, then ``yield`` to the body."""
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            except BaseException as exc:  # re-raised below, outside the nursery
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if body_error is None or group.split(trio.Cancelled)[1] is not None:
            raise
    if body_error is not None:
        try:
            raise body_error
        finally:
            body_error = None  # no reference cycle through the traceback
