"""A process of N followers of one job, each on its own mutual-TLS connection.

Followers take the identities of ``--identities`` in turn (the server caps streams per identity).

    python -m benchmarks.e2e.followers --server H:P --pki D --job J --count N

Each follower is ``JobsClient.tail`` (the code ``trio-jobs tail`` runs) with a sink that
counts bytes instead of writing them. Prints one JSON line: total bytes, the monotonic time
of the first byte and of the last follower's end, and how many followers completed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio

from trio_jobs.client import JobsClient


async def _follow_all(server: str, pki: Path, identities: list[str], job: str, count: int, expect: int) -> dict[str, float]:
    total = 0
    first: float | None = None
    done = 0

    async def one(identity: str) -> None:
        nonlocal total, first, done
        got = 0

        async def sink(data: bytes) -> None:
            nonlocal total, first, got
            if first is None:
                first = time.monotonic()
            got += len(data)
            total += len(data)

        cert, key, ca = pki / f"{identity}.crt", pki / f"{identity}.key", pki / "ca.crt"
        async with JobsClient.connect(server, cert=cert, key=key, ca=ca) as client:
            await client.tail(job, sink)
        if got == expect:
            done += 1

    with trio.fail_after(900):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, identities[i % len(identities)])
    last = time.monotonic()
    return {"bytes": total, "first": first if first is not None else last, "last": last, "complete": done}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.e2e.followers")
    parser.add_argument("--server", required=True)
    parser.add_argument("--pki", required=True, type=Path)
    parser.add_argument("--identities", default="admin", help="comma-separated; used in turn")
    parser.add_argument("--job", required=True)
    parser.add_argument("--count", required=True, type=int)
    parser.add_argument("--expect", required=True, type=int, help="bytes each follower must get")
    args = parser.parse_args(argv)
    result = trio.run(_follow_all, args.server, args.pki, args.identities.split(","), args.job, args.count, args.expect)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
