"""Security figures (issue 4): development PKI creation and a mutual TLS 1.3 handshake.

``./dev bench tls`` (or ``python -m benchmarks.bench_tls [--handshakes N]``). Both ends of
the handshake run in one process over trio memory streams, so the figure is the CPU cost of
one full mutual handshake (P-256 ECDHE + two ECDSA signatures and verifications), with no
network in it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trio
import trio.testing

from trio_jobs.security.pki import init_dev_pki
from trio_jobs.security.tls import client_ssl_context, server_ssl_context


async def _handshakes(pki: Path, n: int) -> float:
    server = server_ssl_context(cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt")
    client = client_ssl_context(cert=pki / "alice.crt", key=pki / "alice.key", ca=pki / "ca.crt")
    start = time.perf_counter()
    for _ in range(n):
        a, b = trio.testing.memory_stream_pair()
        server_end = trio.SSLStream(a, server, server_side=True)
        client_end = trio.SSLStream(b, client, server_hostname="localhost")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_end.do_handshake)
            nursery.start_soon(client_end.do_handshake)
        if client_end.selected_alpn_protocol() != "h2" or server_end.version() != "TLSv1.3":
            raise SystemExit("handshake did not negotiate TLS 1.3 with ALPN h2")
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--handshakes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pki = Path(tmp) / "pki"
        start = time.perf_counter()
        init_dev_pki(pki)
        print(f"init_dev_pki (CA, server, admin, alice, bob): {1e3 * (time.perf_counter() - start):.1f} ms")
        per = trio.run(_handshakes, pki, args.handshakes)
        print(f"mutual TLS 1.3 handshake, both ends in one process: {1e3 * per:.2f} ms ({1 / per:.0f}/s)")


if __name__ == "__main__":
    main()
