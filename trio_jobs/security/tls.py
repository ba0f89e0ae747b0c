"""TLS contexts for mutual TLS 1.3 with ALPN ``h2`` (DESIGN section 3; why in docs/security.md).

Both sides: TLS 1.3 only (``minimum_version``; no maximum so a later version is taken when both
ends have it), peer certificate required and verified against the given CA with strict X.509
checks, ALPN ``h2``, no TLS compression.

Server: the client certificate is required (``CERT_REQUIRED``) and must carry clientAuth
(OpenSSL checks the ``ssl_client`` purpose). No session tickets (``num_tickets = 0``): every
connection is a full handshake that re-verifies the client certificate against the CA and its
validity period, and our clients keep one long-lived connection, so resumption buys nothing.

ALPN is negotiated but OpenSSL still completes a handshake whose client offered no protocol we
accept; the server must therefore close such connections itself: :func:`require_h2`.

The TLS handshake itself belongs to the connection's own task, under a timeout
(:data:`HANDSHAKE_TIMEOUT` is the recommended bound); that is the rpc layer's job.
"""

from __future__ import annotations

import os
import ssl
from typing import TYPE_CHECKING, Final, Protocol

from trio_jobs.security.errors import HandshakeRefused, TlsConfigError

if TYPE_CHECKING:
    StrPath = str | os.PathLike[str]

ALPN_H2: Final = "h2"
HANDSHAKE_TIMEOUT: Final = 10.0  # seconds; a peer that takes longer is dropped


class _AlpnCarrier(Protocol):
    """``ssl.SSLObject``, ``ssl.SSLSocket`` and ``trio.SSLStream`` (after the handshake)."""

    def selected_alpn_protocol(self) -> str | None: ...


def _common(
    ctx: ssl.SSLContext, *, cert: StrPath, key: StrPath, ca: StrPath, strict: bool
) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.verify_mode = ssl.CERT_REQUIRED
    if strict:
        # RFC 5280 conformance checks (e.g. key identifiers present, CA bit consistent).
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    for label, path in (("CA certificate", ca), ("certificate", cert), ("private key", key)):
        if not os.path.isfile(path):
            raise TlsConfigError(f"{label} file {path} does not exist (or is not a file)")
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsConfigError(f"cannot load the CA certificate {ca}: {exc}") from exc
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsConfigError(
            f"cannot load the certificate {cert} with the key {key} (missing, unreadable, or "
            f"not a matching pair): {exc}"
        ) from exc
    ctx.set_alpn_protocols([ALPN_H2])
    return ctx


def server_ssl_context(*, cert: StrPath, key: StrPath, ca: StrPath, strict: bool = True) -> ssl.SSLContext:
    """A server context: TLS 1.3 only, client certificate required and verified, ALPN h2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.num_tickets = 0  # no resumption: re-verify every client certificate (see module doc)
    return _common(ctx, cert=cert, key=key, ca=ca, strict=strict)


def client_ssl_context(*, cert: StrPath, key: StrPath, ca: StrPath, strict: bool = True) -> ssl.SSLContext:
    """A client context: TLS 1.3 only, server host name verified, ALPN h2, our certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname=True, CERT_REQUIRED
    ctx.check_hostname = True
    return _common(ctx, cert=cert, key=key, ca=ca, strict=strict)


def negotiated_h2(conn: _AlpnCarrier) -> bool:
    """True if the completed handshake on ``conn`` selected ALPN ``h2``."""
    return conn.selected_alpn_protocol() == ALPN_H2


def require_h2(conn: _AlpnCarrier) -> None:
    """Raise :class:`HandshakeRefused` unless ALPN ``h2`` was negotiated; the caller closes."""
    selected = conn.selected_alpn_protocol()
    if selected != ALPN_H2:
        raise HandshakeRefused(
            f"the peer did not negotiate ALPN {ALPN_H2!r} (got {selected!r}): "
            "trio-jobs speaks gRPC over HTTP/2 only"
        )
