"""gRPC header rules: metadata, grpc-timeout, grpc-message (PROTOCOL-HTTP2.md).

Pure functions, no I/O. Header names and values are ``bytes`` here (h2 runs with
``header_encoding=None``), converted to ``str``/``bytes`` metadata at the edge.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from ._status import Metadata

# Headers that belong to the transport or to gRPC itself, never custom metadata.
RESERVED_HEADERS: Final = frozenset(
    {
        b"content-type",
        b"te",
        b"host",
        b"connection",
        b"user-agent",
        b"content-length",
    }
)

_KEY_RE: Final = re.compile(rb"[0-9a-z_.\-]+\Z")
_ASCII_VALUE_RE: Final = re.compile(rb"[\x20-\x7e]*\Z")


class MetadataError(ValueError):
    """Metadata that cannot be sent or was received malformed."""


def encode_metadata(metadata: Metadata) -> list[tuple[bytes, bytes]]:
    """Custom metadata -> header pairs; raises MetadataError on an invalid key or value."""
    out: list[tuple[bytes, bytes]] = []
    for key, value in metadata:
        k = key.lower().encode("ascii", "replace")
        if not _KEY_RE.match(k) or k.startswith(b"grpc-") or k in RESERVED_HEADERS:
            raise MetadataError(f"invalid or reserved metadata key {key!r}")
        if k.endswith(b"-bin"):
            raw = value.encode() if isinstance(value, str) else bytes(value)
            out.append((k, base64.b64encode(raw)))
        else:
            if not isinstance(value, str):
                raise MetadataError(f"metadata {key!r} must be str (only -bin keys carry bytes)")
            v = value.encode("latin-1", "replace")
            if not value.isascii() or not _ASCII_VALUE_RE.match(v):
                raise MetadataError(f"metadata {key!r} value must be printable ASCII")
            out.append((k, v))
    return out


def decode_metadata(headers: list[tuple[bytes, bytes]]) -> Metadata:
    """Header pairs -> custom metadata, skipping pseudo, reserved and ``grpc-`` headers.

    ``-bin`` values are base64 (padded or not); an undecodable one raises MetadataError.
    """
    out: list[tuple[str, str | bytes]] = []
    for k, v in headers:
        if k.startswith(b":") or k.startswith(b"grpc-") or k in RESERVED_HEADERS:
            continue
        key = k.decode("ascii", "replace")
        if k.endswith(b"-bin"):
            try:
                out.append((key, base64.b64decode(v + b"=" * (-len(v) % 4), validate=True)))
            except binascii.Error as exc:
                raise MetadataError(f"metadata {key!r} is not valid base64") from exc
        else:
            out.append((key, v.decode("latin-1")))
    return tuple(out)


# grpc-timeout: 1 to 8 ASCII digits and a unit.
_TIMEOUT_RE: Final = re.compile(rb"([0-9]{1,8})([HMSmun])\Z")
_TIMEOUT_UNITS: Final[dict[bytes, float]] = {
    b"H": 3600.0,
    b"M": 60.0,
    b"S": 1.0,
    b"m": 1e-3,
    b"u": 1e-6,
    b"n": 1e-9,
}
_MAX_TIMEOUT_VALUE: Final = 99_999_999


def parse_timeout(value: bytes) -> float:
    """``grpc-timeout`` value -> seconds; raises ValueError if malformed."""
    m = _TIMEOUT_RE.match(value)
    if m is None:
        raise ValueError(f"malformed grpc-timeout {value!r}")
    return int(m.group(1)) * _TIMEOUT_UNITS[m.group(2)]


def format_timeout(seconds: float) -> bytes:
    """Seconds -> the finest ``grpc-timeout`` that fits in 8 digits (rounded up)."""
    seconds = max(seconds, 0.0)
    for unit, scale in (("n", 1e-9), ("u", 1e-6), ("m", 1e-3), ("S", 1.0), ("M", 60.0)):
        n = math.ceil(seconds / scale)
        if n <= _MAX_TIMEOUT_VALUE:
            return f"{n}{unit}".encode()
    return f"{min(math.ceil(seconds / 3600.0), _MAX_TIMEOUT_VALUE)}H".encode()


def encode_grpc_message(message: str) -> bytes:
    """Percent-encode: printable ASCII except ``%`` passes, everything else is %XX of UTF-8."""
    raw = message.encode("utf-8", "replace")
    out = bytearray()
    for b in raw:
        if 0x20 <= b <= 0x7E and b != 0x25:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def decode_grpc_message(value: bytes) -> str:
    """Percent-decode leniently: an invalid escape is kept as is (the spec asks so)."""
    if b"%" not in value:
        return value.decode("utf-8", "replace")
    out = bytearray()
    i, n = 0, len(value)
    while i < n:
        b = value[i]
        if b == 0x25 and i + 2 < n and _is_hex(value[i + 1 : i + 3]):
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(b)
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(two: bytes) -> bool:
    return len(two) == 2 and all(c in b"0123456789abcdefABCDEF" for c in two)
