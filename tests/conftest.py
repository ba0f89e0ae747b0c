"""Shared test fixtures: a development PKI made once per session, and TLS contexts from it.

- ``dev_pki``: a ``Path`` holding ``{ca,server,admin,alice,bob}.{crt,key}`` (``init_dev_pki``).
- ``server_ssl_context``: a fresh server ``ssl.SSLContext`` for that PKI (per test).
- ``client_ssl_context_for``: ``name -> ssl.SSLContext`` for a client identity of that PKI.
- ``server_ctx(pki)`` / ``client_ctx(pki, name)``: the same, as plain functions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from trio_jobs.security import tls
from trio_jobs.security.pki import init_dev_pki

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable
    from pathlib import Path


def server_ctx(pki: Path) -> ssl.SSLContext:
    return tls.server_ssl_context(
        cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt"
    )


def client_ctx(pki: Path, name: str) -> ssl.SSLContext:
    return tls.client_ssl_context(
        cert=pki / f"{name}.crt", key=pki / f"{name}.key", ca=pki / "ca.crt"
    )


@pytest.fixture(scope="session")
def dev_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = tmp_path_factory.mktemp("dev-pki") / "pki"
    init_dev_pki(pki)
    return pki


@pytest.fixture
def server_ssl_context(dev_pki: Path) -> ssl.SSLContext:
    return server_ctx(dev_pki)


@pytest.fixture
def client_ssl_context_for(dev_pki: Path) -> Callable[[str], ssl.SSLContext]:
    def make(name: str) -> ssl.SSLContext:
        return client_ctx(dev_pki, name)

    return make
