"""Shared reliability fixtures and helpers.

- ``host`` / ``served``: the e2e ``Host`` (a real ``trio-jobs serve`` subprocess per test).
- ``inproc``: an in-process server (``open_worker`` + ``JobService`` + rpc ``Server``) on
  127.0.0.1 port 0, so a test can look at the worker (e.g. its follower count).
- ``connect(address, pki, identity)``: an in-process ``JobsClient``.
- ``status_latencies``: timed ``status`` calls, for the "other users' p99" figures.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
import trio
from e2e.conftest import Host, host, served  # noqa: F401  (fixtures shared with tests/e2e)

from trio_jobs.client import JobsClient
from trio_jobs.rpc import Server, health_service, service_from_descriptor
from trio_jobs.security.identity import identity_from_peercert
from trio_jobs.security.policy import Policy
from trio_jobs.security.tls import client_ssl_context, server_ssl_context
from trio_jobs.service import JobService
from trio_jobs.v1 import jobs_pb2
from trio_jobs.worker import Worker, open_worker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from contextlib import AbstractAsyncContextManager
    from pathlib import Path


def p99(samples: Sequence[float]) -> float:
    """The 99th percentile (nearest rank) of ``samples`` (seconds in, seconds out)."""
    if not samples:
        raise ValueError("p99 of no samples")
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def connect(address: str, pki: Path, identity: str) -> AbstractAsyncContextManager[JobsClient]:
    ctx = client_ssl_context(cert=pki / f"{identity}.crt", key=pki / f"{identity}.key", ca=pki / "ca.crt")
    return JobsClient.connect(address, ssl_context=ctx)


async def status_latencies(client: JobsClient, job_id: str, calls: int = 100) -> list[float]:
    """Wall-clock seconds of ``calls`` sequential ``status`` calls (bounded: 60 s in all)."""
    samples = []
    with trio.fail_after(60):
        for _ in range(calls):
            t0 = time.perf_counter()
            await client.status(job_id)
            samples.append(time.perf_counter() - t0)
    return samples


@dataclass(frozen=True, kw_only=True)
class InProc:
    worker: Worker
    service: JobService
    address: str
    pki: Path
    cap: int  # output cap of every job


@pytest.fixture
async def inproc(tmp_path: Path, dev_pki: Path) -> AsyncIterator[InProc]:
    """A server without cgroups in this process; jobs get an 8 MiB output cap."""
    ctx = server_ssl_context(cert=dev_pki / "server.crt", key=dev_pki / "server.key", ca=dev_pki / "ca.crt")
    cap = 8 << 20
    async with open_worker(tmp_path / "data", output_cap=cap, default_grace=1.0) as worker:
        service = JobService(worker, Policy.default())
        methods = [
            *service_from_descriptor(jobs_pb2.DESCRIPTOR.services_by_name["JobService"], service),
            *health_service(),
        ]
        server = Server(methods, ssl_context=ctx, identify=identity_from_peercert)
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
            host, port = addresses[0]
            yield InProc(worker=worker, service=service, address=f"{host}:{port}", pki=dev_pki, cap=cap)
            await worker.shutdown(0)
            await server.shutdown(2.0)
            nursery.cancel_scope.cancel()
