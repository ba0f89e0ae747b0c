"""Security for trio-jobs: PKI, TLS 1.3 contexts, peer identity and authorization policy.

Imports only the standard library and ``cryptography`` (never the worker or rpc layers).
See docs/security.md for the threat model and docs/architecture.md for the interface.
"""

from __future__ import annotations

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
