"""status/list tables and the proto3 JSON mapping."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from trio_jobs.cli.output import describe_state, list_table, status_table, to_json
from trio_jobs.client import JobInfo, JobLimits
from trio_jobs.v1 import jobs_pb2 as pb

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _ts(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def job(**kw: object) -> pb.JobStatus:
    msg = pb.JobStatus(
        job_id="8e0f5f5e-6f0b-4c59-9a44-3b8a6c1f2d10",
        owner="alice",
        command="/usr/bin/sh",
        args=["-c", "echo 'a b'"],
        state=pb.JOB_STATE_RUNNING,
        created_at=_ts(T0),
        limits=JobLimits(cpu_millis=1500, memory_bytes=512 << 20, pids_max=64).to_proto(),
        output_bytes=12,
    )
    for k, v in kw.items():
        if isinstance(v, datetime):
            getattr(msg, k).CopyFrom(_ts(v))
        else:
            setattr(msg, k, v)
    return msg


def test_states() -> None:
    assert describe_state(JobInfo.from_proto(job())) == "running"
    assert describe_state(JobInfo.from_proto(job(state=pb.JOB_STATE_EXITED, exit_code=0))) == "exited 0"
    killed = JobInfo.from_proto(job(state=pb.JOB_STATE_KILLED, signal=9, stopped_by_user=True, oom_killed=True))
    assert describe_state(killed) == "killed SIGKILL (stopped by user, out of memory)"
    assert killed.exit_status == 137
    lost = JobInfo.from_proto(job(state=pb.JOB_STATE_LOST))
    assert lost.state == "lost"
    assert lost.exit_status is None


def test_status_table() -> None:
    info = JobInfo.from_proto(job(state=pb.JOB_STATE_EXITED, exit_code=3, ended_at=datetime(2026, 1, 2, 3, 4, 7, 500000, tzinfo=UTC)))
    table = status_table(info)
    assert "command  /usr/bin/sh -c 'echo '\"'\"'a b'\"'\"''" in table
    assert "state    exited 3" in table
    assert "runtime  2.5s" in table
    assert "cpus 1.5, memory 512M, pids 64" in table
    assert "created  2026-01-02 03:04:05 UTC" in table


def test_list_table_columns_line_up() -> None:
    jobs = [JobInfo.from_proto(job()), JobInfo.from_proto(job(job_id="x", owner="bob", state=pb.JOB_STATE_LOST))]
    lines = list_table(jobs, show_owner=True, now=T0).splitlines()
    assert lines[0].split() == ["JOB", "ID", "OWNER", "STATE", "CREATED", "RUNTIME", "COMMAND"]
    assert lines[0].index("OWNER") == lines[1].index("alice") == lines[2].index("bob")
    assert list_table([], show_owner=False) == "no jobs"


def test_json_uses_proto_field_names() -> None:
    data = json.loads(to_json(job(state=pb.JOB_STATE_EXITED, exit_code=0)))
    assert data["job_id"].startswith("8e0f")
    assert data["state"] == "JOB_STATE_EXITED"
    assert data["exit_code"] == 0
    assert data["limits"] == {"cpu_millis": "1500", "memory_bytes": str(512 << 20), "pids_max": "64"}
    assert data["stopped_by_user"] is False
    listing = json.loads(to_json(pb.ListJobsResponse(jobs=[job()])))
    assert [j["owner"] for j in listing["jobs"]] == ["alice"]
