"""The refusals the handlers share, each with its message for the user.

``not_found`` is the one answer for a job that does not exist *and* for another user's job
(same code, same message), so nobody learns which job ids exist.
"""

from __future__ import annotations

from typing import NoReturn

from ..rpc import RpcError, StatusCode


def abort(code: StatusCode, message: str) -> NoReturn:
    raise RpcError(code, message)


def not_found(job_id: str) -> NoReturn:
    abort(StatusCode.NOT_FOUND, f"no job {job_id} of yours; see 'trio-jobs list' for your jobs")


def unavailable() -> NoReturn:
    abort(StatusCode.UNAVAILABLE, "the server is shutting down; retry once it is back")
