"""trio_jobs.worker: run jobs on this host -- processes, cgroups, output log, store.

No network and no protobuf: any trio program can embed it::

    async with open_worker(data_dir) as worker:
        status = await worker.start(JobSpec(command="echo", args=("hi",), owner="me"))
        async for chunk in worker.follow(status.job_id):
            ...

See docs/architecture.md ("worker/") for the contract.
"""

from __future__ import annotations

from .cgroups.base import CgroupDriver, CgroupError, JobCgroup
from .cgroups.none import NoCgroupDriver
from .errors import InvalidArgument, InvalidJobSpec, JobNotFound, WorkerClosed, WorkerError
from .limits import DEFAULT_LIMITS, Limits, MiB, Usage
from .output import OutputReader
from .retention import Retention
from .spec import JobSpec, JobState, JobStatus, OutputChunk, RunAs, StopResult
from .validate import JOB_PATH
from .worker import Worker, open_worker

__all__ = [
    "DEFAULT_LIMITS",
    "JOB_PATH",
    "CgroupDriver",
    "CgroupError",
    "InvalidArgument",
    "InvalidJobSpec",
    "JobCgroup",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "JobStatus",
    "Limits",
    "MiB",
    "NoCgroupDriver",
    "OutputChunk",
    "OutputReader",
    "Retention",
    "RunAs",
    "StopResult",
    "Usage",
    "Worker",
    "WorkerClosed",
    "WorkerError",
    "open_worker",
]
