"""Real mutual TLS over loopback: who gets through the handshake and who is refused.

A tiny trio TLS server built from :func:`server_ssl_context` + :func:`require_h2` accepts one
connection, handshakes in its own task under a timeout, and only then runs the "handler" (which
sends ``ok``). Every refusal is checked on both ends: the server saw the specific TLS error (so
it is this check that refused, not some other failure), the handler never ran, and the client
never got application data.
"""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.security import (
    HandshakeRefused,
    TlsConfigError,
    negotiated_h2,
    peer_identity,
    require_h2,
    tls,
)
from trio_jobs.security.pki import (
    generate_ca,
    generate_client,
    load_pair,
    write_pair,
)

if TYPE_CHECKING:
    from pathlib import Path

    from trio_jobs.security.pki import CertifiedKey

BOUND = 10  # seconds: an upper bound only, never a wait


@dataclass
class Outcome:
    server_error: BaseException | None = None
    identity: str | None = None
    handler_ran: bool = False
    client_error: BaseException | None = None
    client_data: bytes = b""
    alpn: str | None = None
    done: trio.Event = field(default_factory=trio.Event)


def _reason(exc: BaseException | None) -> str:
    """The text of the ssl error under a trio error (the TLS alert / verify reason)."""
    parts: list[str] = []
    while exc is not None:
        parts.append(str(exc))
        if isinstance(exc, ssl.SSLCertVerificationError):
            parts.append(str(exc.verify_message))
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


async def handshake(
    sctx: ssl.SSLContext, cctx: ssl.SSLContext, *, server_hostname: str = "localhost"
) -> Outcome:
    out = Outcome()
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    listener = listeners[0]
    port = listener.socket.getsockname()[1]

    async def serve_one() -> None:
        tcp = await listener.accept()
        stream = trio.SSLStream(tcp, sctx, server_side=True)
        try:
            with trio.fail_after(BOUND):
                await stream.do_handshake()
            require_h2(stream)
            out.identity = peer_identity(stream)
            out.handler_ran = True
            await stream.send_all(b"ok")
            await stream.aclose()
        except (trio.BrokenResourceError, HandshakeRefused) as exc:
            out.server_error = exc
            await trio.aclose_forcefully(stream)
        finally:
            await listener.aclose()
            out.done.set()

    async def client() -> None:
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, cctx, server_hostname=server_hostname)
        try:
            await stream.do_handshake()
            out.alpn = stream.selected_alpn_protocol()
            while chunk := await stream.receive_some():
                out.client_data += chunk
        except trio.BrokenResourceError as exc:
            out.client_error = exc
        finally:
            await trio.aclose_forcefully(stream)

    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_one)
            nursery.start_soon(client)
    return out


def server_ctx(pki: Path) -> ssl.SSLContext:
    return tls.server_ssl_context(
        cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt"
    )


def client_ctx(pki: Path, name: str) -> ssl.SSLContext:
    return tls.client_ssl_context(
        cert=pki / f"{name}.crt", key=pki / f"{name}.key", ca=pki / "ca.crt"
    )


def assert_refused(out: Outcome, reason: str) -> None:
    assert out.server_error is not None, "the server accepted the connection"
    assert reason.lower() in _reason(out.server_error).lower(), _reason(out.server_error)
    assert not out.handler_ran
    assert out.client_data == b""


def _ctx_with(dev_pki: Path, tmp_path: Path, pair: CertifiedKey, stem: str) -> ssl.SSLContext:
    write_pair(tmp_path, stem, pair)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(dev_pki / "ca.crt"))
    ctx.load_cert_chain(tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key")
    ctx.set_alpn_protocols(["h2"])
    return ctx


@pytest.mark.parametrize("name", ["admin", "alice", "bob"])
async def test_dev_identities_get_through_with_h2(dev_pki: Path, name: str) -> None:
    out = await handshake(server_ctx(dev_pki), client_ctx(dev_pki, name))
    assert out.server_error is None
    assert out.identity == name
    assert out.handler_ran
    assert out.alpn == "h2"
    assert out.client_data == b"ok"


async def test_ip_san_verifies(dev_pki: Path) -> None:
    out = await handshake(
        server_ctx(dev_pki), client_ctx(dev_pki, "alice"), server_hostname="127.0.0.1"
    )
    assert out.client_data == b"ok"


async def test_client_refuses_a_server_name_not_in_the_sans(dev_pki: Path) -> None:
    out = await handshake(
        server_ctx(dev_pki), client_ctx(dev_pki, "alice"), server_hostname="not-this-host.example"
    )
    assert "hostname mismatch" in _reason(out.client_error).lower()
    assert not out.handler_ran


async def test_tls12_only_client_is_refused(dev_pki: Path) -> None:
    cctx = client_ctx(dev_pki, "alice")
    cctx.minimum_version = ssl.TLSVersion.TLSv1_2
    cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    out = await handshake(server_ctx(dev_pki), cctx)
    assert_refused(out, "unsupported protocol")
    assert out.client_error is not None


async def test_client_without_certificate_is_refused(dev_pki: Path) -> None:
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(cafile=str(dev_pki / "ca.crt"))
    cctx.set_alpn_protocols(["h2"])
    out = await handshake(server_ctx(dev_pki), cctx)
    assert_refused(out, "peer did not return a certificate")


async def test_certificate_from_another_ca_is_refused(dev_pki: Path, tmp_path: Path) -> None:
    other = generate_ca("another CA")
    cctx = _ctx_with(dev_pki, tmp_path, generate_client(other, "alice"), "alice")
    out = await handshake(server_ctx(dev_pki), cctx)
    assert_refused(out, "unable to get local issuer certificate")


async def test_expired_certificate_is_refused(dev_pki: Path, tmp_path: Path) -> None:
    ca = load_pair(dev_pki, "ca")
    now = dt.datetime.now(dt.UTC)
    pair = generate_client(
        ca, "alice", not_before=now - dt.timedelta(days=400), not_after=now - dt.timedelta(days=1)
    )
    out = await handshake(server_ctx(dev_pki), _ctx_with(dev_pki, tmp_path, pair, "alice"))
    assert_refused(out, "certificate has expired")


async def test_not_yet_valid_certificate_is_refused(dev_pki: Path, tmp_path: Path) -> None:
    ca = load_pair(dev_pki, "ca")
    now = dt.datetime.now(dt.UTC)
    pair = generate_client(
        ca, "alice", not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=30)
    )
    out = await handshake(server_ctx(dev_pki), _ctx_with(dev_pki, tmp_path, pair, "alice"))
    assert_refused(out, "certificate is not yet valid")


