"""An organisation's own CA, as docs/operations.md ("Rotate certificates with your own CA")
describes it, through the public surfaces only: ``trio-jobs serve --cert --key --ca`` and the
client commands' ``--cert/--key/--ca``, real processes over loopback, port 0 (issue #20).

The certificates are made here with ``cryptography``, the way an organisation's CA makes them
and not the way ``trio-jobs certs`` does: a root CA that signs an intermediate CA that signs
the leaves (so the root has ``pathlen:1``), RSA 2048 as well as ECDSA P-256 keys, and the
leaves' certificate files holding the leaf followed by its intermediate (the usual "chain
file": the TLS peer sends the intermediate, the other side trusts the root only).

Each acceptance is a real call that records who made it: ``start -- true`` with the client's
files, and at the end the job's owner as the admin's ``list --all --json`` shows it, so the
identity is the certificate's CN as the server read it. Each refusal is a client that exits
EXIT_UNAVAILABLE (the handshake fails) and leaves no job behind; the "admin" certificate of
a CA the server does not trust is the attack.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from e2e.conftest import host  # noqa: F401  (a fixture shared with tests/e2e)
from operations._systemd import notify_socket  # noqa: F401  (a fixture shared with tests/operations)

from trio_jobs.cli.errors import EXIT_UNAVAILABLE
from trio_jobs.security.tls import client_ssl_context

if TYPE_CHECKING:
    from pathlib import Path

    from e2e.conftest import Host
    from operations._systemd import NotifyListener

pytestmark = pytest.mark.slow

KeyKind = Literal["ecdsa", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

POLICY: Final = """\
[defaults]
programs = ["*"]

[identities.admin]
admin = true
run_as = ""

[identities.alice]

[identities.bob]
"""


def new_key(kind: KeyKind) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


@dataclass(frozen=True, kw_only=True)
class Issued:
    """A key, its certificate, and the CA certificates between it and its root (nearest
    first; the root itself is never part of a chain file)."""

    key: PrivateKey
    cert: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    def write(self, directory: Path, stem: str, *, with_chain: bool = True) -> tuple[Path, Path]:
        """``stem.crt`` (the certificate, then its intermediates) and ``stem.key`` (0600)."""
        certs = (self.cert, *self.chain) if with_chain else (self.cert,)
        cert = directory / f"{stem}.crt"
        cert.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
        key = directory / f"{stem}.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ))
        return cert, key


def _build(
    *, subject: str, key: PrivateKey, issuer: Issued | None, extensions: list[tuple[x509.ExtensionType, bool]]
) -> x509.Certificate:
    """A certificate as docs/operations.md's OpenSSL recipe makes it: SHA-256, key
    identifiers on every certificate (VERIFY_X509_STRICT wants them)."""
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    signer = key if issuer is None else issuer.key
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name if issuer is None else issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(ski, critical=False)
        .add_extension(aki, critical=False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )


def make_ca(subject: str, kind: KeyKind, *, parent: Issued | None = None, pathlen: int = 0) -> Issued:
    """A root CA (``parent`` None) or an intermediate CA signed by ``parent``."""
    key = new_key(kind)
    cert = _build(subject=subject, key=key, issuer=parent, extensions=[
        (x509.BasicConstraints(ca=True, path_length=pathlen), True),
        (_key_usage(cert_sign=True), True),
    ])
    return Issued(key=key, cert=cert, chain=() if parent is None else chain_below(parent))


def chain_below(ca: Issued) -> tuple[x509.Certificate, ...]:
    """What a certificate signed by ``ca`` sends with it: ``ca`` itself unless it is a root
    (self-signed), then ``ca``'s own intermediates."""
    return ca.chain if ca.cert.issuer == ca.cert.subject else (ca.cert, *ca.chain)


def make_leaf(issuer: Issued, subject: str, kind: KeyKind, *, server: bool) -> Issued:
    """A server (serverAuth, SANs for the loopback address the tests dial) or client
    (clientAuth, the identity in its CN) certificate, with the issuer's intermediates."""
    key = new_key(kind)
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(cert_sign=False), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), False),
    ]
    if server:
        sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        extensions.append((x509.SubjectAlternativeName(sans), False))
    cert = _build(subject=subject, key=key, issuer=issuer, extensions=extensions)
    return Issued(key=key, cert=cert, chain=chain_below(issuer))


