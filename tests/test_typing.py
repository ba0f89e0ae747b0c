"""The public modules' typed surface: rpc ``Method`` is generic in its messages, so mypy
refuses a handler that takes, returns or sends another message; the JobService table is
spelled out for that and matches the proto; ``__all__`` of the public modules.

The mypy test runs mypy as ``./dev test`` does (the project's configuration, its cache in
.mypy_cache, from the repository root) on a snippet: ~0.5 s once ``mypy`` has run, ~10 s
with a cold cache.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Final

import pytest
from google.protobuf import message_factory

from trio_jobs.rpc import Method, service_from_descriptor
from trio_jobs.security.policy import Policy
from trio_jobs.service import JobService, job_service_methods
from trio_jobs.v1 import jobs_pb2
from trio_jobs.worker import open_worker

ROOT: Final = Path(__file__).resolve().parent.parent

# Each line marked "# wrong" must be an error, and no other line may be.
SNIPPET: Final = textwrap.dedent('''
    from __future__ import annotations

    from collections.abc import Awaitable, Callable

    from trio_jobs.rpc import Method, Serialized, ServerContext
    from trio_jobs.rpc._service import StreamSend
    from trio_jobs.rpc.health_pb2 import HealthCheckRequest as Req
    from trio_jobs.rpc.health_pb2 import HealthCheckResponse as Resp
    from trio_jobs.v1.jobs_pb2 import JobStatus


    async def answers(request: Req, ctx: ServerContext) -> Resp:
        return Resp()


    async def answers_serialized(request: Req, ctx: ServerContext) -> Resp | Serialized:
        return Serialized(b"")


    async def streams(request: Req, ctx: ServerContext, send: StreamSend[Resp]) -> None:
        await send(Resp())
        await send(Serialized(b""))
        await send(Req())  # wrong: sends another message


    async def answers_request(request: Req, ctx: ServerContext) -> Req:
        return request


    async def takes_status(request: JobStatus, ctx: ServerContext) -> Resp:
        return Resp()


    async def streams_requests(request: Req, ctx: ServerContext, send: Callable[[Req], Awaitable[None]]) -> None:
        await send(request)


    path = "/grpc.health.v1.Health/Check"
    fine: list[Method] = [
        Method(path=path, request_type=Req, response_type=Resp, handler=answers),
        Method(path=path, request_type=Req, response_type=Resp, handler=answers_serialized),
        Method(path=path, request_type=Req, response_type=Resp, handler=streams, server_streaming=True),
    ]
    Method(path=path, request_type=Req, response_type=Resp, handler=answers_request)  # wrong: returns a Req
    Method(path=path, request_type=Req, response_type=Resp, handler=takes_status)  # wrong: takes a JobStatus
    Method(path=path, request_type=Req, response_type=Resp, handler=streams_requests)  # wrong: sends Reqs
    typed: Method[Req, JobStatus] = Method(path=path, request_type=Req, response_type=Resp, handler=answers)  # wrong
''')


def test_mypy_refuses_a_handler_of_other_messages(tmp_path: Path) -> None:
    snippet = tmp_path / "method_types_snippet.py"
    snippet.write_text(SNIPPET)
    wanted = {n for n, line in enumerate(SNIPPET.splitlines(), 1) if "# wrong" in line}
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-error-summary", "--show-error-codes", str(snippet)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    report = done.stdout + done.stderr
    # by name: for an unchanged snippet mypy replays its cached report, which names the
    # directory of the run that made it
    errors = {int(m[1]) for m in re.finditer(rf"^\S*/{snippet.name}:(\d+): error:", report, re.M)}
    assert done.returncode == (1 if wanted else 0), report
    assert errors == wanted, report
    assert len(wanted) == 5


async def test_the_job_service_table_is_the_descriptors(tmp_path: Path) -> None:
    """The spelled-out table serves exactly the proto's methods, with its message classes."""
    descriptor = jobs_pb2.DESCRIPTOR.services_by_name["JobService"]
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.default())
        table = job_service_methods(service)
        by_name = service_from_descriptor(descriptor, service)

        def shape(methods: list[Method]) -> list[tuple[object, ...]]:
            return [(m.path, m.request_type, m.response_type, m.server_streaming, m.handler) for m in methods]

        assert shape(table) == shape(by_name)
        for method, proto in zip(table, descriptor.methods, strict=True):
            assert method.request_type is message_factory.GetMessageClass(proto.input_type)
            assert method.response_type is message_factory.GetMessageClass(proto.output_type)
        await worker.shutdown(0)


@pytest.mark.parametrize("module", ["trio_jobs.client", "trio_jobs.service", "trio_jobs.server", "trio_jobs.rpc"])
def test_public_modules_say_what_they_export(module: str) -> None:
    mod = importlib.import_module(module)
    names = mod.__all__
    assert len(set(names)) == len(names)
    missing = [name for name in names if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ names what it does not have: {missing}"
    star: dict[str, object] = {}
    exec(f"from {module} import *", star)  # the star import is what is tested
    assert set(star) - {"__builtins__"} == set(names)
