"""The status figure: GetJobStatus of an ended job against grpcio's server, grpcio client.

Issue 19: polling the status of recent jobs is the most common call a script makes, and the
goal is that our GetJobStatus of an ended job answers no slower (p50) than grpcio's own
server answers a trivial unary call. One phase of each round of ``python -m benchmarks.rpc``
(``--status only`` runs just this). Three processes, started by the runner:

- ``jobs``: the whole trio-jobs server (``trio_jobs.server.serve``, as ``trio-jobs serve``
  runs it: policy, audit log, health service) in a fresh state directory, without cgroups
  (an ended job's status does not touch them); mutual TLS with the benchmark's PKI;
- ``grpcio``: grpcio's server (``grpc.server``, the C core) serving ``grpc.health.v1.Health/Check``
  (always SERVING): the trivial unary call;
- ``client``: the official grpcio client, synchronous, as a polling script uses it, one
  channel to each server. It starts one ``/bin/true`` job, follows its output until it has
  ended, and then times, one by one, in blocks of ``status_block`` calls that alternate
  between the three (the order rotated each block, so none always goes first): our
  GetJobStatus of the ended job, our health Check, and grpcio's health Check. Each
  figure is over ``status_calls`` calls of each, after ``status_warmup`` of each.

Prints one line of JSON (:class:`benchmarks.rpc.common.StatusResult`).

    python -m benchmarks.rpc.status jobs --pki P --home D
    python -m benchmarks.rpc.status grpcio --pki P
    python -m benchmarks.rpc.status client --jobs-port N --grpcio-port M --pki P --work JSON
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from benchmarks.rpc.common import (
    HOST,
    SERVER_NAME,
    StatusResult,
    Workload,
    announce_port,
    pem,
    percentile,
    server_context,
    start_ready_server,
    stop_server,
)

if TYPE_CHECKING:
    from collections.abc import Callable

JOBS: Final = "/trio_jobs.v1.JobService"
HEALTH_CHECK: Final = "/grpc.health.v1.Health/Check"
JOB_END_TIMEOUT: Final = 30.0


# --- the servers --------------------------------------------------------------------------


def serve_jobs(pki: Path, home: Path) -> None:
    """The trio-jobs server, as ``trio-jobs serve`` runs it, until SIGTERM."""
    import trio

    from trio_jobs.audit import AuditLog
    from trio_jobs.security.policy import Policy
    from trio_jobs.server import ServerConfig, ServerInfo, serve
    from trio_jobs.worker.cgroups.none import NoCgroupDriver

    data = home / "data"
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = ServerConfig(
        host=HOST,
        port=0,
        data_dir=data,
        ssl_context=server_context(pki),
        policy=Policy.default(),
        cgroups=NoCgroupDriver("an ended job's status does not touch cgroups"),
        audit=AuditLog(home / "audit.jsonl"),
    )

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            info: ServerInfo = await nursery.start(serve, config)
            announce_port(info.addresses[0][1])

    trio.run(run)


def serve_grpcio(pki: Path) -> None:
    """grpcio's server with ``grpc.health.v1.Health/Check`` (SERVING), until SIGTERM."""
    from concurrent import futures

    import grpc

    from trio_jobs.rpc import health_pb2

    serving = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def check(request: Any, context: Any) -> Any:
        return serving

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(pem(pki, "server.key"), pem(pki, "server.crt"))],
        root_certificates=pem(pki, "ca.crt"),
        require_client_auth=True,
    )
    port = server.add_secure_port(f"{HOST}:0", credentials)
    server.start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    announce_port(port)
    stop.wait()
    server.stop(0).wait()


# --- the client ---------------------------------------------------------------------------


def _channel(port: int, pki: Path) -> Any:
    import grpc

    credentials = grpc.ssl_channel_credentials(
        root_certificates=pem(pki, "ca.crt"),
        private_key=pem(pki, "admin.key"),
        certificate_chain=pem(pki, "admin.crt"),
    )
    return grpc.secure_channel(
        f"{HOST}:{port}", credentials, options=[("grpc.ssl_target_name_override", SERVER_NAME)]
    )


def _unary(channel: Any, path: str, request_type: Any, response_type: Any) -> Any:
    return channel.unary_unary(
        path,
        request_serializer=request_type.SerializeToString,
        response_deserializer=response_type.FromString,
    )


