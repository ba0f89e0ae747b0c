"""The exceptions of the security layer: one base, one subclass per kind of failure.

Nothing from :mod:`ssl` or :mod:`cryptography` escapes the public API of this package: loading
and generating keys and certificates translates those errors into these, ``from`` the original.
"""

from __future__ import annotations


class SecurityError(Exception):
    """Base of every error raised by :mod:`trio_jobs.security`."""


class PkiError(SecurityError):
    """A key or certificate could not be generated, written or read (message says what to do)."""


class TlsConfigError(SecurityError):
    """A TLS context could not be built from the given certificate, key and CA files."""


class HandshakeRefused(SecurityError):
    """A TLS connection completed but does not meet our requirements (e.g. no ALPN ``h2``)."""


class PermissionDenied(SecurityError):
    """The identity may not do this (maps to gRPC PERMISSION_DENIED)."""


class PolicyError(SecurityError):
    """The authorization policy file (or a user it names) is invalid."""
