"""trio-jobs: run Linux processes on a host for remote, authenticated users.

Layers (each importable on its own, see docs/architecture.md):

- :mod:`trio_jobs.worker` -- jobs on this host: processes, cgroups, output log, store.
- :mod:`trio_jobs.rpc` -- a general gRPC-over-HTTP/2 layer for trio.
- :mod:`trio_jobs.security` -- PKI, TLS contexts, identities, authorization policy.
- :mod:`trio_jobs.service` / :mod:`trio_jobs.client` -- the JobService API and its client.
"""

from __future__ import annotations

__version__ = "0.1.0"
