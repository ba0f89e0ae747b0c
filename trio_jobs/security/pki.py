"""A small PKI for trio-jobs: one CA, one server certificate, one certificate per client identity.

Choices (DESIGN section 3, docs/security.md):

- ECDSA P-256 keys, SHA-256 signatures: universally supported by TLS 1.3 stacks, small, fast.
- CA: ``CA:true, pathlen:0`` (critical; it signs leaves only), keyCertSign + cRLSign, 5 years.
- Server: SANs (localhost, 127.0.0.1, ::1, the host name, plus any extra), serverAuth, 1 year.
- Client: subject CN = the identity, clientAuth, 1 year. A client certificate cannot serve and a
  server certificate cannot authenticate a client (OpenSSL checks the EKU purpose).
- Random 159-bit serials; ``notBefore`` five minutes in the past (clock skew between hosts);
  Subject/Authority Key Identifiers on every certificate (needed by strict X.509 verification).
- Keys are written 0600 from the moment the file exists (created with that mode, written to a
  temporary name, fsynced, then renamed/linked into place, and the directory fsynced), so a crash
  never leaves a truncated key and no other user can ever open one. Nothing is overwritten
  without ``force``. New PKI directories are 0700. No key ever ships inside the package.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from trio_jobs.security.errors import PkiError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

DEV_IDENTITIES: Final = ("admin", "alice", "bob")
CA_VALIDITY: Final = dt.timedelta(days=5 * 365 + 1)
LEAF_VALIDITY: Final = dt.timedelta(days=365)
BACKDATE: Final = dt.timedelta(minutes=5)
CA_STEM: Final = "ca"
SERVER_STEM: Final = "server"
DEFAULT_SANS: Final = ("localhost", "127.0.0.1", "::1")

# Identities become file names and job owners: keep them to a boring, unambiguous alphabet.
_IDENTITY_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_DNS_LABEL_RE: Final = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True, kw_only=True)
class CertifiedKey:
    """A private key and the certificate for it."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _validity(
    not_before: dt.datetime | None, not_after: dt.datetime | None, lifetime: dt.timedelta
) -> tuple[dt.datetime, dt.datetime]:
    start = not_before if not_before is not None else _now() - BACKDATE
    end = not_after if not_after is not None else start + BACKDATE + lifetime
    if end <= start:
        raise PkiError(f"certificate validity is empty: notAfter {end} <= notBefore {start}")
    return start, end


def check_identity_name(name: str) -> str:
    """Return ``name`` if it is usable as a client identity (and file name), else raise."""
    if not _IDENTITY_RE.fullmatch(name):
        raise PkiError(
            f"invalid identity {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ @ -, "
            "starting with a letter or digit"
        )
    if name.lower() in (CA_STEM, SERVER_STEM):
        raise PkiError(f"invalid identity {name!r}: the name is reserved for the PKI itself")
    return name


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        pass
    name = san.lower().rstrip(".")
    labels = name.split(".")
    if labels and labels[0] == "*":
        labels = labels[1:]  # a leading wildcard label is allowed
    if (
        not name
        or len(name) > 253
        or not labels
        or not all(_DNS_LABEL_RE.fullmatch(x) for x in labels)
    ):
        raise PkiError(
            f"invalid subject alternative name {san!r}: give a DNS name or an IP address"
        )
    return x509.DNSName(name)


def server_sans(extra: Iterable[str] = ()) -> list[x509.GeneralName]:
    """The SANs of a server certificate: the defaults, this host's name, then ``extra``."""
    result: list[x509.GeneralName] = []
    for san in DEFAULT_SANS:
        result.append(_general_name(san))
    host = socket.gethostname()
    with contextlib.suppress(PkiError):  # a host name that is not a valid DNS name is skipped
        result.append(_general_name(host))
    for san in extra:  # explicit names must be valid
        result.append(_general_name(san))
    unique: list[x509.GeneralName] = []
    for item in result:
        if item not in unique:
            unique.append(item)
    return unique


