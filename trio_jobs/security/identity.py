"""Who is on the other end: the subject common name of the verified client certificate.

Only call these on a certificate the TLS layer has verified (``getpeercert()`` returns ``{}``
when nothing was verified, which maps to ``None``). Ambiguity is refused, never resolved: a
subject with no CN or several CNs, an empty CN, a CN over 64 characters (the X.520 upper
bound) or with control/non-printable characters gives ``None``, which the policy turns into
PERMISSION_DENIED.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol

MAX_IDENTITY_LENGTH: Final = 64


class _PeerCertCarrier(Protocol):
    """``ssl.SSLObject``, ``ssl.SSLSocket`` and ``trio.SSLStream`` (after the handshake)."""

    def getpeercert(self, binary_form: bool = False) -> Any: ...


def identity_from_peercert(cert: Mapping[str, Any] | None) -> str | None:
    """The single subject CN of a ``getpeercert()`` dict, or ``None`` if missing or ambiguous."""
    if not cert:
        return None
    subject = cert.get("subject")
    if not isinstance(subject, tuple | list):
        return None
    names: list[object] = []
    for rdn in subject:
        if not isinstance(rdn, tuple | list):
            return None
        for attribute in rdn:
            if not isinstance(attribute, tuple | list) or len(attribute) != 2:
                return None
            if attribute[0] == "commonName":
                names.append(attribute[1])
    if len(names) != 1:
        return None
    name = names[0]
    if not isinstance(name, str) or not name or len(name) > MAX_IDENTITY_LENGTH:
        return None
    if not name.isprintable() or name != name.strip():
        return None
    return name


def peer_identity(conn: _PeerCertCarrier) -> str | None:
    """The identity of the verified peer of a completed TLS connection, or ``None``."""
    cert = conn.getpeercert()
    return identity_from_peercert(cert if isinstance(cert, Mapping) else None)
