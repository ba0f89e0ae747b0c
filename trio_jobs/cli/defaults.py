"""The library's defaults, as the command line applies and quotes them.

An option whose default is the library's has none in the parser (main.py): it is None when
not given, ``serve`` then takes the library's value (:func:`fill_serve_defaults`), and its
help quotes that value with ``{default:NAME}``, filled in by :func:`fill` only when help is
shown. So every number lives in the library alone, and building the parser imports nothing:
a one-shot command must not pay for the worker, the server or trio
(tests/cli/test_oneshot_imports.py); each value below imports only its own module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, TypeAlias

from . import units

if TYPE_CHECKING:
    import argparse

MARK: Final = re.compile(r"\{default:(\w+)\}")


def _server_config(name: str) -> object:
    """A field's default in ``ServerConfig``: what ``serve()`` does unless told."""
    from dataclasses import fields

    from ..server import ServerConfig

    (field,) = (f for f in fields(ServerConfig) if f.name == name)
    return field.default


def _rpc_limit(name: str) -> object:
    from ..rpc import ServerLimits

    return getattr(ServerLimits(), name)


def _retention(name: str) -> object:
    from ..worker.retention import DEFAULT_RETENTION

    return getattr(DEFAULT_RETENTION, name)


def _job_limit(name: str) -> object:
    from ..worker import DEFAULT_LIMITS

    return getattr(DEFAULT_LIMITS, name)


def _client(name: str) -> object:
    from ..calls import DEFAULT_SERVER
    from .common import DEFAULT_IDENTITY

    return {"server": DEFAULT_SERVER, "identity": DEFAULT_IDENTITY}[name]


def _count(n: int) -> str:
    """``100000`` -> ``100k``, as ``--retain-jobs`` also reads it."""
    return f"{n // 1000}k" if n >= 10_000 and n % 1000 == 0 else str(n)


def _duration(seconds: float) -> str:
    """``2592000`` -> ``30d``, ``300`` -> ``5m``, ``10`` -> ``10s``: as the options read it."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return units.format_duration(seconds)


def _cpus(millis: int) -> str:
    return f"{millis / 1000:g}"


# NAME of ``{default:NAME}`` -> (where the library keeps the value, the field there, how the
# help shows it). For serve, NAME is the option's argparse dest.
_Entry: TypeAlias = tuple[Callable[[str], object], str, Callable[[Any], str]]
_SERVE: Final[dict[str, _Entry]] = {
    "host": (_server_config, "host", str),
    "port": (_server_config, "port", str),
    "max_streams_per_identity": (_server_config, "max_streams_per_identity", str),
    "retain_jobs": (_retention, "max_jobs", _count),
    "retain_output": (_retention, "max_output_bytes", units.format_size),
    "retain_for": (_retention, "max_age", _duration),
    "handshake_timeout": (_rpc_limit, "handshake_timeout", _duration),
    "max_connections": (_rpc_limit, "max_connections", str),
    "max_connections_per_source": (_rpc_limit, "max_connections_per_source", str),
    "max_handshakes_per_source": (_rpc_limit, "max_handshakes_per_source", str),
    "idle_timeout": (_rpc_limit, "idle_timeout", _duration),
}
_OTHERS: Final[dict[str, _Entry]] = {
    # start (the server applies them to unset limits)
    "cpus": (_job_limit, "cpu_millis", _cpus),
    "memory": (_job_limit, "memory_bytes", units.format_size),
    "pids": (_job_limit, "pids_max", str),
    # client commands
    "server": (_client, "server", str),
    "identity": (_client, "identity", str),
}
_DEFAULTS: Final = {**_SERVE, **_OTHERS}

SERVE_OPTIONS: Final = tuple(_SERVE)
"""The options of ``serve`` (argparse dests) whose default is the library's."""


def value(name: str) -> object:
    """The library's default that ``{default:NAME}`` quotes."""
    where, field, _ = _DEFAULTS[name]
    return where(field)


def quote(name: str) -> str:
    """That default as the help shows it (and as the option would read it)."""
    default = value(name)
    return "none" if default is None else _DEFAULTS[name][2](default)


def fill(text: str, *, percent: bool = False) -> str:
    """``text`` with each ``{default:NAME}`` replaced by :func:`quote` of NAME (with
    ``percent``: any ``%`` in it doubled, for a text that is %-formatted next)."""
    if percent:
        return MARK.sub(lambda m: quote(m.group(1)).replace("%", "%%"), text)
    return MARK.sub(lambda m: quote(m.group(1)), text)


def fill_serve_defaults(args: argparse.Namespace) -> None:
    """Set each ``serve`` option that was not given to the library's default."""
    for dest in SERVE_OPTIONS:
        if getattr(args, dest) is None:
            setattr(args, dest, value(dest))
