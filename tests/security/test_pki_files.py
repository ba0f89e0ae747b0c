"""The generated PKI on disk: openssl's view of it, file modes, and overwrite protection."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import stat
import subprocess
from typing import TYPE_CHECKING

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from trio_jobs.security import PkiError, init_dev_pki, issue_client, issue_server
from trio_jobs.security.paths import pki_dir, state_home
from trio_jobs.security.pki import (
    DEV_IDENTITIES,
    check_identity_name,
    is_complete_dev_pki,
    load_pair,
    server_sans,
    write_file_atomic,
)

if TYPE_CHECKING:
    from pathlib import Path

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
needs_openssl = pytest.mark.skipif(not os.path.exists(OPENSSL), reason="no openssl binary")
STEMS = ("ca", "server", *DEV_IDENTITIES)


def openssl(*args: str) -> str:
    done = subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def x509_text(path: Path) -> str:
    return openssl("x509", "-in", str(path), "-noout", "-text")


def section(text: str, header: str) -> str:
    """The line after an extension header in `openssl x509 -text` output (its value)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(header):
            return line.strip() + " => " + lines[i + 1].strip()
    raise AssertionError(f"{header} not found in:\n{text}")


@needs_openssl
def test_every_certificate_verifies_with_openssl(dev_pki: Path) -> None:
    ca = str(dev_pki / "ca.crt")
    for stem in STEMS:
        assert (
            openssl("verify", "-x509_strict", "-CAfile", ca, str(dev_pki / f"{stem}.crt"))
            .strip()
            .endswith(": OK")
        )
    openssl("verify", "-purpose", "sslserver", "-CAfile", ca, str(dev_pki / "server.crt"))
    for name in DEV_IDENTITIES:
        openssl("verify", "-purpose", "sslclient", "-CAfile", ca, str(dev_pki / f"{name}.crt"))


@needs_openssl
def test_purposes_are_not_interchangeable(dev_pki: Path) -> None:
    ca = str(dev_pki / "ca.crt")
    for stem, purpose in (("server", "sslclient"), ("alice", "sslserver")):
        done = subprocess.run(
            [OPENSSL, "verify", "-purpose", purpose, "-CAfile", ca, str(dev_pki / f"{stem}.crt")],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode != 0
        assert "unsuitable certificate purpose" in done.stdout + done.stderr


@needs_openssl
def test_ca_extensions(dev_pki: Path) -> None:
    text = x509_text(dev_pki / "ca.crt")
    assert "ecdsa-with-SHA256" in text
    assert "ASN1 OID: prime256v1" in text
    assert "NIST CURVE: P-256" in text
    assert section(text, "X509v3 Basic Constraints") == (
        "X509v3 Basic Constraints: critical => CA:TRUE, pathlen:0"
    )
    assert section(text, "X509v3 Key Usage") == (
        "X509v3 Key Usage: critical => Certificate Sign, CRL Sign"
    )
    assert "X509v3 Subject Key Identifier" in text
    assert "X509v3 Authority Key Identifier" in text
    cert = load_pair(dev_pki, "ca").cert
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=5 * 365) <= lifetime <= dt.timedelta(days=5 * 366)


