"""The service's tunables: bounds on requests, per-identity caps, cache budgets, page sizes.

Every number the service chooses is here, each with the reason for its value; the modules
that use them (handlers, caches, paging) hold none of their own. Tests that change one
patch it where it is used (e.g. ``trio_jobs.service.paging.LIST_SLICE``).
"""

from __future__ import annotations

from typing import Final

# -- requests --------------------------------------------------------------------------------

MAX_GRACE_SECONDS: Final = 3600.0
"""An upper bound on StopJob's grace period, so one request cannot pin a job for years."""

MAX_ARGS_BYTES: Final = 1 << 20
"""argv + env of one job, in bytes (the kernel's own limit is a few MiB; keep well under)."""

DEFAULT_MAX_STREAMS_PER_IDENTITY: Final = 64
"""Concurrent StreamOutput calls one identity may hold open. Each costs a handler task and a
reader (a few KiB, no output buffered), but nothing else bounds them across connections: the
rpc layer caps streams per *connection* (100) and connections per *server* (1000), so one
certificate could otherwise hold 100,000 followers."""

# -- caches of ended jobs (caches.py) --------------------------------------------------------

LIST_CACHE_BUDGET: Final = 8 << 20
"""Bytes the ListJobs cache of ended jobs may use (see :class:`ListParts`): about 28,000
ended jobs like ``/bin/true`` (a 131-byte part + the overhead below = ~290 bytes each)."""
LIST_CACHE_ENTRY_OVERHEAD: Final = 160
"""What one cache entry costs besides its serialized part, in bytes, as counted against the
budget: the job id string (85), the bytes object's header (33) and the dict slot (~21-42
with its growth), measured with sys.getsizeof and tracemalloc on CPython 3.11."""
LIST_CACHE_MAX_PART: Final = 16 << 10
"""A bigger part (a job with very long arguments) is never cached: it would crowd out ~50
ordinary ones, and converting it again costs little next to sending it."""
STATUS_CACHE_BUDGET: Final = 4 << 20
"""Bytes the GetJobStatus cache of ended jobs may use (see :class:`FinalStatuses`): about
11,000 ended jobs like ``/bin/true`` (a 123-byte status + the overhead below)."""
STATUS_CACHE_ENTRY_OVERHEAD: Final = 240
"""What one entry of that cache costs besides its serialized status, in bytes: the job id
string (85), the bytes object's header (33), the (owner, status) tuple (56; the owner string
is interned, one per identity) and the ordered dict's slot and link (~70), measured with
tracemalloc on CPython 3.11 (~240 per entry over 20,000 entries)."""

# -- ListJobs pages (paging.py) --------------------------------------------------------------

LIST_PAGE_BYTES: Final = (4 << 20) - (64 << 10)
"""The most bytes of jobs in one ListJobs answer: under the 4 MiB message limit that gRPC
clients apply by default (ours and grpcio's), so no client ever gets RESOURCE_EXHAUSTED."""

LIST_CONCURRENCY: Final = 4
"""ListJobs pages built at once, server-wide, and one at a time per identity; further calls
wait their turn (FIFO). A page is CPU work on the one event loop, so running more at once
makes none of them faster; it only multiplies the memory they hold meanwhile (up to a page
of parts and a batch of conversions each). Unbounded, 200 soak clients listing ~2,000 jobs
each kept a dozen pages in flight, and every new peak of small objects left the server's
heap larger for good (pymalloc frees an arena only when all its objects are gone). Per
identity, so that one user's burst of lists holds at most one of the slots. Sending a
finished page is outside the bound."""

LIST_SLICE: Final = 16384
"""Job ids read (and parts looked up) at a time while filling a page: more than a full page
holds (~11,000 jobs), so an unpaged list of a long history is one store query."""
LIST_CONVERT_BATCH: Final = 512
"""Jobs whose part is not cached are read and converted this many at a time. A status is
~2 KB of Python objects while it is converted: a list of 16,384 misses (a history beyond
the cache's budget) made the server's heap peak ~30 MB higher per call. This bounds one
call; ``LIST_CONCURRENCY`` bounds how many run at once."""
LIST_CONVERT_IN_THREAD: Final = 64
"""More cache misses than this (e.g. the first list after a restart) are converted in a
worker thread, so a cold list of a long history does not hold up every other call."""
