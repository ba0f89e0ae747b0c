"""The official grpcio client, with stubs generated from proto/ at test time, drives every
RPC of the running server with a development PKI certificate."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .conftest import Host

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _stubs(tmp_path: Path) -> Any:
    out = tmp_path / "gen"
    out.mkdir()
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--grpc_python_out={out}", "trio_jobs/v1/jobs.proto"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    path = out / "trio_jobs" / "v1" / "jobs_pb2_grpc.py"
    spec = importlib.util.spec_from_file_location("e2e_jobs_pb2_grpc", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grpcio_client_drives_every_rpc(served: Host, tmp_path: Path) -> None:
    grpc = pytest.importorskip("grpc")
    from google.protobuf.duration_pb2 import Duration

    from trio_jobs.rpc import health_pb2
    from trio_jobs.v1 import jobs_pb2 as pb

    stubs = _stubs(tmp_path)
    pki = served.home / "pki"
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / "alice.key").read_bytes(),
        certificate_chain=(pki / "alice.crt").read_bytes(),
    )
    with grpc.secure_channel(served.address, creds) as channel:
        jobs = stubs.JobServiceStub(channel)
        started = jobs.StartJob(pb.StartJobRequest(command="sh", args=["-c", "echo hi; echo there >&2"]), timeout=30)
        assert started.status.owner == "alice"
        chunks = list(jobs.StreamOutput(pb.StreamOutputRequest(job_id=started.job_id, follow=True), timeout=30))
        assert b"".join(c.data for c in chunks) == b"hi\nthere\n"
        assert chunks[0].offset == 0
        status = jobs.GetJobStatus(pb.GetJobStatusRequest(job_id=started.job_id), timeout=30)
        assert status.state == pb.JOB_STATE_EXITED
        assert status.exit_code == 0
        # follow=false from an offset: what exists from there, then the end
        rest = list(jobs.StreamOutput(pb.StreamOutputRequest(job_id=started.job_id, offset=3), timeout=30))
        assert b"".join(c.data for c in rest) == b"there\n"

        sleeper = jobs.StartJob(
            pb.StartJobRequest(command="sleep", args=["600"], limits=pb.ResourceLimits(memory_bytes=64 << 20)), timeout=30
        )
        assert sleeper.status.limits.memory_bytes == 64 << 20
        stopped = jobs.StopJob(pb.StopJobRequest(job_id=sleeper.job_id, grace_period=Duration(seconds=0)), timeout=30)
        assert stopped.force_ended
        assert stopped.status.state == pb.JOB_STATE_KILLED

        listed = jobs.ListJobs(pb.ListJobsRequest(), timeout=30)
        assert [j.job_id for j in listed.jobs] == [started.job_id, sleeper.job_id]

        with pytest.raises(grpc.RpcError) as denied:
            jobs.ListJobs(pb.ListJobsRequest(all_users=True), timeout=30)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as missing:
            jobs.GetJobStatus(pb.GetJobStatusRequest(job_id="00000000-0000-4000-8000-000000000000"), timeout=30)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as bad:
            jobs.StopJob(pb.StopJobRequest(job_id=sleeper.job_id, grace_period=Duration(seconds=-1)), timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as cannot:
            jobs.StartJob(pb.StartJobRequest(command="/nonexistent/program"), timeout=30)
        assert cannot.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        assert check(health_pb2.HealthCheckRequest(), timeout=30).status == health_pb2.HealthCheckResponse.SERVING
