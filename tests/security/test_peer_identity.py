"""Identity = the single subject CN of the verified peer certificate; anything else is None."""

from __future__ import annotations

from typing import Any

import pytest

from trio_jobs.security import identity_from_peercert


def cert(*rdns: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {"subject": tuple(rdns), "issuer": ((("commonName", "CA"),),)}


def test_plain_cn() -> None:
    assert identity_from_peercert(cert((("commonName", "alice"),))) == "alice"


def test_cn_among_other_attributes() -> None:
    peer = cert(
        (("countryName", "FR"),),
        (("organizationName", "Example"),),
        (("commonName", "Alice Smith"),),
    )
    assert identity_from_peercert(peer) == "Alice Smith"


@pytest.mark.parametrize(
    "peer",
    [
        None,
        {},  # getpeercert() of an unverified peer
        {"subject": ()},
        cert((("organizationName", "no CN"),)),
        cert((("commonName", "alice"),), (("commonName", "admin"),)),  # two CNs: ambiguous
        cert((("commonName", "alice"), ("commonName", "admin"))),  # multi-valued RDN
        cert((("commonName", ""),)),
        cert((("commonName", "x" * 65),)),
        cert((("commonName", "ali\nce"),)),
        cert((("commonName", "alice\x00"),)),
        cert((("commonName", " alice"),)),
        cert((("commonName", 42),)),
        {"subject": "CN=alice"},
        {"subject": (("commonName", "alice"),)},  # malformed nesting
    ],
)
def test_missing_or_ambiguous_is_none(peer: dict[str, Any] | None) -> None:
    assert identity_from_peercert(peer) is None


def test_security_layer_imports_neither_worker_nor_rpc() -> None:
    import subprocess
    import sys

    code = """
import sys
import trio_jobs.security, trio_jobs.security.certs_cli
bad = sorted(m for m in sys.modules if m.split(".")[:2] in (["trio_jobs", "worker"], ["trio_jobs", "rpc"]) or m == "trio")
print(bad)
sys.exit(1 if bad else 0)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