def write_bundle(path: Path, *cas: Issued) -> Path:
    """A CA file holding several roots (``cat old-ca.crt new-ca.crt > ca.crt``), replaced by
    a rename as an operator's deploy tool does."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(b"".join(ca.cert.public_bytes(serialization.Encoding.PEM) for ca in cas))
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Creds:
    """A client's ``--cert --key --ca``."""

    cert: Path
    key: Path
    ca: Path

    def flags(self) -> tuple[str, ...]:
        return ("--cert", str(self.cert), "--key", str(self.key), "--ca", str(self.ca))


def start_true(target: Host, creds: Creds, *, check: bool = True) -> tuple[int, str]:
    """``trio-jobs start --cert --key --ca -- true``: (exit code, the job id or stderr)."""
    done = target.run("start", *creds.flags(), "--", "true", check=check)
    return done.returncode, (done.stdout if done.returncode == 0 else done.stderr).decode().strip()


def assert_refused(target: Host, creds: Creds, *, by: Literal["server", "client"] = "server") -> None:
    """The call fails in the handshake: the server does not trust the client's certificate
    (it sends the ``unknown_ca`` alert), or the client does not trust the server's."""
    code, message = start_true(target, creds, check=False)
    assert code == EXIT_UNAVAILABLE, (code, message)
    why = "alert unknown ca" if by == "server" else "certificate verify failed"
    assert why in message, message


def owners(target: Host, admin: Creds) -> dict[str, str]:
    """Every job the server has, job id -> owner, as its admin lists them."""
    listed = json.loads(target.run("list", "--all", "--json", *admin.flags()).stdout)
    return {job["job_id"]: job["owner"] for job in listed.get("jobs", [])}


def presented(address: str, creds: Creds) -> tuple[x509.Certificate, str]:
    """The certificate the server presents to a new handshake, and the TLS version."""
    ip, port = address.rsplit(":", 1)
    ctx = client_ssl_context(cert=creds.cert, key=creds.key, ca=creds.ca)
    with socket.create_connection((ip, int(port)), timeout=30) as raw, ctx.wrap_socket(raw, server_hostname=ip) as tls:
        der = tls.getpeercert(binary_form=True)
        version = tls.version()
    assert der is not None
    assert version is not None
    return x509.load_der_x509_certificate(der), version


def reload(target: Host, notify: NotifyListener) -> None:
    """SIGHUP, then wait for the end of the reload, and require that it was applied (one new
    log line, and it says ``reloaded:``)."""

    def outcomes() -> list[str]:
        return [ln for ln in target.server_stderr().splitlines() if "reloaded:" in ln or "reload failed" in ln]

    before = len(outcomes())
    assert target.server is not None
    target.server.send_signal(signal.SIGHUP)
    notify.expect("RELOADING=1")
    notify.expect("READY=1")
    new = outcomes()[before:]
    assert len(new) == 1, new
    assert "reloaded:" in new[0], new[0]


@pytest.mark.parametrize(
    ("ca_kind", "leaf_kind"),
    [("ecdsa", "ecdsa"), ("rsa", "rsa"), ("rsa", "ecdsa")],
    ids=["ecdsa", "rsa", "rsa-ca-ecdsa-leaves"],
)
def test_an_intermediate_chain_of_an_organisation_ca(
    host: Host, tmp_path: Path, ca_kind: KeyKind, leaf_kind: KeyKind  # noqa: F811
) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    root = make_ca("Example Root CA", ca_kind, pathlen=1)
    issuing = make_ca("Example Issuing CA", ca_kind, parent=root)
    root_file = write_bundle(tls / "root.crt", root)
    server = make_leaf(issuing, "jobs.example.com", leaf_kind, server=True)
    server_cert, server_key = server.write(tls, "server")
    alice = Creds(*make_leaf(issuing, "alice", leaf_kind, server=False).write(tls, "alice"), root_file)
    admin = Creds(*make_leaf(issuing, "admin", leaf_kind, server=False).write(tls, "admin"), root_file)
    assert len(server_cert.read_bytes().split(b"-----BEGIN CERTIFICATE-----")) == 3  # leaf + intermediate

    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    host.start_server("--policy", str(policy), "--cert", str(server_cert), "--key", str(server_key),
                      "--ca", str(root_file))

    # The server sent its intermediate: a client that trusts the root alone verified it.
    cert, version = presented(host.address, alice)
    assert cert.serial_number == server.cert.serial_number
    assert version == "TLSv1.3"
    expected_key = rsa.RSAPublicKey if leaf_kind == "rsa" else ec.EllipticCurvePublicKey
    assert isinstance(cert.public_key(), expected_key)

    # The client sends its intermediate: the server, which trusts the root alone, accepts it
    # and takes the identity from the leaf's CN.
    _, job = start_true(host, alice)

    # Control: the same leaf without its intermediate has no path to the root and is refused,
    # so the acceptance above went through the chain.
    alone = Creds(*make_leaf(issuing, "bob", leaf_kind, server=False).write(tls, "bob", with_chain=False), root_file)
    assert_refused(host, alone)

    assert owners(host, admin) == {job: "alice"}


