"""Where trio-jobs keeps its state by default (shared by the server, the CLI and certs-gen).

``TRIO_JOBS_HOME`` if set; else ``$XDG_STATE_HOME/trio-jobs`` (only when that is an absolute
path, as the XDG Base Directory spec requires); else ``~/.local/state/trio-jobs``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping


def state_home(environ: Mapping[str, str] | None = None) -> Path:
    """The trio-jobs state directory (not created here)."""
    env = os.environ if environ is None else environ
    explicit = env.get("TRIO_JOBS_HOME", "")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "trio-jobs"
    home = env.get("HOME", "") or str(Path.home())
    return Path(home) / ".local" / "state" / "trio-jobs"


def pki_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The development PKI directory: ``<state_home>/pki``."""
    return state_home(environ) / "pki"
