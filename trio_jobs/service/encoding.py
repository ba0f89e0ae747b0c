"""Responses serialized by hand: the bytes protobuf would write, without its message objects.

Two answers are large and built often: a StreamOutput chunk (64 KiB of output each) and a
ListJobs page (thousands of jobs). Building them as messages would copy every chunk into a
message and parse every cached job back into one, only to serialize it again. Here they are
joined from bytes instead, field by field in the order ``SerializeToString()`` writes them,
and handed to the rpc layer as :class:`~trio_jobs.rpc.Serialized` (sent as they are).
tests/service/test_output_chunk.py compares chunks with protobuf's bytes; the ListJobs tests
(tests/service/test_list_*.py) parse every page with protobuf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..rpc import Serialized
from ..v1 import jobs_pb2 as pb
from .convert import status_to_proto

if TYPE_CHECKING:
    from ..worker import JobStatus


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def output_chunk(data: bytes, offset: int) -> Serialized:
    """``pb.OutputChunk(data=data, offset=offset)`` serialized by hand: the same bytes as
    its ``SerializeToString()`` (field 1, then field 2, proto3 defaults left out), without
    ever copying ``data`` (64 KiB a chunk): not into a message object, not into one
    encoding (the parts are sent as pieces). ``offset`` >= 0."""
    head = b"\x0a" + varint(len(data)) if data else b""
    tail = b"\x10" + varint(offset) if offset else b""
    return Serialized((head, data, tail))  # pieces: ``data`` goes to TLS where it lies


def list_part(status: JobStatus) -> bytes:
    """``status`` as a serialized one-job ``ListJobsResponse`` (the ``jobs`` field's tag,
    length and the JobStatus: concatenated parts parse as one ListJobsResponse)."""
    return pb.ListJobsResponse(jobs=[status_to_proto(status)]).SerializeToString()


def list_response(parts: list[bytes], next_page_token: str = "") -> Serialized:
    """A serialized ListJobsResponse: the parts are its ``jobs`` field already (see
    :func:`list_part`), then ``next_page_token`` (field 2) if any. Sent as it is, without
    parsing it into a message and serializing that again. Appends to ``parts``."""
    if next_page_token:
        token = next_page_token.encode()
        parts.append(b"\x12" + varint(len(token)) + token)
    return Serialized(b"".join(parts))
