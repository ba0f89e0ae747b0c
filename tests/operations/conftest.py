"""Fixtures of the operations tests: the e2e ``Host`` (a real ``trio-jobs serve`` per test)
and ``notify_socket`` (a stand-in for systemd's ``$NOTIFY_SOCKET``, ``_systemd.py``)."""

from __future__ import annotations

from e2e.conftest import host, served  # noqa: F401  (fixtures shared with tests/e2e)

from operations._systemd import notify_socket  # noqa: F401
