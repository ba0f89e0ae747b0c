"""One benchmark process: a server or a client of one peer (started by ``benchmarks.rpc``).

python -m benchmarks.rpc.worker server IMPL --pki P --gen G [--profile FILE]
    prints ``READY <port>`` when listening; runs until SIGTERM.
python -m benchmarks.rpc.worker client IMPL --port N --pki P --gen G --work JSON
    prints one line of JSON: the figures (benchmarks.rpc.common.Result).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
from pathlib import Path

import trio

from benchmarks.rpc import peers_asyncio, peers_trio
from benchmarks.rpc.common import IMPLS, Result, Workload


def _server(impl: str, pki: Path, gen: Path) -> None:
    if impl == "ours":
        trio.run(peers_trio.serve_ours, pki, gen)
    elif impl == "tls":
        trio.run(peers_trio.serve_tls, pki)
    elif impl == "grpcio":
        asyncio.run(peers_asyncio.serve_grpcio(pki, gen))
    else:
        asyncio.run(peers_asyncio.serve_grpclib(pki, gen))


def _client(impl: str, port: int, pki: Path, gen: Path, work: Workload) -> Result:
    if impl == "ours":
        return trio.run(peers_trio.client_ours, port, pki, gen, work)
    if impl == "tls":
        return trio.run(peers_trio.client_tls, port, pki, work)
    if impl == "grpcio":
        return asyncio.run(peers_asyncio.client_grpcio(port, pki, gen, work))
    return asyncio.run(peers_asyncio.client_grpclib(port, pki, gen, work))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rpc.worker")
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("impl", choices=IMPLS)
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--gen", type=Path, required=True)
    parser.add_argument("--port", type=int)
    parser.add_argument("--work", default=Workload().to_json())
    parser.add_argument("--profile", type=Path, help="server: write cProfile stats here")
    args = parser.parse_args()
    if args.role == "server":
        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:
            profiler.enable()
        try:
            _server(args.impl, args.pki, args.gen)
        finally:
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
        return
    if args.port is None:
        parser.error("client needs --port")
    result = _client(args.impl, args.port, args.pki, args.gen, Workload.from_json(args.work))
    os.write(1, (result.to_json() + "\n").encode())


if __name__ == "__main__":
    main()
