"""JobService: the proto API (``trio_jobs.v1``) mapped onto the worker and the policy.

This package is the only bridge between :mod:`trio_jobs.worker` (jobs, no protobuf) and
:mod:`trio_jobs.rpc` (gRPC, no jobs). Serve it with ``job_service_methods(JobService(...))``.
One job per module:

- ``handlers``  -- :class:`JobService` (the RPCs: caller, checks, worker, errors translated)
  and :func:`job_service_methods` (its method table);
- ``validate``  -- request checks (INVALID_ARGUMENT, saying what to fix);
- ``refusals``  -- the errors every handler shares (NOT_FOUND, UNAVAILABLE);
- ``follow``    -- StreamOutput: sending a job's output, the final status in the trailers,
  the per-identity cap on open streams;
- ``paging``    -- ListJobs pages: slices, the byte cut, page tokens, the bound on builders;
- ``caches``    -- the serialized answers of ended jobs (ListParts, FinalStatuses);
- ``encoding``  -- answers serialized by hand (an OutputChunk, a ListJobs page);
- ``convert``   -- worker values <-> proto messages, and the limits merge;
- ``tuning``    -- every number the service chooses, with why.
"""

from __future__ import annotations

from .caches import FinalStatuses as FinalStatuses
from .caches import ListParts as ListParts
from .caches import final_entry as final_entry
from .convert import effective_limits, limits_to_proto, status_to_proto, usage_to_proto
from .encoding import list_part as list_part
from .encoding import output_chunk
from .follow import FINAL_STATUS_KEY
from .handlers import JobService, job_service_methods
from .tuning import DEFAULT_MAX_STREAMS_PER_IDENTITY, MAX_ARGS_BYTES, MAX_GRACE_SECONDS
from .tuning import LIST_CACHE_ENTRY_OVERHEAD as LIST_CACHE_ENTRY_OVERHEAD
from .tuning import LIST_CACHE_MAX_PART as LIST_CACHE_MAX_PART
from .tuning import STATUS_CACHE_ENTRY_OVERHEAD as STATUS_CACHE_ENTRY_OVERHEAD

# What ``from trio_jobs.service import *`` gives, as before the split. The names imported
# "as" themselves above are importable too (the tests' caches and overheads), not starred.
__all__ = [
    "DEFAULT_MAX_STREAMS_PER_IDENTITY",
    "FINAL_STATUS_KEY",
    "MAX_ARGS_BYTES",
    "MAX_GRACE_SECONDS",
    "JobService",
    "effective_limits",
    "job_service_methods",
    "limits_to_proto",
    "output_chunk",
    "status_to_proto",
    "usage_to_proto",
]
