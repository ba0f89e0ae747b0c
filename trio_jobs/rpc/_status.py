"""Status codes, the layer's one exception, and the HTTP/2 -> gRPC status mappings.

The mappings follow grpc/grpc ``doc/statuscodes.md``, ``doc/http-grpc-status-mapping.md``
and the RST_STREAM table of ``doc/PROTOCOL-HTTP2.md``.
"""

from __future__ import annotations

import enum
from typing import Final, final

from h2.errors import ErrorCodes

Metadata = tuple[tuple[str, str | bytes], ...]
"""Custom metadata as ordered (key, value) pairs; keys ending in ``-bin`` carry bytes."""


@final
class StatusCode(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(Exception):
    """The one exception of the rpc layer: a gRPC status other than OK.

    Raised by client calls (the status the server or the transport produced) and by
    :meth:`ServerContext.abort` in handlers (the status to send).
    """

    def __init__(
        self, code: StatusCode, message: str = "", trailing_metadata: Metadata = ()
    ) -> None:
        super().__init__(f"{code.name}: {message}" if message else code.name)
        self.code = code
        self.message = message
        self.trailing_metadata = trailing_metadata

    def __repr__(self) -> str:
        return f"RpcError({self.code.name}, {self.message!r})"


# RST_STREAM error code -> status the client reports (PROTOCOL-HTTP2.md "Errors").
_RST_TO_STATUS: Final[dict[int, StatusCode]] = {
    ErrorCodes.NO_ERROR: StatusCode.INTERNAL,
    ErrorCodes.PROTOCOL_ERROR: StatusCode.INTERNAL,
    ErrorCodes.INTERNAL_ERROR: StatusCode.INTERNAL,
    ErrorCodes.FLOW_CONTROL_ERROR: StatusCode.INTERNAL,
    ErrorCodes.SETTINGS_TIMEOUT: StatusCode.INTERNAL,
    ErrorCodes.STREAM_CLOSED: StatusCode.INTERNAL,
    ErrorCodes.FRAME_SIZE_ERROR: StatusCode.INTERNAL,
    ErrorCodes.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    ErrorCodes.CANCEL: StatusCode.CANCELLED,
    ErrorCodes.COMPRESSION_ERROR: StatusCode.INTERNAL,
    ErrorCodes.CONNECT_ERROR: StatusCode.INTERNAL,
    ErrorCodes.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCodes.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
    ErrorCodes.HTTP_1_1_REQUIRED: StatusCode.INTERNAL,
}


def status_from_rst_stream(error_code: int) -> StatusCode:
    return _RST_TO_STATUS.get(error_code, StatusCode.INTERNAL)


# Non-200 HTTP status (no grpc-status) -> gRPC status (http-grpc-status-mapping.md).
_HTTP_TO_STATUS: Final[dict[int, StatusCode]] = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}


def status_from_http(http_status: int) -> StatusCode:
    return _HTTP_TO_STATUS.get(http_status, StatusCode.UNKNOWN)