def test_a_ca_bundle_rotates_the_ca_without_refusing_anyone(
    host: Host, notify_socket: NotifyListener, tmp_path: Path  # noqa: F811
) -> None:
    """docs/operations.md "Replace the CA", step by step, with a reload after each change of
    the server's files: an old single-level ECDSA CA replaced by a new RSA root with an
    intermediate. Between steps 1 and 4 certificates of either CA are accepted; a CA that is in
    no bundle is refused throughout, even for a CN the policy knows (``admin``)."""
    tls, clients = tmp_path / "tls", tmp_path / "clients"
    tls.mkdir()
    clients.mkdir()
    old = make_ca("Example CA 2024", "ecdsa")
    new_root = make_ca("Example Root CA 2025", "rsa", pathlen=1)
    new = make_ca("Example Issuing CA 2025", "rsa", parent=new_root)
    foreign = make_ca("Someone else's CA", "ecdsa")

    old_ca = write_bundle(clients / "old-ca.crt", old)
    bundle = write_bundle(clients / "bundle.crt", old, new_root)
    new_ca = write_bundle(clients / "new-ca.crt", new_root)
    server_ca = write_bundle(tls / "ca.crt", old)
    server_cert, server_key = make_leaf(old, "jobs.example.com", "ecdsa", server=True).write(tls, "server")

    # Before: the old CA only. Its clients are served; the attacker's "admin" is not.
    alice_old = Creds(*make_leaf(old, "alice", "ecdsa", server=False).write(clients, "alice-old"), old_ca)
    mallory = Creds(*make_leaf(foreign, "admin", "ecdsa", server=False).write(clients, "mallory"), old_ca)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    host.start_server("--policy", str(policy), "--cert", str(server_cert), "--key", str(server_key),
                      "--ca", str(server_ca))
    notify_socket.expect("READY=1")
    jobs = {start_true(host, alice_old)[1]: "alice"}
    assert_refused(host, mallory)

    # 1. Both CAs in the server's bundle (reload) and in every client's.
    write_bundle(server_ca, old, new_root)
    reload(host, notify_socket)
    alice_old = Creds(alice_old.cert, alice_old.key, bundle)

    # 2. Client certificates from the new CA (through its intermediate): old and new both work.
    bob_new = Creds(*make_leaf(new, "bob", "rsa", server=False).write(clients, "bob-new"), bundle)
    admin_new = Creds(*make_leaf(new, "admin", "rsa", server=False).write(clients, "admin-new"), bundle)
    jobs[start_true(host, alice_old)[1]] = "alice"
    jobs[start_true(host, bob_new)[1]] = "bob"
    assert_refused(host, Creds(mallory.cert, mallory.key, bundle))

    # 3. A server certificate from the new CA (reload): clients trust it already.
    server_new = make_leaf(new, "jobs.example.com", "rsa", server=True)
    server_new.write(tls, "server")
    reload(host, notify_socket)
    cert, _ = presented(host.address, bob_new)
    assert cert.serial_number == server_new.cert.serial_number
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    jobs[start_true(host, alice_old)[1]] = "alice"
    jobs[start_true(host, bob_new)[1]] = "bob"
    # A client that was never given the new CA cannot verify the server any more (which is
    # why step 1 comes first).
    assert_refused(host, Creds(alice_old.cert, alice_old.key, old_ca), by="client")

    # 4. The old CA dropped from the bundles (reload): its certificates are refused.
    write_bundle(server_ca, new_root)
    reload(host, notify_socket)
    assert_refused(host, Creds(alice_old.cert, alice_old.key, new_ca))
    assert_refused(host, Creds(mallory.cert, mallory.key, new_ca))
    jobs[start_true(host, Creds(bob_new.cert, bob_new.key, new_ca))[1]] = "bob"

    # Every accepted call was made by the CN of its certificate, and the refused ones made
    # nothing (mallory's "admin" never got a job in).
    assert owners(host, Creds(admin_new.cert, admin_new.key, new_ca)) == jobs
