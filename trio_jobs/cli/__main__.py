"""``python -m trio_jobs.cli`` is the ``trio-jobs`` command."""

from __future__ import annotations

from .main import run

run()
