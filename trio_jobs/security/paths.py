"""Where trio-jobs keeps its state by default (shared by the server, the CLI and certs-gen).

``TRIO_JOBS_HOME`` if set; else ``$XDG_STATE_HOME/trio-jobs`` (only when that is an absolute
path, as the XDG Base Directory spec requires); else ``~/.local/state/trio-jobs``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path


def state_home(environ: Mapping[str, str] | None = None) -> Path:
    """The trio-jobs state directory (not created here)."""
    from pathlib import Path

    return Path(state_home_name(environ))


def state_home_name(environ: Mapping[str, str] | None = None) -> str:
    """:func:`state_home` as a string, for the one-shot CLI commands, which do not import
    :mod:`pathlib` (with ``urllib.parse`` and ``ipaddress``: ~2 ms of a ~100 ms command)."""
    env = os.environ if environ is None else environ
    explicit = env.get("TRIO_JOBS_HOME", "")
    if explicit:
        return os.path.expanduser(explicit)
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "trio-jobs")
    home = env.get("HOME", "") or os.path.expanduser("~")
    return os.path.join(home, ".local", "state", "trio-jobs")


def pki_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The development PKI directory: ``<state_home>/pki``."""
    return state_home(environ) / "pki"
