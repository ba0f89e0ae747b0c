"""StreamOutput's chunks are serialized by hand (``service.output_chunk``): byte for byte
what protobuf writes for the same OutputChunk, and what protobuf reads back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_jobs.service import output_chunk
from trio_jobs.v1 import jobs_pb2 as pb


def _same_as_protobuf(data: bytes, offset: int) -> None:
    encoded = output_chunk(data, offset).encoded()
    assert encoded == pb.OutputChunk(data=data, offset=offset).SerializeToString()
    back = pb.OutputChunk.FromString(encoded)
    assert (back.data, back.offset) == (data, offset)


@given(data=st.binary(max_size=300), offset=st.one_of(st.integers(0, 300), st.integers(0, 2**63 - 1)))
def test_small_chunks_are_what_protobuf_writes(data: bytes, offset: int) -> None:
    _same_as_protobuf(data, offset)


# lengths around each varint size (1, 2, 3 bytes) and a whole 4 MiB chunk
@pytest.mark.parametrize("size", [127, 128, 16_383, 16_384, 65_536, 2_097_151, 2_097_152, 4 << 20])
@pytest.mark.parametrize("offset", [0, 1, 2**35 + 7, 2**63 - 1])
def test_large_chunks_are_what_protobuf_writes(size: int, offset: int) -> None:
    _same_as_protobuf(bytes(range(256)) * (size // 256) + b"x" * (size % 256), offset)
