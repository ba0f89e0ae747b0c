"""SIGHUP on a real ``trio-jobs serve``: policy, certificates, all or nothing (issue #17).

Each test starts the server with ``$NOTIFY_SOCKET`` pointing at a test socket, so the end of
a reload is seen exactly (``RELOADING=1``, then ``READY=1``) instead of being waited for.
Connections opened *before* the reload are real ``JobsClient`` connections (one TLS
connection each, never reconnected), so "open connections are untouched" and "a removed
identity is refused on its next call, on an old connection too" are observed on the very
connection that existed before.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
from typing import TYPE_CHECKING, Final

import pytest
import trio
from cryptography import x509

from trio_jobs.cli.errors import EXIT_DENIED
from trio_jobs.client import JobsClient, JobsError
from trio_jobs.rpc import StatusCode
from trio_jobs.security.pki import init_dev_pki, issue_server
from trio_jobs.security.tls import client_ssl_context

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path

    from e2e.conftest import Host

    from operations._systemd import NotifyListener

pytestmark = pytest.mark.slow

DEFAULTS: Final = '[defaults]\nprograms = ["*"]\n\n'
ADMIN: Final = DEFAULTS + '[identities.admin]\nadmin = true\nrun_as = ""\n\n'
ALICE: Final = "[identities.alice]\n\n"
BOB: Final = "[identities.bob]\n\n"


def write_atomically(path: Path, data: bytes) -> None:
    """As an operator's deploy tool does: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def reload(host: Host, notify: NotifyListener) -> None:
    """SIGHUP, then wait until the server says the reload is over (applied or not)."""
    assert host.server is not None
    host.server.send_signal(signal.SIGHUP)
    notify.expect("RELOADING=1")
    notify.expect("READY=1")


def reload_lines(host: Host) -> list[str]:
    """The server's log lines about reloads (success or failure)."""
    return [ln for ln in host.server_stderr().splitlines() if "trio-jobs: reloaded:" in ln or " reload failed" in ln]


def handshake_serial(address: str, pki: Path, identity: str = "admin") -> int:
    """Serial number of the certificate the server presents to a new TLS handshake."""
    ip, port = address.rsplit(":", 1)
    ctx = client_ssl_context(cert=pki / f"{identity}.crt", key=pki / f"{identity}.key", ca=pki / "ca.crt")
    with socket.create_connection((ip, int(port)), timeout=30) as raw, ctx.wrap_socket(raw, server_hostname=ip) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def file_serial(cert: Path) -> int:
    return x509.load_pem_x509_certificate(cert.read_bytes()).serial_number


def client(host: Host, pki: Path, identity: str) -> AbstractAsyncContextManager[JobsClient]:
    """One TLS connection as ``identity`` (JobsClient never reconnects a unary call)."""
    return JobsClient.connect(host.address, cert=pki / f"{identity}.crt", key=pki / f"{identity}.key", ca=pki / "ca.crt")


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(ADMIN + ALICE + BOB)
    return path


async def test_removed_identity_is_refused_at_once_and_its_job_keeps_running(
    host: Host, notify_socket: NotifyListener, policy_file: Path
) -> None:
    await trio.to_thread.run_sync(host.start_server, "--policy", str(policy_file))
    notify_socket.expect("READY=1")
    pki = host.home / "pki"
    job = await trio.to_thread.run_sync(lambda: host.start("sleep", "300", identity="alice"))
    async with client(host, pki, "alice") as alice:
        assert (await alice.status(job)).state == "running"  # the connection is up

        write_atomically(policy_file, (ADMIN + BOB).encode())
        await trio.to_thread.run_sync(reload, host, notify_socket)

        # The connection opened before the reload: refused on its next call.
        with pytest.raises(JobsError) as refused:
            await alice.status(job)
        assert refused.value.code == StatusCode.PERMISSION_DENIED, refused.value
        assert "alice" in refused.value.message
    # A new connection too.
    denied = await trio.to_thread.run_sync(lambda: host.run("status", job, identity="alice", check=False))
    assert denied.returncode == EXIT_DENIED, denied.stderr
    # The job is untouched and the admin still sees it.
    shown = await trio.to_thread.run_sync(lambda: host.run("status", job, identity="admin"))
    assert b"running" in shown.stdout, shown.stdout
    listed = await trio.to_thread.run_sync(lambda: host.run("list", "--all", identity="admin"))
    assert job.encode() in listed.stdout
    # bob, still in the policy, is served as before.
    await trio.to_thread.run_sync(lambda: host.run("list", identity="bob"))

    lines = reload_lines(host)
    assert len(lines) == 1, host.server_stderr()
    line = lines[0]
    assert f"reloaded: policy {policy_file} (2 identities)" in line, line
    assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for m in notify_socket.received), notify_socket.received

    stopped = await trio.to_thread.run_sync(lambda: host.run("stop", job, "--grace", "0", identity="admin"))
    assert stopped.returncode == 0


