"""Shared test fixtures: a development PKI made once per session, and TLS contexts from it.

- ``dev_pki``: a ``Path`` holding ``{ca,server,admin,alice,bob}.{crt,key}`` (``init_dev_pki``).
- ``server_ssl_context``: a fresh server ``ssl.SSLContext`` for that PKI (per test).
- ``client_ssl_context_for``: ``name -> ssl.SSLContext`` for a client identity of that PKI.
- ``server_ctx(pki)`` / ``client_ctx(pki, name)``: the same, as plain functions.
- ``rpc_mode``: every test under tests/rpc, tests/e2e and tests/interop runs in each of the
  four rpc modes (DESIGN §5: transport lean|ssl-stream x fast paths on|off), set as the
  environment variables the server, the clients and the CLI processes read. A module marked
  ``sans_io`` (protocol objects, no transport) runs with fast paths on and off only; one
  marked ``one_rpc_mode`` (it sets the modes it compares itself, or uses no protocol) once.
  A module elsewhere opts in with ``pytest.mark.rpc_modes`` (the hostile-connection and
  fuzzing tests of tests/reliability).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest

from trio_jobs.security import tls
from trio_jobs.security.pki import init_dev_pki

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

RPC_MODES: Final = {
    "lean-fast": ("lean", "1"),
    "lean-pure": ("lean", "0"),
    "sslstream-fast": ("ssl-stream", "1"),
    "sslstream-pure": ("ssl-stream", "0"),
}
"""Test id -> (TRIO_JOBS_RPC_TRANSPORT, TRIO_JOBS_RPC_FAST_PATHS)."""
_MODE_DIRS: Final = frozenset({"rpc", "e2e", "interop"})
_TESTS: Final = Path(__file__).parent


def _runs_in_every_mode(path: Path) -> bool:
    parts = path.relative_to(_TESTS).parts
    return len(parts) > 1 and parts[0] in _MODE_DIRS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sans_io: rpc protocol objects only (fast paths on/off)")
    config.addinivalue_line("markers", "one_rpc_mode: sets its rpc modes itself (runs once)")
    config.addinivalue_line("markers", "rpc_modes: runs in every rpc mode, outside tests/rpc|e2e|interop")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "rpc_mode" not in metafunc.fixturenames:
        return
    opted_in = metafunc.definition.get_closest_marker("rpc_modes") is not None
    if not (opted_in or _runs_in_every_mode(metafunc.definition.path)):
        return
    sans_io = metafunc.definition.get_closest_marker("sans_io") is not None
    ids = [m for m in RPC_MODES if not (sans_io and m.startswith("sslstream"))]
    if metafunc.definition.get_closest_marker("one_rpc_mode") is not None:
        ids = ids[:1]
    metafunc.parametrize("rpc_mode", ids, indirect=True)


@pytest.fixture(autouse=True)
def rpc_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The rpc mode of this test run (see the module docstring); None outside those dirs."""
    name: str | None = getattr(request, "param", None)
    if name is not None:
        transport, fast = RPC_MODES[name]
        monkeypatch.setenv("TRIO_JOBS_RPC_TRANSPORT", transport)
        monkeypatch.setenv("TRIO_JOBS_RPC_FAST_PATHS", fast)
    return name


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
