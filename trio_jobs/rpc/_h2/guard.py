"""The version guard: may the fast session (h2 internals) be used with the installed h2?

pyproject.toml pins h2 to the minors the suite was run against (:data:`TESTED_H2`). An h2
installed past the pin (or patched) is checked here, once, at first use: the fast
session's modules must import, and every internal name they use must exist on a real
connection, stream, state machine, frame buffer and HPACK coder. If one is missing, the
pure session (h2's public API) is used instead and one warning line says why; nothing
else changes (DESIGN §5).
"""

from __future__ import annotations

import logging
from typing import Final

TESTED_H2: Final = ("4.3", "4.4")
"""h2 minors the whole suite passed with (both fast-path settings)."""

_CONNECTION: Final = (
    "_data_to_send", "_frame_dispatch_table", "incoming_buffer", "state_machine", "encoder",
    "decoder", "streams", "_inbound_flow_control_window_manager", "_closed_streams",
    "highest_inbound_stream_id", "_begin_new_stream", "_get_stream_by_id",
    "_terminate_connection", "open_inbound_streams", "open_outbound_streams",
    "MAX_CLOSED_STREAMS", "DEFAULT_MAX_HEADER_LIST_SIZE", "outbound_flow_control_window",
    "max_outbound_frame_size", "local_settings",
)  # fmt: skip
_STREAM: Final = (
    "state_machine", "_inbound_window_manager", "_expected_content_length",
    "_actual_content_length", "outbound_flow_control_window", "_authority", "request_method",
    "closed", "closed_by", "receive_headers",
)  # fmt: skip
_STREAM_MACHINE: Final = ("headers_received", "trailers_sent", "process_input")
_FRAME_BUFFER: Final = ("_preamble", "_preamble_len", "_headers_buffer", "_update_header_buffer")


def _missing() -> str | None:
    """What the installed h2 lacks of what the fast session uses, or None."""
    try:
        import h2
        import h2.config
        import h2.connection
        import h2.frame_buffer
        import h2.stream
        import hpack

        from . import fast_session  # noqa: F401 (its imports of h2 names)

        conn = h2.connection.H2Connection()
        stream = h2.stream.H2Stream(1, h2.config.H2Configuration(), 65_535, 65_535)
        checks = [
            (conn, _CONNECTION),
            (stream, _STREAM),
            (stream.state_machine, _STREAM_MACHINE),
            (h2.frame_buffer.FrameBuffer(server=True), _FRAME_BUFFER),
            (h2.connection.H2ConnectionStateMachine, ("_transitions",)),
            (h2.connection, ("_decode_headers",)),
            (hpack.Encoder(), ("header_table",)),
            (hpack.Decoder(), ("header_table", "max_allowed_table_size")),
        ]
    except (ImportError, AttributeError, TypeError) as exc:
        return f"h2 {_version()}: {exc}"
    for obj, names in checks:
        for name in names:
            if not hasattr(obj, name):
                return f"h2 {_version()} has no {type(obj).__name__}.{name}"
    return None


def _version() -> str:
    try:
        import h2

        return str(h2.__version__)
    except ImportError:
        return "(not installed)"


UNAVAILABLE_REASON: Final = _missing()
FAST_PATHS_AVAILABLE: Final = UNAVAILABLE_REASON is None
if UNAVAILABLE_REASON is not None:
    logging.getLogger("trio_jobs.rpc").warning(
        "rpc fast paths off (%s); using h2's public API only", UNAVAILABLE_REASON
    )