@needs_openssl
def test_server_extensions(dev_pki: Path) -> None:
    text = x509_text(dev_pki / "server.crt")
    assert "ecdsa-with-SHA256" in text
    assert "NIST CURVE: P-256" in text
    assert section(text, "X509v3 Basic Constraints").endswith("CA:FALSE")
    assert section(text, "X509v3 Key Usage") == "X509v3 Key Usage: critical => Digital Signature"
    assert section(text, "X509v3 Extended Key Usage").endswith("=> TLS Web Server Authentication")
    sans = section(text, "X509v3 Subject Alternative Name")
    for expected in ("DNS:localhost", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1"):
        assert expected in sans
    host = socket.gethostname().lower()
    assert f"DNS:{host}" in sans
    assert "X509v3 Subject Key Identifier" in text
    assert "X509v3 Authority Key Identifier" in text


@needs_openssl
@pytest.mark.parametrize("name", DEV_IDENTITIES)
def test_client_extensions(dev_pki: Path, name: str) -> None:
    text = x509_text(dev_pki / f"{name}.crt")
    assert f"Subject: CN = {name}\n" in text
    assert section(text, "X509v3 Extended Key Usage").endswith("=> TLS Web Client Authentication")
    assert section(text, "X509v3 Key Usage") == "X509v3 Key Usage: critical => Digital Signature"
    assert "X509v3 Subject Alternative Name" not in text


def test_validity_serials_and_keys(dev_pki: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    serials = set()
    for stem in STEMS:
        pair = load_pair(dev_pki, stem)
        assert isinstance(pair.key.curve, ec.SECP256R1)
        cert = pair.cert
        serials.add(cert.serial_number)
        assert cert.serial_number.bit_length() > 64  # random, not a counter
        backdate = now - cert.not_valid_before_utc
        assert dt.timedelta(minutes=1) < backdate < dt.timedelta(hours=1)
        if stem != "ca":
            lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
            assert dt.timedelta(days=365) <= lifetime <= dt.timedelta(days=366)
    assert len(serials) == len(STEMS)


def test_file_and_directory_modes(dev_pki: Path) -> None:
    assert stat.S_IMODE(dev_pki.stat().st_mode) == 0o700
    for stem in STEMS:
        assert stat.S_IMODE((dev_pki / f"{stem}.key").stat().st_mode) == 0o600
        assert stat.S_IMODE((dev_pki / f"{stem}.crt").stat().st_mode) == 0o644
    assert sorted(p.name for p in dev_pki.iterdir()) == sorted(
        f"{s}.{ext}" for s in STEMS for ext in ("crt", "key")
    )  # no temporary files left behind
    assert is_complete_dev_pki(dev_pki)


def test_keys_are_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        init_dev_pki(tmp_path / "pki")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700
    for stem in STEMS:
        assert stat.S_IMODE((tmp_path / "pki" / f"{stem}.key").stat().st_mode) == 0o600


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_dev_pki(pki)
    before = {p.name: p.read_bytes() for p in pki.iterdir()}
    with pytest.raises(PkiError, match=r"refusing to overwrite .*--force"):
        init_dev_pki(pki)
    with pytest.raises(PkiError, match=r"refusing to overwrite alice\.crt, alice\.key"):
        issue_client(pki, "alice")
    with pytest.raises(PkiError, match=r"refusing to overwrite server\.crt"):
        issue_server(pki)
    assert {p.name: p.read_bytes() for p in pki.iterdir()} == before
    init_dev_pki(pki, force=True)
    after = {p.name: p.read_bytes() for p in pki.iterdir()}
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)


def test_partial_pki_is_not_overwritten(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    (pki / "bob.key").write_text("mine")
    with pytest.raises(PkiError, match=r"bob\.key"):
        init_dev_pki(pki)
    assert (pki / "bob.key").read_text() == "mine"
    assert sorted(p.name for p in pki.iterdir()) == ["bob.key"]
    assert not is_complete_dev_pki(pki)


def test_issue_client_and_server(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_dev_pki(pki)
    crt, key = issue_client(pki, "carol@example.org")
    assert (crt, key) == (pki / "carol@example.org.crt", pki / "carol@example.org.key")
    cert = x509.load_pem_x509_certificate(crt.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=carol@example.org"
    assert cert.issuer == load_pair(pki, "ca").cert.subject
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    crt, _ = issue_server(pki, sans=["jobs.example.org", "10.1.2.3", "fe80::1"], force=True)
    names = (
        x509.load_pem_x509_certificate(crt.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert "jobs.example.org" in names.get_values_for_type(x509.DNSName)
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} >= {
        "10.1.2.3",
        "fe80::1",
        "127.0.0.1",
        "::1",
    }


@pytest.mark.parametrize(
    "name", ["", "../etc/passwd", "a/b", ".hidden", "ca", "Server", "x" * 65, "sp ace", "é"]
)
def test_bad_identity_names(name: str) -> None:
    with pytest.raises(PkiError):
        check_identity_name(name)


@pytest.mark.parametrize(
    "san", ["bad name", "-x.example", "a..b", "", "x" * 64 + ".example", "ex_ample.org"]
)
def test_bad_sans(san: str) -> None:
    with pytest.raises(PkiError, match="invalid subject alternative name"):
        server_sans([san])


def test_sans_are_deduplicated_and_normalised() -> None:
    sans = server_sans(["LOCALHOST", "127.0.0.1", "*.Example.org."])
    assert sans.count(x509.DNSName("localhost")) == 1
    assert x509.DNSName("*.example.org") in sans


def test_issue_without_a_ca_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="certs-gen init"):
        issue_client(tmp_path, "alice")


def test_mismatched_key_is_detected(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_dev_pki(pki)
    (pki / "ca.key").write_bytes((pki / "alice.key").read_bytes())
    with pytest.raises(PkiError, match="does not belong to"):
        issue_client(pki, "carol")
    (pki / "ca.key").write_text("garbage")
    with pytest.raises(PkiError, match="cannot parse"):
        issue_client(pki, "carol")


def test_atomic_write_never_replaces_without_force(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_file_atomic(target, b"one", mode=0o600, force=False)
    with pytest.raises(PkiError, match="refusing to overwrite"):
        write_file_atomic(target, b"two", mode=0o600, force=False)
    assert target.read_bytes() == b"one"
    write_file_atomic(target, b"three", mode=0o600, force=True)
    assert target.read_bytes() == b"three"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_pki_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "pki").write_text("")
    with pytest.raises(PkiError, match="not a directory"):
        init_dev_pki(tmp_path / "pki")


def test_default_paths(tmp_path: Path) -> None:
    assert state_home({"TRIO_JOBS_HOME": str(tmp_path), "XDG_STATE_HOME": "/x"}) == tmp_path
    assert pki_dir({"TRIO_JOBS_HOME": str(tmp_path)}) == tmp_path / "pki"
    assert state_home({"XDG_STATE_HOME": "/var/st", "HOME": "/h"}).as_posix() == "/var/st/trio-jobs"
    # a relative XDG_STATE_HOME is invalid per the spec and ignored
    assert (
        state_home({"XDG_STATE_HOME": "rel", "HOME": "/h"}).as_posix()
        == "/h/.local/state/trio-jobs"
    )
    assert state_home({"HOME": "/h"}).as_posix() == "/h/.local/state/trio-jobs"