async def test_server_certificate_as_client_certificate_is_refused(dev_pki: Path) -> None:
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.load_verify_locations(cafile=str(dev_pki / "ca.crt"))
    cctx.load_cert_chain(dev_pki / "server.crt", dev_pki / "server.key")
    cctx.set_alpn_protocols(["h2"])
    out = await handshake(server_ctx(dev_pki), cctx)
    assert_refused(out, "unsuitable certificate purpose")


async def test_client_certificate_cannot_serve(dev_pki: Path, tmp_path: Path) -> None:
    """The mirror image: a client certificate presented by a server fails the client's check."""
    ca = load_pair(dev_pki, "ca")
    tmp = tmp_path
    write_pair(tmp, "alice-as-server", generate_client(ca, "alice"))
    sctx = tls.server_ssl_context(
        cert=tmp / "alice-as-server.crt", key=tmp / "alice-as-server.key", ca=dev_pki / "ca.crt"
    )
    out = await handshake(sctx, client_ctx(dev_pki, "alice"))
    assert "unsuitable certificate purpose" in _reason(out.client_error).lower()
    assert out.client_data == b""


@pytest.mark.parametrize("alpn", [["http/1.1"], []])
async def test_client_without_h2_alpn_is_closed(dev_pki: Path, alpn: list[str]) -> None:
    cctx = client_ctx(dev_pki, "alice")
    cctx.set_alpn_protocols(alpn)
    out = await handshake(server_ctx(dev_pki), cctx)
    assert isinstance(out.server_error, HandshakeRefused)
    assert_refused(out, "did not negotiate ALPN 'h2'")
    assert out.alpn is None


async def test_server_offers_no_session_tickets(dev_pki: Path) -> None:
    """Every connection is a full handshake that re-verifies the client certificate."""
    assert server_ctx(dev_pki).num_tickets == 0


def test_context_errors_name_the_file(dev_pki: Path, tmp_path: Path) -> None:
    crt, key, ca = dev_pki / "alice.crt", dev_pki / "alice.key", dev_pki / "ca.crt"
    with pytest.raises(TlsConfigError, match=r"CA certificate file .*nope\.crt does not exist"):
        tls.client_ssl_context(cert=crt, key=key, ca=tmp_path / "nope.crt")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match="cannot load the CA certificate"):
        tls.server_ssl_context(cert=crt, key=key, ca=garbage)
    with pytest.raises(TlsConfigError, match="not a matching pair"):
        tls.client_ssl_context(cert=crt, key=dev_pki / "bob.key", ca=ca)
    with pytest.raises(TlsConfigError, match="private key file"):
        tls.client_ssl_context(cert=crt, key=tmp_path, ca=ca)


def test_contexts_are_tls13_only_with_h2(dev_pki: Path) -> None:
    for ctx in (server_ctx(dev_pki), client_ctx(dev_pki, "alice")):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_COMPRESSION
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
    assert client_ctx(dev_pki, "alice").check_hostname


class _Alpn:
    def __init__(self, selected: str | None) -> None:
        self.selected = selected

    def selected_alpn_protocol(self) -> str | None:
        return self.selected


def test_require_h2() -> None:
    assert negotiated_h2(_Alpn("h2"))
    require_h2(_Alpn("h2"))
    for other in (None, "http/1.1", "h2c"):
        assert not negotiated_h2(_Alpn(other))
        with pytest.raises(HandshakeRefused):
            require_h2(_Alpn(other))
