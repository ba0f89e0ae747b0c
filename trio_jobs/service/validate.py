"""Request checks: what a request must be before the worker sees it.

Each check raises ``RpcError(INVALID_ARGUMENT)`` with a message that says what to fix. They
look at the request alone; what depends on the caller (the policy's caps, programs and
quotas) is checked by the handlers (handlers.py) after these.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

from ..rpc import StatusCode
from .refusals import abort
from .tuning import MAX_ARGS_BYTES, MAX_GRACE_SECONDS

if TYPE_CHECKING:
    from ..v1 import jobs_pb2 as pb


def job_id(raw: str) -> str:
    """The canonical form of a job id; a job id that is not a UUID can never name a job."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        shown = raw if len(raw) <= 64 else raw[:64] + "..."
        abort(
            StatusCode.INVALID_ARGUMENT,
            f"job id {shown!r} is not a UUID; use the id that 'trio-jobs start' printed "
            "(see 'trio-jobs list')",
        )


def start_request(request: pb.StartJobRequest) -> str:
    """Check a StartJob's command, args, env and working directory; returns the working
    directory (``/`` when unset)."""
    if not request.command:
        abort(StatusCode.INVALID_ARGUMENT, "no command given; pass the program to run, e.g. 'echo'")
    working_dir = request.working_dir or "/"
    if not os.path.isabs(working_dir):
        abort(StatusCode.INVALID_ARGUMENT, f"working_dir {working_dir!r} must be an absolute path")
    size = len(request.command) + sum(len(a) + 1 for a in request.args)
    size += sum(len(k) + len(v) + 2 for k, v in request.env.items())
    if size > MAX_ARGS_BYTES:
        abort(StatusCode.INVALID_ARGUMENT, f"command, args and env take {size} bytes, over the limit of {MAX_ARGS_BYTES}")
    for text in (request.command, *request.args, *request.env.keys(), *request.env.values()):
        if "\0" in text:
            abort(StatusCode.INVALID_ARGUMENT, "command, args and env must not contain NUL characters")
    for key in request.env:
        if not key or "=" in key:
            abort(StatusCode.INVALID_ARGUMENT, f"environment variable name {key!r} is invalid (empty or contains '=')")
    return working_dir


def grace_period(request: pb.StopJobRequest) -> float | None:
    """A StopJob's grace period in seconds (None: unset, the worker's default)."""
    if not request.HasField("grace_period"):
        return None
    d = request.grace_period
    if d.seconds < 0 or d.nanos < 0:
        abort(StatusCode.INVALID_ARGUMENT, "grace_period must not be negative; use 0 to kill at once")
    if d.nanos >= 1_000_000_000:
        abort(StatusCode.INVALID_ARGUMENT, "grace_period.nanos must be below 1e9")
    grace = d.seconds + d.nanos / 1e9
    if grace > MAX_GRACE_SECONDS:
        abort(StatusCode.INVALID_ARGUMENT, f"grace_period {grace:g}s is too long; use at most {MAX_GRACE_SECONDS:g}s")
    return grace
