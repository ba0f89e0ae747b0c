"""Requests whose string fields are not UTF-8 (issue #16, item 9b): INVALID_ARGUMENT, not
INTERNAL, from a real ``trio-jobs serve``, for every method.

The official grpcio client sends hand-made bytes (no serializer), as a hostile or broken
peer would; proto3 forbids such strings, so the request does not parse. The rpc layer's own
tests (tests/rpc/test_request_parse.py) cover the echo and health services.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import pytest

if TYPE_CHECKING:
    from e2e.conftest import Host

pytestmark = pytest.mark.slow

SERVICE: Final = "/trio_jobs.v1.JobService/"
# (method, server-streaming, request bytes, request type); each has a string that is not UTF-8
CASES: Final = [
    ("StartJob", False, b"\x0a\x04ech\xff", "trio_jobs.v1.StartJobRequest"),  # command
    ("StartJob", False, b"\x0a\x04echo\x12\x03\x1b\xc3\x28", "trio_jobs.v1.StartJobRequest"),  # an arg
    ("StartJob", False, b"\x0a\x04echo\x1a\x06\x0a\x01K\x12\x01\x80", "trio_jobs.v1.StartJobRequest"),  # env value
    ("GetJobStatus", False, b"\x0a\x02\xed\xa0", "trio_jobs.v1.GetJobStatusRequest"),  # job_id
    ("StopJob", False, b"\x0a\x01\xfe", "trio_jobs.v1.StopJobRequest"),
    ("StreamOutput", True, b"\x0a\x01\xff\x18\x01", "trio_jobs.v1.StreamOutputRequest"),
    ("ListJobs", False, b"\x1a\x01\xff", "trio_jobs.v1.ListJobsRequest"),  # page_token
]


def test_grpcio_sends_strings_that_are_not_utf8(served: Host) -> None:
    grpc = pytest.importorskip("grpc")
    from trio_jobs.v1 import jobs_pb2 as pb

    pki = served.home / "pki"
    creds = grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.crt").read_bytes(),
        private_key=(pki / "alice.key").read_bytes(),
        certificate_chain=(pki / "alice.crt").read_bytes(),
    )
    with grpc.secure_channel(served.address, creds) as channel:
        for method, streaming, data, type_name in CASES:
            make = channel.unary_stream if streaming else channel.unary_unary
            call = make(SERVICE + method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as info:
                list(call(data, timeout=30)) if streaming else call(data, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value.details())
            assert info.value.details().startswith(
                f"the request is not a valid {type_name}: a string field is not valid UTF-8"
            )
        # the health service too
        check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as info:
            check(b"\x0a\x01\xff", timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # no job was started, and the same channel serves well-formed requests
        listing = channel.unary_unary(
            SERVICE + "ListJobs", request_serializer=None, response_deserializer=pb.ListJobsResponse.FromString
        )(pb.ListJobsRequest().SerializeToString(), timeout=30)
        assert list(listing.jobs) == []
    # Each refused call is in the audit log (DESIGN §7: every refused call of any method),
    # although the rpc layer refused it before the service's handler ran.
    import json

    records = [json.loads(line) for line in (served.home / "audit.jsonl").read_text().splitlines()]
    refused = [(r["method"], r["code"], r["identity"]) for r in records if r["code"] != "OK"]
    assert refused == [(method, "INVALID_ARGUMENT", "alice") for method, *_ in CASES]
    assert all(r["message"].startswith("the request is not a valid") for r in records if r["code"] != "OK")
