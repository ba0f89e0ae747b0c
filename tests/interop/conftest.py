"""The interop tests run real servers with the end-to-end tests' fixtures."""

from __future__ import annotations

from e2e.conftest import host, served  # noqa: F401  (fixtures shared with tests/e2e)
