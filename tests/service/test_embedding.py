"""Embedding the server (issue #18): ``serve()`` on the caller's own TLS listeners, with the
caller's own services beside JobService, and cgroups detected unless turned off explicitly.

Everything is real: ``trio.open_ssl_over_tcp_listeners`` on loopback port 0 with the
development PKI (so every connection is a ``trio.SSLStream`` the caller's listener made, and
the identity handlers see comes from its peer certificate), our clients and the official
grpcio client, real jobs; the cgroup test puts a job in a real cgroup under a parent named
after its own temporary data directory and checks that the parent is gone afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest
import trio
from rpc.echo import STREAM, UNARY, EchoReply, EchoRequest, TrioEcho

from trio_jobs.client import JobsClient, JobsError
from trio_jobs.reload import ReloadSources, reload
from trio_jobs.rpc import Method, RpcError, Server, StatusCode, connect, health_pb2
from trio_jobs.security.policy import Policy
from trio_jobs.security.tls import client_ssl_context, server_ssl_context
from trio_jobs.server import NO_CGROUPS, ServerConfig, ServerInfo, serve
from trio_jobs.service import JobService
from trio_jobs.v1 import jobs_pb2 as pb
from trio_jobs.worker import CgroupError, open_worker
from trio_jobs.worker.cgroups._layout import parse_mountinfo, parse_proc_cgroup, resolve_parent
from trio_jobs.worker.cgroups.detect import default_cgroup_parent, detect_server_driver
from trio_jobs.worker.cgroups.v1 import V1Driver
from trio_jobs.worker.cgroups.v2 import V2Driver

if TYPE_CHECKING:
    import ssl
    from collections.abc import Callable

POLICY: Final = """
[defaults]
run_as = ""
programs = ["*"]
[identities.admin]
admin = true
[identities.alice]
[identities.bob]
"""
JOBS: Final = "/trio_jobs.v1.JobService/"
TIMEOUT: Final = 60.0


def server_tls(pki: Path) -> ssl.SSLContext:
    return server_ssl_context(cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt")


def client_tls(pki: Path, name: str) -> ssl.SSLContext:
    return client_ssl_context(cert=pki / f"{name}.crt", key=pki / f"{name}.key", ca=pki / "ca.crt")


@dataclass
class Embedded:
    info: ServerInfo
    echo: TrioEcho
    port: int  # what the caller's listener is bound to

    def client(self, pki: Path, name: str) -> Any:
        return JobsClient.connect(f"127.0.0.1:{self.port}", ssl_context=client_tls(pki, name))


async def start_embedded(
    nursery: trio.Nursery, pki: Path, data_dir: Path, *, default_cgroups: bool = False, **config: Any
) -> Embedded:
    """serve() on the caller's own SSL listener, with the echo service beside JobService;
    without cgroups unless ``default_cgroups`` (then the config does not name any)."""
    listeners = await trio.open_ssl_over_tcp_listeners(0, server_tls(pki), host="127.0.0.1")
    inner = listeners[0].transport_listener
    assert isinstance(inner, trio.SocketListener)
    port = inner.socket.getsockname()[1]
    echo = TrioEcho()
    options: dict[str, Any] = {"handle_signals": False, "shutdown_timeout": 10.0}
    if not default_cgroups:
        options["cgroups"] = NO_CGROUPS
    options.update(config)
    info: ServerInfo = await nursery.start(serve, ServerConfig(
        listeners=listeners, data_dir=data_dir, policy=Policy.from_toml(POLICY),
        extra_methods=echo.methods(), **options,
    ))
    return Embedded(info, echo, port)


async def test_jobservice_on_ssl_listeners_sees_each_callers_identity(
    dev_pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """alice and bob each start a job over the caller's SSLStreams: neither sees or stops the
    other's, admin sees both. Were the identity lost on the way (the peer certificate not
    taken from the SSLStream), JobService would refuse every call."""
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.WARNING, logger="trio_jobs.server"):
        async with trio.open_nursery() as nursery:
            served = await start_embedded(nursery, dev_pki, tmp_path / "data")
            # The address the caller's listener is bound to, and nothing was bound besides.
            assert served.info.addresses == [("127.0.0.1", served.port)]
            assert served.info.cgroup_driver == "none"
            assert served.info.rpc_mode.startswith("transport=ssl-stream fast-paths=")  # (theirs)
            async with served.client(dev_pki, "alice") as alice, served.client(dev_pki, "bob") as bob, \
                    served.client(dev_pki, "admin") as admin:
                mine = await alice.start("sleep", ["600"])
                theirs = await bob.start("sleep", ["600"])
                assert (mine.owner, theirs.owner) == ("alice", "bob")
                with pytest.raises(JobsError) as unseen:
                    await alice.status(theirs.job_id)
                assert unseen.value.code == StatusCode.NOT_FOUND
                with pytest.raises(JobsError) as unstopped:
                    await alice.stop(theirs.job_id, grace=0)
                assert unstopped.value.code == StatusCode.NOT_FOUND
                assert (await bob.status(theirs.job_id)).state == "running"  # alice's stop did nothing
                assert [j.job_id for j in await alice.list()] == [mine.job_id]
                assert [j.job_id for j in await bob.list()] == [theirs.job_id]
                with pytest.raises(JobsError) as not_admin:
                    await alice.list(all_users=True)
                assert not_admin.value.code == StatusCode.PERMISSION_DENIED
                everyone = {(j.job_id, j.owner) for j in await admin.list(all_users=True)}
                assert everyone == {(mine.job_id, "alice"), (theirs.job_id, "bob")}
                assert (await admin.stop(theirs.job_id, grace=0)).job.state == "killed"
            served.info.handle.request_shutdown()
    # Without cgroups only because this test asked, and said so.
    assert "no cgroups (cgroups=NO_CGROUPS): jobs run WITHOUT cpu/memory/io/pids limits" in caplog.text


async def test_the_official_grpcio_client_reaches_jobservice_and_the_extra_service(
    dev_pki: Path, tmp_path: Path
) -> None:
    grpc = pytest.importorskip("grpc")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            served = await start_embedded(nursery, dev_pki, tmp_path / "data")
            async with served.client(dev_pki, "alice") as alice, served.client(dev_pki, "bob") as bob:
                mine = await alice.start("/bin/true")
                theirs = await bob.start("/bin/true")

            def with_grpcio() -> tuple[list[str], str, Any, bytes]:
                creds = grpc.ssl_channel_credentials(
                    root_certificates=(dev_pki / "ca.crt").read_bytes(),
                    private_key=(dev_pki / "alice.key").read_bytes(),
                    certificate_chain=(dev_pki / "alice.crt").read_bytes(),
                )
                options = [("grpc.ssl_target_name_override", "localhost")]
                with grpc.secure_channel(f"127.0.0.1:{served.port}", creds, options=options) as channel:
                    def call(path: str, request: Any, response_type: Any) -> Any:
                        method = channel.unary_unary(path, request_serializer=type(request).SerializeToString,
                                                     response_deserializer=response_type.FromString)
                        return method(request, timeout=30)

                    listed = call(JOBS + "ListJobs", pb.ListJobsRequest(), pb.ListJobsResponse)
                    status = call(JOBS + "GetJobStatus", pb.GetJobStatusRequest(job_id=mine.job_id), pb.JobStatus)
                    try:
                        call(JOBS + "GetJobStatus", pb.GetJobStatusRequest(job_id=theirs.job_id), pb.JobStatus)
                        code = None
                    except grpc.RpcError as exc:
                        code = exc.code()
                    echoed = call(UNARY, EchoRequest(payload=b"from grpcio"), EchoReply)
                return [j.job_id for j in listed.jobs], status.owner, code, echoed.payload

            listed, owner, bobs, echoed = await trio.to_thread.run_sync(with_grpcio)
            assert listed == [mine.job_id]
            assert owner == "alice"
            assert bobs == grpc.StatusCode.NOT_FOUND
            assert echoed == b"from grpcio"
            assert served.echo.identities == ["alice"]  # the extra service saw grpcio's certificate
            served.info.handle.request_shutdown()


async def test_an_extra_service_shares_the_connection_with_jobservice_and_health(
    dev_pki: Path, tmp_path: Path
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            served = await start_embedded(nursery, dev_pki, tmp_path / "data")
            # One connection, three services: the caller's, JobService, health.
            async with connect("127.0.0.1", served.port, ssl_context=client_tls(dev_pki, "bob")) as channel:
                reply = await channel.unary(UNARY, EchoRequest(payload=b"mine"), EchoReply)
                started = await channel.unary(JOBS + "StartJob", pb.StartJobRequest(command="/bin/true"),
                                              pb.StartJobResponse)
                check = await channel.unary("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(),
                                            health_pb2.HealthCheckResponse)
            assert reply.payload == b"mine"
            assert served.echo.identities == ["bob"]
            assert started.status.owner == "bob"
            assert check.status == health_pb2.HealthCheckResponse.SERVING
            served.info.handle.request_shutdown()


async def test_shutdown_drains_the_extra_service_calls_then_returns(dev_pki: Path, tmp_path: Path) -> None:
    """GOAWAY and the drain cover the caller's calls: a stream that ends within the drain
    gets every message and OK, one that does not is ended UNAVAILABLE at the drain deadline;
    then serve() returns, having closed the caller's listener."""
    drain = 2.0
    short: list[int] = []
    outcome: dict[str, object] = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            served = await start_embedded(nursery, dev_pki, tmp_path / "data", shutdown_timeout=drain)
            async with connect("127.0.0.1", served.port, ssl_context=client_tls(dev_pki, "alice")) as channel:
                first = trio.Event()

                async def finite() -> None:  # 5 messages over ~1 s: ends within the drain
                    async with channel.server_stream(STREAM, EchoRequest(count=5, size=8, sleep=0.2), EchoReply) as s:
                        async for reply in s:
                            short.append(reply.index)
                            first.set()
                    outcome["finite"] = "OK"

                async def endless() -> None:
                    try:
                        async with channel.server_stream(
                            STREAM, EchoRequest(count=10**6, size=8, sleep=0.05), EchoReply
                        ) as s:
                            async for _ in s:
                                pass
                    except RpcError as exc:
                        outcome["endless"] = exc.code
                        outcome["endless_after"] = trio.current_time() - asked

                async with trio.open_nursery() as calls:
                    calls.start_soon(endless)
                    calls.start_soon(finite)
                    await first.wait()
                    asked = trio.current_time()
                    served.info.handle.request_shutdown()
        # serve() has returned (the nursery that ran it is done).
        returned_after = trio.current_time() - asked
    assert short == [0, 1, 2, 3, 4]
    assert outcome["finite"] == "OK"
    assert outcome["endless"] == StatusCode.UNAVAILABLE
    ended_after = outcome["endless_after"]
    assert isinstance(ended_after, float)
    assert drain - 0.1 <= ended_after < drain + 5.0, ended_after  # at the drain deadline, not before
    assert returned_after < drain + 5.0
    with pytest.raises(OSError, match="all attempts to connect") as refused:  # the listener was closed
        await trio.open_tcp_stream("127.0.0.1", served.port)
    assert isinstance(refused.value.__cause__, ExceptionGroup)
    assert refused.value.__cause__.subgroup(ConnectionRefusedError) is not None


