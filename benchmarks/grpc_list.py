"""``trio-jobs list`` the smallest way with grpcio: one secure channel, one ListJobs,
print the answer. ``benchmarks/cli.py`` times this whole process against the CLI's.

``python benchmarks/grpc_list.py`` with ``TRIO_JOBS_HOME`` (its ``pki/`` holds the
admin certificate) and ``TRIO_JOBS_SERVER`` (HOST:PORT) set, as for the CLI.
"""

from __future__ import annotations

import os

import grpc

from trio_jobs.v1 import jobs_pb2


def read(name: str) -> bytes:
    with open(os.path.join(os.environ["TRIO_JOBS_HOME"], "pki", name), "rb") as f:
        return f.read()


def main() -> None:
    creds = grpc.ssl_channel_credentials(read("ca.crt"), read("admin.key"), read("admin.crt"))
    with grpc.secure_channel(os.environ["TRIO_JOBS_SERVER"], creds) as channel:
        call = channel.unary_unary(
            "/trio_jobs.v1.JobService/ListJobs",
            request_serializer=jobs_pb2.ListJobsRequest.SerializeToString,
            response_deserializer=jobs_pb2.ListJobsResponse.FromString,
        )
        print(call(jobs_pb2.ListJobsRequest(), timeout=30))


if __name__ == "__main__":
    main()
