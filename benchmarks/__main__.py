"""``./dev bench SUITE [ARGS...]``: run one benchmark suite (see docs/benchmarks.md).

Suites: ``rpc`` (the gRPC layer against grpcio, grpclib and bare TLS), ``worker`` (the job
worker in-process: follower memory and throughput, job start latency), ``tls`` (PKI creation
and one mutual TLS 1.3 handshake) and ``e2e`` (the whole product: real servers and clients
over mutual TLS, with charts), ``restart`` (a real server's start time and peak memory with
100,000 ended jobs of history against an empty one) and ``cli`` (one-shot ``trio-jobs``
commands as whole processes against the smallest grpcio scripts).
"""

from __future__ import annotations

import runpy
import sys

SUITES = {"rpc": "benchmarks.rpc", "worker": "benchmarks.bench_worker", "tls": "benchmarks.bench_tls", "e2e": "benchmarks.e2e",
          "restart": "benchmarks.restart", "cli": "benchmarks.cli"}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in SUITES:
        print(__doc__, file=sys.stderr)
        return 2
    suite = sys.argv.pop(1)
    sys.argv[0] = f"benchmarks {suite}"
    runpy.run_module(SUITES[suite], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
