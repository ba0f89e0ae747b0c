"""Security for trio-jobs: PKI, TLS 1.3 contexts, peer identity and authorization policy.

Imports only the standard library and ``cryptography`` (never the worker or rpc layers).
See docs/security.md for the threat model and docs/architecture.md for the interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trio_jobs._lazy import lazy_exports

if TYPE_CHECKING:
    from trio_jobs.security.errors import (
        HandshakeRefused,
        PermissionDenied,
        PkiError,
        PolicyError,
        SecurityError,
        TlsConfigError,
    )
    from trio_jobs.security.identity import identity_from_peercert, peer_identity
    from trio_jobs.security.paths import pki_dir, state_home
    from trio_jobs.security.pki import (
        DEV_IDENTITIES,
        init_dev_pki,
        is_complete_dev_pki,
        issue_client,
        issue_server,
    )
    from trio_jobs.security.policy import (
        DEFAULT_SEARCH_PATH,
        LIMIT_FIELDS,
        IdentityPolicy,
        LimitAboveCap,
        Policy,
        QuotaExceeded,
        UnixUser,
        lookup_unix_user,
    )
    from trio_jobs.security.tls import (
        HANDSHAKE_TIMEOUT,
        client_ssl_context,
        negotiated_h2,
        require_h2,
        server_ssl_context,
    )

# Imported on first use: the client's TLS context must not cost ``cryptography``.
__getattr__ = lazy_exports(__name__, {
    "HandshakeRefused": "errors",
    "PermissionDenied": "errors",
    "PkiError": "errors",
    "PolicyError": "errors",
    "SecurityError": "errors",
    "TlsConfigError": "errors",
    "identity_from_peercert": "identity",
    "peer_identity": "identity",
    "pki_dir": "paths",
    "state_home": "paths",
    "DEV_IDENTITIES": "pki",
    "init_dev_pki": "pki",
    "is_complete_dev_pki": "pki",
    "issue_client": "pki",
    "issue_server": "pki",
    "DEFAULT_SEARCH_PATH": "policy",
    "LIMIT_FIELDS": "policy",
    "IdentityPolicy": "policy",
    "LimitAboveCap": "policy",
    "Policy": "policy",
    "QuotaExceeded": "policy",
    "UnixUser": "policy",
    "lookup_unix_user": "policy",
    "HANDSHAKE_TIMEOUT": "tls",
    "client_ssl_context": "tls",
    "negotiated_h2": "tls",
    "require_h2": "tls",
    "server_ssl_context": "tls",
})

__all__ = [
    "DEFAULT_SEARCH_PATH",
    "DEV_IDENTITIES",
    "HANDSHAKE_TIMEOUT",
    "LIMIT_FIELDS",
    "HandshakeRefused",
    "IdentityPolicy",
    "LimitAboveCap",
    "PermissionDenied",
    "PkiError",
    "Policy",
    "PolicyError",
    "QuotaExceeded",
    "SecurityError",
    "TlsConfigError",
    "UnixUser",
    "client_ssl_context",
    "identity_from_peercert",
    "init_dev_pki",
    "is_complete_dev_pki",
    "issue_client",
    "issue_server",
    "lookup_unix_user",
    "negotiated_h2",
    "peer_identity",
    "pki_dir",
    "require_h2",
    "server_ssl_context",
    "state_home",
]
