"""A process of N followers of one job, each on its own mutual-TLS connection.

Followers take the identities of ``--identities`` in turn (the server caps streams per identity).

    python -m benchmarks.e2e.followers --server H:P --pki D --job J --count N \\
        --marker-bytes M --expect BYTES

Each follower is ``JobsClient.tail`` (the code ``trio-jobs tail`` runs) with a sink that
counts bytes instead of writing them. The job's output starts with a marker line of
``--marker-bytes`` bytes, then ``--expect`` bytes of payload. Once *every* follower has
received the whole marker -- each is then attached to the job's output stream on the server --
the process prints ``attached``: the fan-out scenario holds the job (blocked after its marker)
until that line, so the payload of a live fan-out reaches followers that are all already
following. At the end it prints one JSON line: total payload bytes, the monotonic time of the
first payload byte and of the last follower's end, when all were attached, and how many
followers got exactly the marker and the payload.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio

from trio_jobs.client import JobsClient

ATTACHED = "attached"


async def _follow_all(
    server: str, pki: Path, identities: list[str], job: str, count: int, marker: int, expect: int
) -> dict[str, float]:
    total = 0
    first: float | None = None
    attached_at = 0.0
    attached = 0
    done = 0

    async def one(identity: str) -> None:
        nonlocal total, first, attached, attached_at, done
        got = 0  # marker and payload

        async def sink(data: bytes) -> None:
            nonlocal total, first, attached, attached_at, got
            before = got
            got += len(data)
            payload = got - max(before, marker)
            if before < marker <= got:
                attached += 1
                if attached == count:
                    attached_at = time.monotonic()
                    print(ATTACHED, flush=True)
            if payload > 0:
                if first is None:
                    first = time.monotonic()
                total += payload

        cert, key, ca = pki / f"{identity}.crt", pki / f"{identity}.key", pki / "ca.crt"
        async with JobsClient.connect(server, cert=cert, key=key, ca=ca) as client:
            await client.tail(job, sink)
        if got == marker + expect:
            done += 1

    with trio.fail_after(900):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, identities[i % len(identities)])
    last = time.monotonic()
    return {"bytes": total, "first": first if first is not None else last, "last": last,
            "attached": attached_at, "complete": done}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.e2e.followers")
    parser.add_argument("--server", required=True)
    parser.add_argument("--pki", required=True, type=Path)
    parser.add_argument("--identities", default="admin", help="comma-separated; used in turn")
    parser.add_argument("--job", required=True)
    parser.add_argument("--count", required=True, type=int)
    parser.add_argument("--marker-bytes", type=int, default=0, help="the job's first line, before the payload")
    parser.add_argument("--expect", required=True, type=int, help="payload bytes each follower must get")
    args = parser.parse_args(argv)
    result = trio.run(_follow_all, args.server, args.pki, args.identities.split(","), args.job, args.count,
                      args.marker_bytes, args.expect)  # fmt: skip
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
