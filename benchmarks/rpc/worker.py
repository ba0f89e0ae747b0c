"""One benchmark process: a server or a client of one peer (started by ``benchmarks.rpc``).

python -m benchmarks.rpc.worker server IMPL --pki P --gen G [--profile FILE]
    prints ``READY <port>`` when listening (ours: then what it runs, JSON ``RanAs``);
    runs until SIGTERM.
python -m benchmarks.rpc.worker client IMPL --port N --server-pid PID --pki P --gen G --work JSON
    prints one line of JSON: ``{"result": <Result>, "ran": <RanAs>}``. ``--server-pid``: the
    server process, whose CPU time the client reads around the streaming calls.

Our rpc mode is the environment's (``TRIO_JOBS_RPC_TRANSPORT``, ``TRIO_JOBS_RPC_FAST_PATHS``),
and our code is the first ``trio_jobs`` on the path: the runner sets both per row.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import json
import os
from pathlib import Path

import trio

from benchmarks.rpc import peers_asyncio, peers_trio
from benchmarks.rpc.common import IMPLS, RanAs, Result, Workload, process_cpu_clock


def _server(impl: str, pki: Path, gen: Path) -> None:
    if impl == "ours":
        trio.run(peers_trio.serve_ours, pki, gen)
    elif impl == "tls":
        trio.run(peers_trio.serve_tls, pki)
    elif impl == "grpcio":
        asyncio.run(peers_asyncio.serve_grpcio(pki, gen))
    else:
        asyncio.run(peers_asyncio.serve_grpclib(pki, gen))


def _client(impl: str, port: int, server_pid: int, pki: Path, gen: Path, work: Workload) -> tuple[Result, RanAs]:
    cpu = process_cpu_clock(server_pid)
    if impl == "ours":
        return trio.run(peers_trio.client_ours, port, pki, gen, work, cpu)
    if impl == "tls":
        return trio.run(peers_trio.client_tls, port, pki, work, cpu), RanAs()
    if impl == "grpcio":
        return asyncio.run(peers_asyncio.client_grpcio(port, pki, gen, work, cpu)), RanAs()
    return asyncio.run(peers_asyncio.client_grpclib(port, pki, gen, work, cpu)), RanAs()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rpc.worker")
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("impl", choices=IMPLS)
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--gen", type=Path, required=True)
    parser.add_argument("--port", type=int)
    parser.add_argument("--server-pid", type=int)
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
    if args.port is None or args.server_pid is None:
        parser.error("client needs --port and --server-pid")
    result, ran = _client(args.impl, args.port, args.server_pid, args.pki, args.gen, Workload.from_json(args.work))
    line = json.dumps({"result": dataclasses.asdict(result), "ran": dataclasses.asdict(ran)})
    os.write(1, (line + "\n").encode())


if __name__ == "__main__":
    main()