@pytest.mark.parametrize("broken", ["invalid TOML", "unknown run_as user", "key of another certificate"])
async def test_a_broken_reload_keeps_all_the_old_configuration(
    host: Host, notify_socket: NotifyListener, policy_file: Path, broken: str
) -> None:
    await trio.to_thread.run_sync(host.start_server, "--policy", str(policy_file))
    notify_socket.expect("READY=1")
    pki = host.home / "pki"
    old_serial = await trio.to_thread.run_sync(handshake_serial, host.address, pki)
    assert old_serial == file_serial(pki / "server.crt")

    # Every reload changes two things at once: the policy drops alice and the server gets a
    # new certificate. One of them is broken; neither may take effect.
    new_policy = ADMIN + BOB
    issue_server(pki, force=True)
    if broken == "invalid TOML":
        new_policy += "[identities.carol\n"
    elif broken == "unknown run_as user":
        new_policy += '[identities.carol]\nrun_as = "no-such-user-trio-jobs"\n'
    else:
        shutil.copy(pki / "alice.key", pki / "server.key")  # a key that does not match server.crt
    write_atomically(policy_file, new_policy.encode())
    await trio.to_thread.run_sync(reload, host, notify_socket)

    lines = reload_lines(host)
    assert len(lines) == 1, host.server_stderr()  # exactly one line, saying why
    line = lines[0]
    assert "reload failed, keeping the old configuration" in line, line
    why = "server certificate" if broken == "key of another certificate" else str(policy_file)
    assert why in line, line
    assert "Traceback" not in host.server_stderr()
    # Still serving, with the old policy (alice allowed) and the old certificate.
    job = await trio.to_thread.run_sync(lambda: host.start("true", identity="alice"))
    assert job
    assert await trio.to_thread.run_sync(handshake_serial, host.address, pki) == old_serial


async def test_rotated_certificates_serve_new_handshakes_and_leave_open_connections(
    host: Host, notify_socket: NotifyListener, tmp_path: Path
) -> None:
    pki = tmp_path / "pki"
    init_dev_pki(pki)
    await trio.to_thread.run_sync(host.start_server, "--pki", str(pki))
    notify_socket.expect("READY=1")
    first = file_serial(pki / "server.crt")
    assert await trio.to_thread.run_sync(handshake_serial, host.address, pki) == first
    old_pki = tmp_path / "old-pki"
    shutil.copytree(pki, old_pki)

    async with client(host, old_pki, "admin") as before:
        await before.list()

        # 1. A new server certificate from the same CA.
        issue_server(pki, force=True)
        second = file_serial(pki / "server.crt")
        assert second != first
        await trio.to_thread.run_sync(reload, host, notify_socket)
        assert await trio.to_thread.run_sync(handshake_serial, host.address, pki) == second
        await before.list()  # the connection from before still works

        # 2. A new CA: server certificate and client certificates all from it.
        new_pki = tmp_path / "new-pki"
        init_dev_pki(new_pki)
        for name in ("ca.crt", "server.key", "server.crt"):
            write_atomically(pki / name, (new_pki / name).read_bytes())
        await trio.to_thread.run_sync(reload, host, notify_socket)
        assert await trio.to_thread.run_sync(handshake_serial, host.address, new_pki) == file_serial(
            new_pki / "server.crt"
        )
        # A client of the old CA cannot make a new connection any more...
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await trio.to_thread.run_sync(handshake_serial, host.address, old_pki)
        # ...while its connection from before the rotation is untouched.
        assert await before.list() == await before.list()
        async with client(host, new_pki, "admin") as after:
            await after.list()

    lines = reload_lines(host)
    assert len(lines) == 2, lines
    assert all("reloaded: built-in policy unchanged; server certificate" in ln for ln in lines), lines
    assert f"serial {second:#x}" in lines[0], lines[0]
