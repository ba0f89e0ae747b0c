"""Parsing of the human forms the CLI accepts: sizes, rates, counts, CPUs, durations.

Every parser raises :class:`ValueError` with a message that says which forms are accepted,
so argparse turns it into one clear usage error.

- sizes and byte rates: ``512M``, ``1G``, ``1.5G``, ``64k``, ``1048576`` -- the suffixes
  K, M, G, T (optionally followed by ``i``, ``B`` or ``iB``, any case) are powers of 1024,
  as in ``docker run --memory``; a bare number is bytes.
- counts (IOPS, pids): ``1000``, ``10k``, ``1.5M`` -- K and M are powers of 1000 here.
- CPUs: ``1.5`` (one and a half CPUs), ``500m`` (500 milli-CPUs, as in Kubernetes).
- durations: ``5s``, ``500ms``, ``2m``, ``1h``, ``0``, ``1.5`` (a bare number is seconds).
"""

from __future__ import annotations

import math
import re
from typing import Final

_NUMBER: Final = r"(\d+(?:\.\d*)?|\.\d+)"
# Patterns, compiled by re (and cached) when first used: a command that parses no size
# should not compile four patterns at start (~1 ms).
_SIZE: Final = _NUMBER + r"\s*([kmgt]?)(?:i?b|i)?"
_COUNT: Final = _NUMBER + r"\s*([km]?)"
_CPU: Final = _NUMBER + r"\s*(m?)"
_DURATION: Final = _NUMBER + r"\s*(ms|s|m|h|)"

_BINARY: Final = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DECIMAL: Final = {"": 1, "k": 1000, "m": 1_000_000}
_SECONDS: Final = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# Anything larger does not fit the proto's int64 fields; no real limit comes close.
MAX_INT64: Final = (1 << 63) - 1


def _whole(value: float, text: str, what: str) -> int:
    if not math.isfinite(value) or value > MAX_INT64:
        raise ValueError(f"{what} {text!r} is too large")
    result = round(value)
    if result <= 0:
        raise ValueError(f"{what} {text!r} must be greater than zero")
    return result


def parse_size(text: str) -> int:
    """``512M`` -> 536870912. Raises ValueError."""
    m = re.fullmatch(_SIZE, text.strip(), re.IGNORECASE)
    if m is None:
        raise ValueError(f"invalid size {text!r}: use a number of bytes or a suffix K, M, G, T (e.g. 512M, 1.5G)")
    return _whole(float(m.group(1)) * _BINARY[m.group(2).lower()], text, "size")


def parse_count(text: str) -> int:
    """``10k`` -> 10000. Raises ValueError."""
    m = re.fullmatch(_COUNT, text.strip(), re.IGNORECASE)
    if m is None:
        raise ValueError(f"invalid count {text!r}: use a whole number, optionally with k or M (e.g. 4096, 10k)")
    return _whole(float(m.group(1)) * _DECIMAL[m.group(2).lower()], text, "count")


def parse_cpus(text: str) -> int:
    """CPUs as milli-CPUs: ``1.5`` -> 1500, ``500m`` -> 500. Raises ValueError."""
    m = re.fullmatch(_CPU, text.strip(), re.IGNORECASE)
    if m is None:
        raise ValueError(f"invalid CPU amount {text!r}: use a number of CPUs (1.5) or milli-CPUs (500m)")
    value = float(m.group(1))
    return _whole(value if m.group(2) else value * 1000, text, "CPU amount")


def parse_duration(text: str) -> float:
    """Seconds: ``5s`` -> 5.0, ``500ms`` -> 0.5, ``0`` -> 0.0. Raises ValueError."""
    m = re.fullmatch(_DURATION, text.strip(), re.IGNORECASE)
    if m is None:
        if text.strip().startswith("-") and re.fullmatch(_DURATION, text.strip()[1:], re.IGNORECASE):
            raise ValueError(f"duration {text!r} is negative: give 0 or more, e.g. 0 or 5s")
        raise ValueError(f"invalid duration {text!r}: use e.g. 5s, 500ms, 2m, 0 or 1.5 (seconds)")
    seconds = float(m.group(1)) * _SECONDS[m.group(2).lower()]
    if not math.isfinite(seconds) or seconds > 10**9:
        raise ValueError(f"duration {text!r} is too large")
    return seconds


def format_size(n: int) -> str:
    """A short human form of a byte count: 1048576000 -> ``1000M``, 1536 -> ``1.5K``."""
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            value = n / factor
            return f"{value:.0f}{unit}" if value == int(value) or value >= 100 else f"{value:.1f}{unit}"
    return f"{n}B"


def format_duration(seconds: float) -> str:
    """``0.0123`` -> ``12ms``, ``75.5`` -> ``1m15.5s``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)}m{rest:.0f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h{int(minutes)}m"
