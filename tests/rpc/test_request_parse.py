"""A request message that does not parse is the client's fault: INVALID_ARGUMENT, every method.

proto3 requires string fields to be UTF-8; a peer that sends other bytes (a hand-made
request, a buggy client) gets INVALID_ARGUMENT naming the message type, from the rpc layer
and for every method of every service, before any handler runs; the connection stays
usable. grpc's statuscodes.md says INTERNAL for this ("Error parsing request proto"); grpcio's
sync server answers INTERNAL and its aio server UNKNOWN (seen with the grpcio pinned here:
the DecodeError is "raised by servicer method"). We answer INVALID_ARGUMENT on purpose
(issue #16): INTERNAL and UNKNOWN read as a server fault, and clients retry them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
import trio

from trio_jobs.rpc import Channel, RpcError, StatusCode, connect, health_pb2

from .echo import STREAM, UNARY, EchoReply, EchoRequest

if TYPE_CHECKING:
    import ssl

    from .peers import OurServer

BOUND = 20
HEALTH = "/grpc.health.v1.Health/Check"
# EchoRequest.fail_message (field 6, a string) holding the bytes ff fe: not UTF-8
BAD_UTF8_ECHO = b"\x32\x02\xff\xfe"
# HealthCheckRequest.service (field 1, a string) holding a lone continuation byte
BAD_UTF8_HEALTH = b"\x0a\x01\x80"
# a length-delimited field whose length runs past the end of the message
CORRUPT = b"\x32\x05ab"


class Raw:
    """Bytes sent as the request message as they are (our client serializes through this)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:
        return self.data


async def call(ch: Channel, path: str, request: Any, response_type: Any) -> None:
    """One call of ``path`` (a server stream is read to its end)."""
    if path == STREAM:
        async with ch.server_stream(path, request, response_type) as stream:
            async for _ in stream:
                pass
    else:
        await ch.unary(path, request, response_type)


def test_the_bytes_really_do_not_parse() -> None:
    from google.protobuf.message import DecodeError

    for data, kind in ((BAD_UTF8_ECHO, EchoRequest), (CORRUPT, EchoRequest), (BAD_UTF8_HEALTH, health_pb2.HealthCheckRequest)):
        with pytest.raises(DecodeError):
            kind.FromString(data)


@pytest.mark.parametrize(
    ("path", "data", "type_name", "why"),
    [
        (UNARY, BAD_UTF8_ECHO, "test.echo.EchoRequest", "a string field is not valid UTF-8"),
        (STREAM, BAD_UTF8_ECHO, "test.echo.EchoRequest", "a string field is not valid UTF-8"),
        (HEALTH, BAD_UTF8_HEALTH, "grpc.health.v1.HealthCheckRequest", "a string field is not valid UTF-8"),
        (UNARY, CORRUPT, "test.echo.EchoRequest", "the bytes are not its protobuf encoding"),
        (STREAM, CORRUPT, "test.echo.EchoRequest", "the bytes are not its protobuf encoding"),
    ],
)
async def test_unparseable_request_is_invalid_argument(
    our_server: OurServer, client_ctx: ssl.SSLContext, path: str, data: bytes, type_name: str, why: str
) -> None:
    response_type: Any = health_pb2.HealthCheckResponse if path == HEALTH else EchoReply
    with trio.fail_after(BOUND):
        async with connect("127.0.0.1", our_server.port, ssl_context=client_ctx, server_hostname="localhost") as ch:
            with pytest.raises(RpcError) as info:
                await call(ch, path, Raw(data), response_type)
            assert info.value.code == StatusCode.INVALID_ARGUMENT
            assert info.value.message.startswith(f"the request is not a valid {type_name}: {why}")
            assert not our_server.echo.started.is_set()  # refused before any handler ran
            # the same connection still serves well-formed requests
            reply = await ch.unary(UNARY, EchoRequest(payload=b"ok", fail_message="\u00e9t\u00e9"), EchoReply)
            assert reply.payload == b"ok"

