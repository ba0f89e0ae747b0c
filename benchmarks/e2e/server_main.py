"""A trio-jobs server for the benchmark, in its own process.

    python -m benchmarks.e2e.server_main --home D --policy F --cgroups auto|none [--profile OUT]
                                         [--audit-log F [--audit-reads]]

It runs :func:`trio_jobs.server.serve` -- exactly what ``trio-jobs serve`` runs -- with one
difference the CLI cannot express: ``--cgroups none`` uses ``NoCgroupDriver`` on a host that
has cgroups, so that job start can be measured with and without them on the same machine.
``auto`` picks the driver as ``serve`` does (``detect_driver``), under a parent cgroup named
by ``--cgroup-parent``. The first stdout line is ``listening on HOST:PORT DRIVER``.
``--profile OUT`` runs the server under cProfile and writes the stats to OUT at exit.
``--audit-log F`` writes the audit log there (``--audit-reads``: reads too); without it,
none (``trio-jobs serve`` always has one): the A/B of ``benchmarks.e2e.audit_ab``.
"""

from __future__ import annotations

import argparse
import cProfile
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trio_jobs.audit import AuditLog
from trio_jobs.rpc import ServerLimits
from trio_jobs.security.pki import init_dev_pki, is_complete_dev_pki
from trio_jobs.security.policy import Policy
from trio_jobs.security.tls import server_ssl_context
from trio_jobs.server import ServerConfig, ServerInfo, serve
from trio_jobs.worker.cgroups.detect import detect_driver
from trio_jobs.worker.cgroups.none import NoCgroupDriver

if TYPE_CHECKING:
    from trio_jobs.worker.cgroups.base import CgroupDriver


async def _run(config: ServerConfig) -> None:
    async with trio.open_nursery() as nursery:
        info: ServerInfo = await nursery.start(serve, config)
        host, port = info.addresses[0]
        print(f"listening on {host}:{port} {info.cgroup_driver}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.e2e.server_main")
    parser.add_argument("--home", required=True, type=Path)
    parser.add_argument("--policy", required=True, type=Path)
    parser.add_argument("--cgroups", choices=("auto", "none"), default="auto")
    parser.add_argument("--cgroup-parent", default="trio-jobs-bench")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--audit-log", type=Path)
    parser.add_argument("--audit-reads", action="store_true")
    args = parser.parse_args(argv)
    pki = args.home / "pki"
    if not is_complete_dev_pki(pki):
        init_dev_pki(pki)
    ctx = server_ssl_context(cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt")
    driver: CgroupDriver
    if args.cgroups == "none":
        driver = NoCgroupDriver("disabled by the benchmark")
    else:
        driver = detect_driver(parent=args.cgroup_parent)
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        data_dir=args.home / "data",
        ssl_context=ctx,
        policy=Policy.load(args.policy),
        cgroups=driver,
        audit=AuditLog(args.audit_log, reads=args.audit_reads) if args.audit_log else None,
        # Every client (the fan-out's 100 followers at once) connects from 127.0.0.1.
        rpc_limits=ServerLimits(max_connections_per_source=1000, max_handshakes_per_source=1000),
    )
    (args.home / "data").mkdir(mode=0o700, exist_ok=True)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    try:
        trio.run(_run, config)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
