"""A tiny test service, defined at import time from a FileDescriptorProto (no protoc).

``test.echo.Echo`` has ``Unary(EchoRequest) -> EchoReply`` and
``Stream(EchoRequest) -> stream EchoReply``. The same request fields drive both our
implementation (:class:`TrioEcho`) and the grpcio one (:func:`grpcio_handlers`):

- ``payload``: echoed back (Unary) / ``size`` bytes per reply (Stream), ``count`` replies;
- ``sleep``: seconds to sleep before answering (handler cancellation is recorded);
- ``fail_code``/``fail_message``: end with that status;
- request metadata with keys starting ``x-`` is echoed as initial and trailing metadata.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import trio
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from trio_jobs.rpc import Method, ServerContext, StatusCode, service_from_descriptor

_F = descriptor_pb2.FieldDescriptorProto


def _build() -> Any:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="test_echo_rpc.proto", package="test.echo", syntax="proto3"
    )
    req = fdp.message_type.add(name="EchoRequest")
    for number, (name, ftype) in enumerate(
        [
            ("payload", _F.TYPE_BYTES),
            ("count", _F.TYPE_UINT32),
            ("size", _F.TYPE_UINT32),
            ("sleep", _F.TYPE_DOUBLE),
            ("fail_code", _F.TYPE_UINT32),
            ("fail_message", _F.TYPE_STRING),
        ],
        start=1,
    ):
        req.field.add(name=name, number=number, type=ftype, label=_F.LABEL_OPTIONAL)
    rep = fdp.message_type.add(name="EchoReply")
    rep.field.add(name="payload", number=1, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
    rep.field.add(name="index", number=2, type=_F.TYPE_UINT32, label=_F.LABEL_OPTIONAL)
    svc = fdp.service.add(name="Echo")
    svc.method.add(
        name="Unary", input_type=".test.echo.EchoRequest", output_type=".test.echo.EchoReply"
    )
    svc.method.add(
        name="Stream",
        input_type=".test.echo.EchoRequest",
        output_type=".test.echo.EchoReply",
        server_streaming=True,
    )
    pool = descriptor_pool.DescriptorPool()
    return pool.Add(fdp)


FILE = _build()
SERVICE = FILE.services_by_name["Echo"]
EchoRequest: Any = message_factory.GetMessageClass(FILE.message_types_by_name["EchoRequest"])
EchoReply: Any = message_factory.GetMessageClass(FILE.message_types_by_name["EchoReply"])
UNARY = "/test.echo.Echo/Unary"
STREAM = "/test.echo.Echo/Stream"


def echoed(md: Any) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((k, v) for k, v in md if k.startswith("x-"))


class TrioEcho:
    """Our implementation; records what handlers saw so tests can assert on it."""

    def __init__(self) -> None:
        self.cancelled = trio.Event()
        self.started = trio.Event()
        self.finished = 0
        self.sent = 0  # messages Stream handed to send() so far
        self.identities: list[str | None] = []
        self.deadlines: list[float | None] = []

    def methods(self) -> list[Method]:
        return service_from_descriptor(SERVICE, self)

    async def Unary(self, request: Any, ctx: ServerContext) -> Any:
        self.identities.append(ctx.peer_identity)
        self.deadlines.append(ctx.deadline)
        ctx.set_trailing_metadata(echoed(ctx.invocation_metadata))
        self.started.set()
        try:
            if request.sleep:
                await trio.sleep(request.sleep)
        except trio.Cancelled:
            self.cancelled.set()
            raise
        if request.fail_code:
            ctx.abort(StatusCode(request.fail_code), request.fail_message)
        self.finished += 1
        return EchoReply(payload=request.payload or b"x" * request.size)

    async def Stream(self, request: Any, ctx: ServerContext, send: Any) -> None:
        ctx.set_trailing_metadata(echoed(ctx.invocation_metadata))
        chunk = b"s" * request.size
        self.started.set()
        try:
            for i in range(request.count):
                await send(EchoReply(payload=chunk, index=i))
                self.sent += 1
                if request.sleep:
                    await trio.sleep(request.sleep)
        except trio.Cancelled:
            self.cancelled.set()
            raise
        if request.fail_code:
            ctx.abort(StatusCode(request.fail_code), request.fail_message)
        self.finished += 1


class GrpcioEcho:
    """The grpcio (aio) implementation of the same service."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.started = threading.Event()

    def handler(self) -> Any:
        import grpc

        async def unary(request: Any, context: Any) -> Any:
            md = echoed(context.invocation_metadata() or ())
            await context.send_initial_metadata(md)
            context.set_trailing_metadata(md)
            self.started.set()
            try:
                if request.sleep:
                    await asyncio.sleep(request.sleep)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            if request.fail_code:
                await context.abort(_grpc_code(request.fail_code), request.fail_message)
            return EchoReply(payload=request.payload or b"x" * request.size)

        async def stream(request: Any, context: Any) -> Any:
            md = echoed(context.invocation_metadata() or ())
            context.set_trailing_metadata(md)
            chunk = b"s" * request.size
            self.started.set()
            # Cancelled at the `await`, grpcio raises CancelledError in the generator; while it
            # waits at the `yield` (flow control) it closes the generator instead (GeneratorExit
            # there). Either is the client's cancel reaching the server.
            finished = False
            try:
                for i in range(request.count):
                    yield EchoReply(payload=chunk, index=i)
                    if request.sleep:
                        await asyncio.sleep(request.sleep)
                finished = True
            finally:
                if not finished:
                    self.cancelled.set()
            if request.fail_code:
                await context.abort(_grpc_code(request.fail_code), request.fail_message)

        return grpc.method_handlers_generic_handler(
            "test.echo.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(
                    unary,
                    request_deserializer=EchoRequest.FromString,
                    response_serializer=EchoReply.SerializeToString,
                ),
                "Stream": grpc.unary_stream_rpc_method_handler(
                    stream,
                    request_deserializer=EchoRequest.FromString,
                    response_serializer=EchoReply.SerializeToString,
                ),
            },
        )


def _grpc_code(n: int) -> Any:
    import grpc

    for code in grpc.StatusCode:
        if code.value[0] == n:
            return code
    raise ValueError(n)