def _dirs_of(proc_cgroup: str, cgroup_of: Callable[[str], str]) -> set[Path]:
    """The directory of ``cgroup_of(path)`` in every hierarchy a process is in, given its
    /proc/PID/cgroup text (each v1 controller's own hierarchy, and cgroup2)."""
    where = parse_proc_cgroup(proc_cgroup)
    dirs = set()
    for mount in parse_mountinfo(Path("/proc/self/mountinfo").read_text()):
        for key in [""] if mount.fstype == "cgroup2" else sorted(mount.controllers):
            if key in where and (d := mount.dir_of(cgroup_of(where[key]))) is not None:
                dirs.add(d)
    return dirs


def _parent_dirs(parent: str) -> set[Path]:
    """Where a driver of this process makes ``parent``: under our own cgroup (procfs: instant)."""
    return _dirs_of(Path("/proc/self/cgroup").read_text(), lambda own: resolve_parent(own, parent))


@pytest.mark.cgroups
async def test_cgroups_are_detected_by_default(dev_pki: Path, tmp_path: Path) -> None:
    """No ``cgroups`` in the config: the job lands in a real cgroup under the parent named
    after the data directory (what ``trio-jobs serve`` does), which is gone after shutdown."""
    data_dir = tmp_path / "data"
    parent = default_cgroup_parent(data_dir)  # unique: our tmp_path's digest
    try:  # what the host offers, as tests/cgroups decides it (detection only reads)
        expected = detect_server_driver(data_dir, require=True)
    except CgroupError as exc:
        pytest.skip(f"this host offers no usable cgroups: {exc}")
    assert isinstance(expected, V1Driver | V2Driver)
    # Where serve()'s driver may make the parent: under our own cgroup in each hierarchy.
    parents = _parent_dirs(parent)
    assert not any(d.exists() for d in parents)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                served = await start_embedded(nursery, dev_pki, data_dir, default_cgroups=True)
                assert served.info.cgroup_driver == expected.name  # "v1" on the hybrid build hosts
                out = bytearray()

                async def sink(data: bytes) -> None:
                    out.extend(data)

                async with served.client(dev_pki, "alice") as alice:
                    job = await alice.start("cat", ["/proc/self/cgroup"])
                    final = await alice.tail(job.job_id, sink)
                assert final.exit_code == 0, out
                # The job's own cgroups: below the parent, in every hierarchy of the driver
                # (v1: cpu, cpuacct, memory, blkio, pids and freezer; v2: the one).
                jobs = _dirs_of(out.decode(), lambda path: path)
                below = {d for d in jobs if any(d.is_relative_to(p) and d != p for p in parents)}
                assert len(below) >= (1 if expected.name == "v2" else 5), (out.decode(), parents)
                served.info.handle.request_shutdown()
        left = sorted(str(d) for d in parents if d.exists())
        assert not left, f"the parent cgroup outlived the server: {left}"
    finally:
        if any(d.exists() for d in parents):
            with trio.move_on_after(30, shield=True):
                await expected.prepare()  # kills and removes the job cgroups left below it
                for d in parents:
                    with contextlib.suppress(FileNotFoundError):
                        d.rmdir()


