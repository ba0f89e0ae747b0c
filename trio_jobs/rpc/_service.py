"""Server-side handler registration: Method, ServerContext, descriptors, health."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NoReturn, final

from google.protobuf import message_factory

from . import health_pb2
from ._headers import MetadataError, encode_metadata
from ._status import Metadata, RpcError, StatusCode

if TYPE_CHECKING:
    from google.protobuf.descriptor import ServiceDescriptor
    from google.protobuf.message import Message

    # PEP 696 defaults (in typing from 3.13; typing_extensions only for the type checker):
    # a bare ``Method`` -- a server's ``list[Method]`` of mixed methods -- means
    # ``Method[Any, Any]``, while a Method built from its message types is checked against
    # them (``Method(request_type=A, response_type=B, handler=h)``: h must take an A and
    # answer a B).
    from typing_extensions import TypeVar

    Req = TypeVar("Req", bound=Message, default=Any)
    Resp = TypeVar("Resp", bound=Message, default=Any)
else:
    from typing import TypeVar

    Req = TypeVar("Req", bound="Message")
    Resp = TypeVar("Resp", bound="Message")


@final
@dataclass(frozen=True, slots=True)
class Serialized:
    """A response message the handler serialized itself, for ``send`` (or to return):
    ``data`` must be a valid encoding of the method's response type (it is sent as it is,
    without the type check and the ``SerializeToString`` of a message object). For a
    streaming handler whose messages are mostly one big field, built without a copy into a
    message object first. ``data`` may be the encoding's parts in order (e.g. a field's tag
    and length, then its bytes): they go to the TLS layer as pieces, never joined."""

    data: bytes | tuple[bytes, ...]

    @property
    def size(self) -> int:
        """The length of the encoding."""
        data = self.data
        return len(data) if isinstance(data, bytes) else sum(len(p) for p in data)

    def encoded(self) -> bytes:
        """The encoding as one bytes object (a copy when it is in parts)."""
        return self.data if isinstance(self.data, bytes) else b"".join(self.data)


#: A unary handler: ``async def h(request: Req, ctx) -> Resp`` (or a :class:`Serialized`).
UnaryHandler = Callable[[Req, "ServerContext"], Awaitable[Resp | Serialized]]
#: What a streaming handler is given to send each message with.
StreamSend = Callable[[Resp | Serialized], Awaitable[None]]
#: A server-streaming handler: ``async def h(request: Req, ctx, send: StreamSend[Resp]) -> None``.
StreamHandler = Callable[[Req, "ServerContext", StreamSend[Resp]], Awaitable[None]]


@final
@dataclass(frozen=True, kw_only=True)
class Method(Generic[Req, Resp]):
    """One RPC the server answers: ``path`` is ``/package.Service/Method``.

    Generic in its request and response types, inferred from ``request_type`` and
    ``response_type``, so that a type checker refuses a handler that takes or answers
    (returns, or ``send``s) another message.
    """

    path: str
    request_type: type[Req]
    response_type: type[Resp]
    handler: UnaryHandler[Req, Resp] | StreamHandler[Req, Resp]
    server_streaming: bool = False
    # Told of a call the server refuses before the handler runs (its request does not parse,
    # is too large, ...), e.g. to log it; must not block or raise.
    refused: Callable[[ServerContext, RpcError], None] | None = None


@final
class ServerContext:
    """What a handler knows about its call, and how it sets the outcome."""

    __slots__ = (
        "close_requested",
        "deadline",
        "invocation_metadata",
        "method",
        "peer",
        "peer_certificate",
        "peer_identity",
        "trailing_metadata",
    )

    def __init__(
        self,
        *,
        method: str,
        peer_identity: str | None,
        peer_certificate: dict[str, Any] | None,
        invocation_metadata: Metadata,
        deadline: float | None,
        peer: str | None = None,
    ) -> None:
        self.method = method
        # The client's address as "ip:port" ("[v6]:port"); None when the transport is not
        # an IP socket (memory streams in tests).
        self.peer = peer
        self.peer_identity = peer_identity
        self.peer_certificate = peer_certificate
        self.invocation_metadata = invocation_metadata
        self.deadline = deadline  # trio.current_time() based, None = no deadline
        self.trailing_metadata: Metadata = ()
        self.close_requested = False

    def close_connection(self) -> None:
        """Close this call's connection once the call's status has been sent.

        The server then sends GOAWAY(NO_ERROR) (no new calls on the connection), lets calls
        already running on it finish within its ``drain_timeout`` and closes it. For a peer
        that must not keep a connection open, e.g. one whose identity is refused: it would
        otherwise hold a connection slot for as long as it likes. Call it before returning
        or raising; the call itself ends as usual.
        """
        self.close_requested = True

    def set_trailing_metadata(self, md: Metadata) -> None:
        """Metadata sent with the status; validated now (raises ValueError if invalid)."""
        try:
            encode_metadata(md)
        except MetadataError as exc:
            raise ValueError(str(exc)) from exc
        self.trailing_metadata = tuple(md)

    def abort(self, code: StatusCode, message: str) -> NoReturn:
        """End the call with ``code`` (not OK) and ``message``."""
        if code == StatusCode.OK:
            raise ValueError("abort() needs an error code, not OK")
        raise RpcError(code, message, self.trailing_metadata)


def service_from_descriptor(descriptor: ServiceDescriptor, impl: object) -> list[Method]:
    """Methods of ``descriptor`` bound to ``impl``'s async methods of the same names.

    Unary and server-streaming RPCs only; raises ValueError for a client-streaming
    method and TypeError when ``impl`` lacks one.
    """
    methods: list[Method] = []
    for m in descriptor.methods:
        if m.client_streaming:
            raise ValueError(f"{descriptor.full_name}.{m.name}: client streaming is not supported")
        handler = getattr(impl, m.name, None)
        if handler is None or not callable(handler):
            raise TypeError(f"{type(impl).__name__} has no method {m.name}")
        methods.append(
            Method(
                path=f"/{descriptor.full_name}/{m.name}",
                request_type=message_factory.GetMessageClass(m.input_type),
                response_type=message_factory.GetMessageClass(m.output_type),
                handler=handler,
                server_streaming=m.server_streaming,
            )
        )
    return methods


def health_service(status: Callable[[str], bool] | None = None) -> list[Method]:
    """``grpc.health.v1.Health/Check``; ``status(service)`` says whether it is serving.

    Without ``status`` the server reports SERVING for "" and NOT_FOUND for any named
    service (what grpc's reference health server does for unknown services).
    """

    async def check(
        request: health_pb2.HealthCheckRequest, ctx: ServerContext
    ) -> health_pb2.HealthCheckResponse:
        if status is None:
            if request.service:
                ctx.abort(StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
            serving = True
        else:
            serving = status(request.service)
        return health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    return [
        Method(
            path="/grpc.health.v1.Health/Check",
            request_type=health_pb2.HealthCheckRequest,
            response_type=health_pb2.HealthCheckResponse,
            handler=check,
        )
    ]
