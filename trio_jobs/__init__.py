"""trio-jobs: run Linux processes on a host for remote, authenticated users.

Layers (each importable on its own, see docs/architecture.md):

- :mod:`trio_jobs.worker` -- jobs on this host: processes, cgroups, output log, store.
- :mod:`trio_jobs.rpc` -- a general gRPC-over-HTTP/2 layer for trio.
- :mod:`trio_jobs.security` -- PKI, TLS contexts, identities, authorization policy.
- :mod:`trio_jobs.service` / :mod:`trio_jobs.client` -- the JobService API and its client.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import JobsClient


def __getattr__(name: str) -> object:
    # Lazy, so that importing one layer (e.g. trio_jobs.worker) does not import the client,
    # the rpc layer and protobuf.
    if name == "JobsClient":
        from .client import JobsClient

        return JobsClient
    raise AttributeError(f"module 'trio_jobs' has no attribute {name!r}")


__all__ = ["JobsClient", "__version__"]