def generate_ca(
    common_name: str = "trio-jobs development CA",
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> CertifiedKey:
    """A new self-signed CA: ``CA:true, pathlen:0``, keyCertSign + cRLSign, 5 years."""
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(not_before, not_after, CA_VALIDITY)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(key=key, cert=cert)


def _leaf(
    ca: CertifiedKey,
    *,
    common_name: str,
    eku: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
    not_before: dt.datetime | None,
    not_after: dt.datetime | None,
) -> CertifiedKey:
    key = ec.generate_private_key(ec.SECP256R1())
    start, end = _validity(not_before, not_after, LEAF_VALIDITY)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return CertifiedKey(key=key, cert=builder.sign(ca.key, hashes.SHA256()))


def generate_server(
    ca: CertifiedKey,
    *,
    sans: Sequence[str] = (),
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> CertifiedKey:
    """A server certificate signed by ``ca``: default SANs + host name + ``sans``, serverAuth."""
    return _leaf(
        ca,
        common_name="trio-jobs server",
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        sans=server_sans(sans),
        not_before=not_before,
        not_after=not_after,
    )


def generate_client(
    ca: CertifiedKey,
    name: str,
    *,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> CertifiedKey:
    """A client certificate signed by ``ca`` with subject CN = ``name``, clientAuth."""
    return _leaf(
        ca,
        common_name=check_identity_name(name),
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        sans=(),
        not_before=not_before,
        not_after=not_after,
    )


# --- files -------------------------------------------------------------------------------------


def pair_paths(pki_dir: Path, stem: str) -> tuple[Path, Path]:
    """``(<dir>/<stem>.crt, <dir>/<stem>.key)``."""
    return pki_dir / f"{stem}.crt", pki_dir / f"{stem}.key"


def _ensure_dir(pki_dir: Path) -> None:
    """Create the directory 0700 if missing. An existing directory's mode is left alone."""
    try:
        pki_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            pki_dir.mkdir(mode=0o700)
        except FileExistsError:
            if not pki_dir.is_dir():
                raise PkiError(f"{pki_dir} exists and is not a directory") from None
        else:
            os.chmod(pki_dir, 0o700)  # mkdir's mode is filtered by the umask; be exact
    except OSError as exc:
        raise PkiError(f"cannot create the PKI directory {pki_dir}: {exc.strerror or exc}") from exc


def _refuse_existing(paths: Iterable[Path], force: bool) -> None:
    if force:
        return
    existing = [p for p in paths if os.path.lexists(p)]
    if existing:
        names = ", ".join(p.name for p in existing)
        raise PkiError(
            f"refusing to overwrite {names} in {existing[0].parent} (use --force to replace)"
        )


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` so that it appears complete, with ``mode``, or not at all.

    The temporary file is created with ``mode`` (never wider), so a private key is never
    readable by anyone else, not even for an instant. Without ``force`` an existing ``path`` is
    never replaced (hard link, which fails atomically if the name is taken).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if force:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PkiError(f"refusing to overwrite {path} (use --force to replace)") from None
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from exc


def write_pair(
    pki_dir: Path, stem: str, pair: CertifiedKey, *, force: bool = False
) -> tuple[Path, Path]:
    """Write ``<stem>.key`` (0600) then ``<stem>.crt`` (0644); return their paths."""
    crt, key = pair_paths(pki_dir, stem)
    _refuse_existing((crt, key), force)
    write_file_atomic(key, pair.key_pem(), mode=0o600, force=force)
    write_file_atomic(crt, pair.cert_pem(), mode=0o644, force=force)
    return crt, key


def load_pair(pki_dir: Path, stem: str) -> CertifiedKey:
    """Read ``<stem>.crt`` and ``<stem>.key``; check that they belong together."""
    crt, key = pair_paths(pki_dir, stem)
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(
            f"{exc.filename} does not exist: create the PKI first (certs-gen init --dir {pki_dir})"
        ) from exc
    except OSError as exc:
        raise PkiError(f"cannot read {exc.filename}: {exc.strerror or exc}") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PkiError(f"cannot parse {crt} / {key}: {exc}") from exc
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{key} is not an ECDSA key")
    if private.public_key() != cert.public_key():
        raise PkiError(f"{key} does not belong to {crt}")
    return CertifiedKey(key=private, cert=cert)


def issue_client(pki_dir: Path, name: str, *, force: bool = False) -> tuple[Path, Path]:
    """Issue ``<name>.crt``/``<name>.key`` signed by the CA in ``pki_dir``; return the paths."""
    check_identity_name(name)
    _refuse_existing(pair_paths(pki_dir, name), force)
    ca = load_pair(pki_dir, CA_STEM)
    return write_pair(pki_dir, name, generate_client(ca, name), force=force)


def issue_server(
    pki_dir: Path, *, sans: Sequence[str] = (), force: bool = False
) -> tuple[Path, Path]:
    """Issue ``server.crt``/``server.key`` signed by the CA in ``pki_dir``; return the paths."""
    server_sans(sans)  # validate before touching anything
    _refuse_existing(pair_paths(pki_dir, SERVER_STEM), force)
    ca = load_pair(pki_dir, CA_STEM)
    return write_pair(pki_dir, SERVER_STEM, generate_server(ca, sans=sans), force=force)


def init_dev_pki(pki_dir: Path, *, force: bool = False, sans: Sequence[str] = ()) -> None:
    """Create ``pki_dir/{ca,server,admin,alice,bob}.{crt,key}``; refuse to overwrite without force."""
    server_sans(sans)  # validate before touching anything
    stems = (CA_STEM, SERVER_STEM, *DEV_IDENTITIES)
    _refuse_existing((p for stem in stems for p in pair_paths(pki_dir, stem)), force)
    _ensure_dir(pki_dir)
    ca = generate_ca()
    write_pair(pki_dir, CA_STEM, ca, force=force)
    write_pair(pki_dir, SERVER_STEM, generate_server(ca, sans=sans), force=force)
    for name in DEV_IDENTITIES:
        write_pair(pki_dir, name, generate_client(ca, name), force=force)


def is_complete_dev_pki(pki_dir: Path) -> bool:
    """True if every file of the development PKI exists (used by ``serve`` on first run)."""
    stems = (CA_STEM, SERVER_STEM, *DEV_IDENTITIES)
    return all(p.is_file() for stem in stems for p in pair_paths(pki_dir, stem))


__all__ = [
    "BACKDATE",
    "CA_VALIDITY",
    "DEV_IDENTITIES",
    "LEAF_VALIDITY",
    "CertifiedKey",
    "check_identity_name",
    "generate_ca",
    "generate_client",
    "generate_server",
    "init_dev_pki",
    "is_complete_dev_pki",
    "issue_client",
    "issue_server",
    "load_pair",
    "pair_paths",
    "server_sans",
    "write_file_atomic",
    "write_pair",
]
