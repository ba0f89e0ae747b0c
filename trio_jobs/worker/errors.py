"""The worker layer's exceptions: one base class, one subclass per kind of failure.

The service maps them onto gRPC status codes (InvalidArgument -> INVALID_ARGUMENT,
JobNotFound -> NOT_FOUND, WorkerClosed -> UNAVAILABLE). Every message says what to fix.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker layer raises on purpose."""


class InvalidArgument(WorkerError):
    """A request argument is invalid (e.g. a negative output offset)."""


class InvalidJobSpec(InvalidArgument):
    """The job spec cannot be run: the message says which field and why. No job was created."""


class JobNotFound(WorkerError):
    """No job with this id exists in this worker's store."""


class WorkerClosed(WorkerError):
    """The worker is shutting down (or shut down) and accepts no new jobs."""
