"""The same handshake refusals against the real ``trio_jobs.rpc.Server``: no handler ever runs.

Each client completes whatever TCP/TLS it can, then (if TLS let it) sends a complete, valid
gRPC request on HTTP/2 and reads until the server closes. A positive control with the same
client proves the harness sees a handler run when one does.
"""

from __future__ import annotations

import datetime as dt
import ssl
import struct
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import pytest
import trio

from trio_jobs.rpc import Method, Server, ServerContext
from trio_jobs.rpc.health_pb2 import HealthCheckRequest, HealthCheckResponse
from trio_jobs.security import identity_from_peercert, tls
from trio_jobs.security.pki import generate_ca, generate_client, load_pair, write_pair

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

BOUND = 10  # seconds: an upper bound only
PATH = "/grpc.health.v1.Health/Check"


class Recorder:
    def __init__(self) -> None:
        self.identities: list[str | None] = []
        self.called = trio.Event()

    async def check(self, request: HealthCheckRequest, ctx: ServerContext) -> HealthCheckResponse:
        self.identities.append(ctx.peer_identity)
        self.called.set()
        return HealthCheckResponse(status=HealthCheckResponse.SERVING)


def grpc_request_bytes() -> bytes:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", PATH),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    body = HealthCheckRequest(service="").SerializeToString()
    conn.send_data(1, struct.pack(">?I", False, len(body)) + body, end_stream=True)
    return conn.data_to_send()


async def attempt(port: int, cctx: ssl.SSLContext, recorder: Recorder) -> tuple[bytes, bool]:
    """Handshake, send a gRPC request, read until closed (or, if the handler ran, until then)."""
    received = b""
    closed = False
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, cctx, server_hostname="localhost")
    try:
        await stream.do_handshake()
        await stream.send_all(grpc_request_bytes())
        while not recorder.called.is_set():
            chunk = await stream.receive_some()
            if not chunk:
                closed = True
                break
            received += chunk
    except trio.BrokenResourceError:
        closed = True
    finally:
        await trio.aclose_forcefully(stream)
    return received, closed


async def run_against_server(cctx: ssl.SSLContext, sctx: ssl.SSLContext) -> tuple[Recorder, bool]:
    recorder = Recorder()
    method = Method(
        path=PATH,
        request_type=HealthCheckRequest,
        response_type=HealthCheckResponse,
        handler=recorder.check,
    )
    server = Server([method], ssl_context=sctx, identify=identity_from_peercert)
    with trio.fail_after(BOUND):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
            _, closed = await attempt(bound[0][1], cctx, recorder)
            await server.shutdown(drain_timeout=1)
    return recorder, closed


def raw_client(
    dev_pki: Path,
    cert: Path | None,
    key: Path | None,
    *,
    tweak: Callable[[ssl.SSLContext], Any] | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(dev_pki / "ca.crt"))
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    if tweak is not None:
        tweak(ctx)
    return ctx


def sctx_of(dev_pki: Path) -> ssl.SSLContext:
    return tls.server_ssl_context(
        cert=dev_pki / "server.crt", key=dev_pki / "server.key", ca=dev_pki / "ca.crt"
    )


async def test_positive_control_handler_runs_with_identity(dev_pki: Path) -> None:
    cctx = raw_client(dev_pki, dev_pki / "bob.crt", dev_pki / "bob.key")
    recorder, _ = await run_against_server(cctx, sctx_of(dev_pki))
    assert recorder.identities == ["bob"]


def _tls12(ctx: ssl.SSLContext) -> None:
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2


def _http11(ctx: ssl.SSLContext) -> None:
    ctx.set_alpn_protocols(["http/1.1"])


def _make_pair(dev_pki: Path, tmp_path: Path, kind: str) -> tuple[Path, Path]:
    now = dt.datetime.now(dt.UTC)
    day = dt.timedelta(days=1)
    if kind == "other-ca":
        pair = generate_client(generate_ca("another CA"), "admin")
    elif kind == "expired":
        pair = generate_client(
            load_pair(dev_pki, "ca"), "admin", not_before=now - 9 * day, not_after=now - day
        )
    else:  # not yet valid
        pair = generate_client(
            load_pair(dev_pki, "ca"), "admin", not_before=now + day, not_after=now + 9 * day
        )
    return write_pair(tmp_path, kind, pair)


@pytest.mark.parametrize(
    "case", ["tls12", "no-cert", "other-ca", "expired", "not-yet-valid", "server-cert", "http11"]
)
async def test_refused_before_any_handler(dev_pki: Path, tmp_path: Path, case: str) -> None:
    admin = (dev_pki / "admin.crt", dev_pki / "admin.key")
    if case == "tls12":
        cctx = raw_client(dev_pki, *admin, tweak=_tls12)
    elif case == "no-cert":
        cctx = raw_client(dev_pki, None, None)
    elif case == "server-cert":
        cctx = raw_client(dev_pki, dev_pki / "server.crt", dev_pki / "server.key")
    elif case == "http11":
        cctx = raw_client(dev_pki, *admin, tweak=_http11)
    else:
        cctx = raw_client(dev_pki, *_make_pair(dev_pki, tmp_path, case))
    recorder, closed = await run_against_server(cctx, sctx_of(dev_pki))
    assert closed, "the server kept the connection open"
    assert recorder.identities == []
    assert not recorder.called.is_set()
