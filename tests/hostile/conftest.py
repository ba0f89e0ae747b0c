"""Attacks by a hostile authenticated user (and a hostile local user) against a real root
``trio-jobs serve``: each test performs the attack for real and proves it fails (DESIGN §3).

The server fixtures are the end-to-end ones (tests/e2e/conftest.py): the real entry point in a
subprocess, its own TRIO_JOBS_HOME and cgroup parent.
"""

from __future__ import annotations

from e2e.conftest import Host, host, served  # noqa: F401  (fixtures shared with tests/e2e)
