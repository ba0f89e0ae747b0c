"""Shared reliability fixtures: the e2e ``Host`` (real ``trio-jobs`` processes) per test.

Kept small on purpose: the helpers themselves live in ``tests/e2e/conftest.py``; this only
makes the ``host``/``served`` fixtures available here, plus a bounded p99 helper.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pytest
from e2e.conftest import Host

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path


def p99(samples: Sequence[float]) -> float:
    """The 99th percentile (nearest rank) of ``samples`` (seconds in, seconds out)."""
    if not samples:
        raise ValueError("p99 of no samples")
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    logs = tmp_path / "logs"
    logs.mkdir()
    h = Host(tmp_path / "home", logs)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def served(host: Host) -> Host:
    host.start_server()
    return host