def _ended_job(channel: Any) -> str:
    """Start ``/bin/true`` and return its id once it has ended (its output's end says so)."""
    from trio_jobs.v1 import jobs_pb2 as pb

    start = _unary(channel, f"{JOBS}/StartJob", pb.StartJobRequest, pb.StartJobResponse)
    job_id: str = start(pb.StartJobRequest(command="/bin/true"), timeout=JOB_END_TIMEOUT).job_id
    follow = channel.unary_stream(
        f"{JOBS}/StreamOutput",
        request_serializer=pb.StreamOutputRequest.SerializeToString,
        response_deserializer=pb.OutputChunk.FromString,
    )
    for _ in follow(pb.StreamOutputRequest(job_id=job_id, follow=True), timeout=JOB_END_TIMEOUT):
        pass
    status = _unary(channel, f"{JOBS}/GetJobStatus", pb.GetJobStatusRequest, pb.JobStatus)
    final = status(pb.GetJobStatusRequest(job_id=job_id))
    if final.state != pb.JOB_STATE_EXITED or final.exit_code != 0:
        raise RuntimeError(f"the benchmark's job did not exit 0: {final}")
    return job_id


def client(jobs_port: int, grpcio_port: int, pki: Path, work: Workload) -> StatusResult:
    from trio_jobs.rpc import health_pb2
    from trio_jobs.v1 import jobs_pb2 as pb

    ours, theirs = _channel(jobs_port, pki), _channel(grpcio_port, pki)
    try:
        job_id = _ended_job(ours)
        get_status = _unary(ours, f"{JOBS}/GetJobStatus", pb.GetJobStatusRequest, pb.JobStatus)
        status_request = pb.GetJobStatusRequest(job_id=job_id)
        our_check = _unary(ours, HEALTH_CHECK, health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse)
        their_check = _unary(theirs, HEALTH_CHECK, health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse)
        check_request = health_pb2.HealthCheckRequest()
        calls: list[Callable[[], object]] = [
            lambda: get_status(status_request),
            lambda: our_check(check_request),
            lambda: their_check(check_request),
        ]
        for call in calls:
            for _ in range(work.status_warmup):
                call()
        samples: list[list[float]] = [[] for _ in calls]
        block = max(1, work.status_block)
        blocks = -(-work.status_calls // block)
        for n in range(blocks):
            for i in range(len(calls)):
                which = (i + n) % len(calls)  # rotate the order block by block
                call, into = calls[which], samples[which]
                for _ in range(block):
                    started = time.perf_counter()
                    call()
                    into.append((time.perf_counter() - started) * 1e6)
        (status, check, grpcio) = samples
        return StatusResult(
            status_p50_us=percentile(status, 50),
            status_p99_us=percentile(status, 99),
            check_p50_us=percentile(check, 50),
            grpcio_p50_us=percentile(grpcio, 50),
            grpcio_p99_us=percentile(grpcio, 99),
        )
    finally:
        ours.close()
        theirs.close()


# --- the runner's side --------------------------------------------------------------------


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.rpc.status", *args]


def _start(args: list[str], cwd: Path) -> tuple[subprocess.Popen[bytes], int]:
    proc, port, _ = start_ready_server(_command(*args), cwd, f"status phase: {args[0]}")
    return proc, port


_stop = stop_server


def run_status(pki: Path, work: Workload, timeout: float, cwd: Path) -> StatusResult:
    """One round of the status phase: both servers, then the client; the servers stopped."""
    with tempfile.TemporaryDirectory(prefix="trio-jobs-bench-status-") as home:
        jobs, jobs_port = _start(["jobs", "--pki", str(pki), "--home", home], cwd)
        try:
            grpcio, grpcio_port = _start(["grpcio", "--pki", str(pki)], cwd)
            try:
                done = subprocess.run(
                    _command("client", "--jobs-port", str(jobs_port), "--grpcio-port", str(grpcio_port),
                             "--pki", str(pki), "--work", work.to_json()),
                    capture_output=True,
                    timeout=timeout,
                    cwd=cwd,
                    check=False,
                )
            finally:
                _stop(grpcio)
        finally:
            _stop(jobs)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"status client exited {done.returncode}: " + " | ".join(tail))
    return StatusResult.from_json(done.stdout.decode().strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rpc.status")
    parser.add_argument("role", choices=("jobs", "grpcio", "client"))
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--home", type=Path, help="jobs: the server's state directory")
    parser.add_argument("--jobs-port", type=int)
    parser.add_argument("--grpcio-port", type=int)
    parser.add_argument("--work", default=Workload().to_json())
    args = parser.parse_args()
    if args.role == "jobs":
        if args.home is None:
            parser.error("jobs needs --home")
        serve_jobs(args.pki, args.home)
    elif args.role == "grpcio":
        serve_grpcio(args.pki)
    else:
        if args.jobs_port is None or args.grpcio_port is None:
            parser.error("client needs --jobs-port and --grpcio-port")
        result = client(args.jobs_port, args.grpcio_port, args.pki, Workload.from_json(args.work))
        os.write(1, (result.to_json() + "\n").encode())


if __name__ == "__main__":
    main()
