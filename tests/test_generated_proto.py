"""The committed protobuf modules are exactly what ``./dev proto`` generates from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2.py*"))
    assert generated, "the generator wrote nothing"
    stale = [str(rel) for rel in generated if (ROOT / rel).read_bytes() != (tmp_path / rel).read_bytes()]
    assert not stale, f"stale generated code, run ./dev proto: {stale}"


def test_api_names_match_the_contract() -> None:
    from trio_jobs.v1 import jobs_pb2

    service = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]
    assert [m.name for m in service.methods] == [
        "StartJob",
        "StopJob",
        "GetJobStatus",
        "StreamOutput",
        "ListJobs",
    ]
    assert service.full_name == "trio_jobs.v1.JobService"
    status_fields = set(jobs_pb2.JobStatus.DESCRIPTOR.fields_by_name)
    assert {
        "job_id", "owner", "command", "args", "state", "exit_code", "signal",
        "stopped_by_user", "oom_killed", "created_at", "ended_at", "limits", "usage",
        "output_bytes", "output_truncated",
    } <= status_fields