async def test_config_refuses_what_would_not_be_a_tls_server(dev_pki: Path, tmp_path: Path) -> None:
    base: dict[str, Any] = {"data_dir": tmp_path / "data", "policy": Policy.from_toml(POLICY)}
    plain = await trio.open_tcp_listeners(0, host="127.0.0.1")
    tls = await trio.open_ssl_over_tcp_listeners(0, server_tls(dev_pki), host="127.0.0.1")
    try:
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "does not serve plaintext"),  # neither listeners nor ssl_context
            ({"listeners": plain}, "does not do TLS"),
            ({"listeners": tls, "ssl_context": server_tls(dev_pki)}, "does its own TLS"),
            ({"listeners": []}, "empty"),
            ({"listeners": tls, "cgroups": None}, "NO_CGROUPS"),
            ({"listeners": tls, "cgroups": NO_CGROUPS, "require_limits": True}, "DETECT_CGROUPS"),
            ({"listeners": tls, "extra_methods": [Method(
                path=JOBS + "ListJobs", request_type=pb.ListJobsRequest, response_type=pb.ListJobsResponse,
                handler=_never)]}, "trio-jobs' own"),
            ({"listeners": tls, "extra_methods": [*TrioEcho().methods(), *TrioEcho().methods()]}, "twice"),
        ]
        for extra, why in cases:
            with pytest.raises(ValueError, match=why):
                ServerConfig(**base, **extra)
        # The two ways that are TLS: plain listeners + our context, TLS listeners alone.
        ServerConfig(**base, listeners=plain, ssl_context=server_tls(dev_pki))
        ServerConfig(**base, listeners=tls)
    finally:
        for ln in [*plain, *tls]:
            await ln.aclose()


async def _never(request: pb.ListJobsRequest, ctx: Any) -> pb.ListJobsResponse:
    raise AssertionError("not called")


async def test_a_reload_on_the_callers_listeners_skips_the_certificates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server without a context of its own (TLS by the caller's listeners): SIGHUP reloads
    the policy and neither reads nor applies the certificate files (they do not even exist
    here), saying so, instead of failing in ``set_ssl_context``."""
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY.replace("[identities.bob]\n", ""))
    missing = tmp_path / "no-such-dir"
    sources = ReloadSources(policy=policy, cert=missing / "s.crt", key=missing / "s.key", ca=missing / "ca.crt")
    async with open_worker(tmp_path / "data") as worker:
        service = JobService(worker, Policy.from_toml(POLICY))
        server = Server([], ssl_context=None)
        with caplog.at_level(logging.INFO, logger="trio_jobs.reload"):
            assert await reload(sources, service=service, server=server, audit=None)
        assert server.ssl_context is None
        assert "server certificate not reloaded" in caplog.text
        assert f"reloaded: policy {policy} (2 identities)" in caplog.text
        await worker.shutdown(0)
