"""The audit log (DESIGN §7): every field of every kind of record, against a real server.

In-process servers (``trio_jobs.server.serve`` over loopback mTLS, no cgroups) for the
records, so a test can read the ``AuditLog``'s counters; the real ``trio-jobs serve`` for
the flags, the default location and SIGHUP. File attacks (a planted symlink, FIFO, or a
file of another user) and a full disk are performed for real: the disk is a tiny tmpfs.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from e2e.conftest import host  # noqa: F401  (a fixture shared with tests/e2e)
from service.test_service import POLICY, client_ctx, pki, server_ctx  # noqa: F401  (pki: a fixture)

from trio_jobs import rpc
from trio_jobs.audit import AuditLog, AuditLogError, audit_record, encode_line, rfc3339
from trio_jobs.client import JobsClient, JobsError
from trio_jobs.rpc import StatusCode
from trio_jobs.security.pki import CertifiedKey, load_pair, write_pair
from trio_jobs.security.policy import Policy
from trio_jobs.server import NO_CGROUPS, ServerConfig, ServerInfo, serve
from trio_jobs.v1 import jobs_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

    from e2e.conftest import Host

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


# -- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    info: ServerInfo
    audit: AuditLog
    pki: Path

    @property
    def port(self) -> int:
        return self.info.addresses[0][1]

    def client(self, name: str) -> Any:
        address, port = self.info.addresses[0]
        return JobsClient.connect(f"[{address}]:{port}" if ":" in address else f"{address}:{port}",
                                  ssl_context=client_ctx(self.pki, name))  # fmt: skip


def records(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, parsed; each must be a whole ASCII line."""
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), data[-200:]
    assert data.isascii()
    return [json.loads(line) for line in data.splitlines()]


def of(path: Path, method: str) -> list[dict[str, Any]]:
    return [r for r in records(path) if r["method"] == method]


def client_ports_to(server_port: int) -> set[int]:
    """Local ports of this process's TCP connections to 127.0.0.1:server_port."""
    ports = set()
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        local, remote = line.split()[1:3]
        if remote == f"0100007F:{server_port:04X}" and local.startswith("0100007F:"):
            ports.add(int(local.split(":")[1], 16))
    return ports


def check_time(record: dict[str, Any], before: dt.datetime, after: dt.datetime) -> None:
    assert RFC3339_UTC.fullmatch(record["time"]), record["time"]
    when = dt.datetime.fromisoformat(record["time"])
    assert when.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(microseconds=1) <= when <= after


def issue_without_cn(pki_dir: Path, stem: str) -> None:
    """A client certificate the CA signed whose subject has no common name."""
    ca = load_pair(pki_dir, "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nobody in particular")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    write_pair(pki_dir, stem, CertifiedKey(key=key, cert=cert))


async def until(predicate: Callable[[], bool]) -> None:
    """Bounded wait (10 s) for something another process or task does (5 ms steps)."""
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.005)


@pytest.fixture
async def start_server(
    pki: Path, tmp_path: Path, nursery: trio.Nursery  # noqa: F811
) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    started: list[ServerInfo] = []

    async def start(*, reads: bool = False, path: Path | None = None, address: str = "127.0.0.1") -> Served:
        audit = AuditLog(path or tmp_path / "audit.jsonl", reads=reads)
        config = ServerConfig(
            host=address,
            port=0,
            data_dir=tmp_path / "data",
            ssl_context=server_ctx(pki),
            policy=Policy.from_toml(POLICY),
            cgroups=NO_CGROUPS,
            handle_signals=False,
            shutdown_timeout=10.0,
            audit=audit,
        )
        info: ServerInfo = await nursery.start(serve, config)
        started.append(info)
        return Served(info, audit, pki)

    yield start
    for info in started:
        info.handle.request_shutdown()


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs of our own (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs to fill needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` up to the last byte; returns the filler."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 4096, 1):
            with pytest.raises(OSError, match="No space left") as full:  # noqa: PT012
                while True:
                    os.write(fd, b"x" * size)
            assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


# -- records of calls ----------------------------------------------------------------------------


async def test_start_job_is_logged_with_every_field(start_server: Callable[..., Awaitable[Served]]) -> None:
    served = await start_server()
    args = ["plain", "é ü 中", "\x1b[31mred\x07", 'quote " and \\ backslash', ""]
    before = dt.datetime.now(dt.UTC)
    async with served.client("alice") as jobs:
        job = await jobs.start("echo", args)
        after = dt.datetime.now(dt.UTC)
        ports = client_ports_to(served.port)
    [record] = of(served.audit.path, "StartJob")
    assert list(record) == ["time", "identity", "peer", "method", "code", "job_id", "command", "args"]
    check_time(record, before, after)
    assert record["identity"] == "alice"
    address, port = record["peer"].rsplit(":", 1)
    assert address == "127.0.0.1"
    assert int(port) in ports  # the client's own end of the connection
    assert record["code"] == "OK"
    assert record["job_id"] == job.job_id
    assert record["command"] == "echo"  # as the user asked (the status shows what ran)
    assert record["args"] == args  # exact, control characters and all
    assert b"\x1b" not in served.audit.path.read_bytes()  # ...escaped in the file
    assert served.audit.written == 1
    assert served.audit.lost == 0


async def test_a_refused_call_is_logged_with_its_message(start_server: Callable[..., Awaitable[Served]]) -> None:
    served = await start_server()
    missing = str(uuid.uuid4())
    async with served.client("alice") as jobs:
        with pytest.raises(JobsError) as caught:
            await jobs.status(missing)
        with pytest.raises(JobsError):
            await jobs.status("not-a-uuid\n")
    assert caught.value.code == StatusCode.NOT_FOUND
    first, second = of(served.audit.path, "GetJobStatus")
    assert first["identity"] == "alice"
    assert first["code"] == "NOT_FOUND"
    assert first["job_id"] == missing
    assert first["message"] == caught.value.message
    assert "command" not in first
    assert "args" not in first
    assert second["code"] == "INVALID_ARGUMENT"
    assert second["job_id"] == "not-a-uuid\n"  # as sent: JSON makes it exact and harmless


async def test_unknown_identities_are_logged(start_server: Callable[..., Awaitable[Served]], pki: Path) -> None:  # noqa: F811
    issue_without_cn(pki, "nocn")
    served = await start_server()
    for name in ("mallory", "nocn"):
        async with served.client(name) as jobs:
            with pytest.raises(JobsError) as caught:
                await jobs.list()
            assert caught.value.code == StatusCode.PERMISSION_DENIED
    mallory, nocn = of(served.audit.path, "ListJobs")
    assert mallory["identity"] == "mallory"  # the certificate's CN, though the policy has none
    assert mallory["code"] == "PERMISSION_DENIED"
    assert mallory["message"]
    assert "job_id" not in mallory
    assert "identity" in nocn
    assert nocn["identity"] is None
    assert nocn["code"] == "PERMISSION_DENIED"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", nocn["peer"])


async def test_an_ipv6_peer_is_in_brackets(start_server: Callable[..., Awaitable[Served]]) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no ::1 here: {exc}")
    served = await start_server(address="::1")
    async with served.client("alice") as jobs:
        with pytest.raises(JobsError):
            await jobs.list(all_users=True)  # refused: logged
    [record] = records(served.audit.path)
    assert re.fullmatch(r"\[::1\]:\d+", record["peer"]), record["peer"]


async def test_an_admin_stopping_alices_job_is_logged(start_server: Callable[..., Awaitable[Served]]) -> None:
    served = await start_server()
    async with served.client("alice") as alice, served.client("admin") as admin:
        job = await alice.start("sleep", ["600"])
        outcome = await admin.stop(job.job_id, grace=0)
    assert outcome.force_ended
    [record] = of(served.audit.path, "StopJob")
    assert record["identity"] == "admin"
    assert record["code"] == "OK"
    assert record["job_id"] == job.job_id
    assert "message" not in record
    assert "command" not in record


async def test_stream_output_is_logged_when_opened(start_server: Callable[..., Awaitable[Served]]) -> None:
    served = await start_server()
    got = bytearray()

    async def sink(data: bytes) -> None:
        got.extend(data)

    async with served.client("alice") as jobs, trio.open_nursery() as nursery:
        job = await jobs.start("sleep", ["600"])  # no output: no first byte to wait for
        nursery.start_soon(jobs.tail, job.job_id, sink)
        await until(lambda: bool(of(served.audit.path, "StreamOutput")))
        [record] = of(served.audit.path, "StreamOutput")
        assert got == b""  # logged before any byte was sent
        assert record["identity"] == "alice"
        assert record["code"] == "OK"
        assert record["job_id"] == job.job_id
        await jobs.stop(job.job_id, grace=0)  # ends the follower
    assert len(of(served.audit.path, "StreamOutput")) == 1  # opened once, logged once
    async with served.client("bob") as bob:
        with pytest.raises(JobsError):
            await bob.tail(job.job_id, sink)  # not his: refused, and logged
    refused = of(served.audit.path, "StreamOutput")[1]
    assert (refused["identity"], refused["code"], refused["job_id"]) == ("bob", "NOT_FOUND", job.job_id)


@pytest.mark.parametrize("reads", [False, True])
async def test_successful_reads_only_with_audit_reads(
    start_server: Callable[..., Awaitable[Served]], reads: bool
) -> None:
    served = await start_server(reads=reads)
    async with served.client("alice") as jobs:
        job = await jobs.start("true", [])
        await jobs.status(job.job_id)
        await jobs.list()
        with pytest.raises(JobsError):
            await jobs.list(all_users=True)  # refused: logged either way
    methods = [(r["method"], r["code"]) for r in records(served.audit.path)]
    reads_ok = [("GetJobStatus", "OK"), ("ListJobs", "OK")]
    assert methods == [("StartJob", "OK"), *(reads_ok if reads else []), ("ListJobs", "PERMISSION_DENIED")]
    if reads:
        assert of(served.audit.path, "GetJobStatus")[0]["job_id"] == job.job_id


async def test_a_call_cut_by_its_deadline_is_logged(start_server: Callable[..., Awaitable[Served]]) -> None:
    served = await start_server()
    address, port = served.info.addresses[0]
    async with served.client("admin") as admin:
        job = await admin.start("sh", ["-c", "trap '' TERM; sleep 600"])
        async with rpc.connect(address, port, ssl_context=client_ctx(served.pki, "admin")) as channel:
            request = pb.StopJobRequest(job_id=job.job_id)
            request.grace_period.seconds = 30
            # grpc-timeout 0.3 s, but no client-side cancel before the server's deadline fires
            # (a client cancel racing it would be logged CANCELLED, correctly, and flakily).
            with pytest.raises(rpc.RpcError) as caught, trio.fail_after(30):
                await channel._unary("/trio_jobs.v1.JobService/StopJob", request, pb.StopJobResponse,
                                     grpc_timeout=0.3, metadata=())
        assert caught.value.code == StatusCode.DEADLINE_EXCEEDED
        await admin.stop(job.job_id, grace=0)
    first, second = of(served.audit.path, "StopJob")
    assert (first["code"], first["job_id"]) == ("DEADLINE_EXCEEDED", job.job_id)
    assert first["message"]
    assert second["code"] == "OK"


# -- the file ------------------------------------------------------------------------------------


async def test_file_mode_is_0600_and_a_wider_one_is_narrowed(start_server: Callable[..., Awaitable[Served]], tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    path.chmod(0o644)
    served = await start_server(path=path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    async with served.client("alice") as jobs:
        await jobs.list()
    fresh = tmp_path / "fresh.jsonl"
    log = AuditLog(fresh)
    old = os.umask(0)  # the most permissive umask cannot widen it
    try:
        async with log:
            assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
    finally:
        os.umask(old)


async def test_reopen_after_logrotate_writes_to_a_new_file(start_server: Callable[..., Awaitable[Served]]) -> None:
    served = await start_server()
    path = served.audit.path
    async with served.client("admin") as jobs:
        await jobs.start("true", [])
        rotated = path.with_name("audit.jsonl.1")
        path.rename(rotated)  # what logrotate does, before it sends SIGHUP
        await jobs.start("true", [])  # still into the renamed file: nothing lost in between
        served.audit.reopen()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        third = await jobs.start("true", [])
        path.rename(tmp := path.with_name("moved"))
        path.symlink_to(tmp_target := path.with_name("target"))
        tmp_target.write_bytes(b"")
        with pytest.raises(AuditLogError, match="symbolic link"):
            served.audit.reopen()  # refused: the log keeps its descriptor
        fourth = await jobs.start("true", [])
    assert len(of(rotated, "StartJob")) == 2
    assert [r["job_id"] for r in of(tmp, "StartJob")] == [third.job_id, fourth.job_id]
    assert tmp_target.read_bytes() == b""  # the symlink was never followed


@pytest.mark.parametrize("plant", ["symlink", "fifo", "directory"])
async def test_a_planted_path_is_refused(tmp_path: Path, plant: str) -> None:
    path = tmp_path / "audit.jsonl"
    target = tmp_path / "target"
    target.write_bytes(b"precious\n")
    if plant == "symlink":
        path.symlink_to(target)
    elif plant == "fifo":
        os.mkfifo(path)  # opening it for writing would wait for a reader forever
    else:
        path.mkdir()
    with trio.fail_after(5), pytest.raises(AuditLogError, match=re.escape(str(path))):
        async with AuditLog(path):
            pass
    assert target.read_bytes() == b"precious\n"


@pytest.mark.root
async def test_a_file_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"")
    os.chown(path, 65534, 65534)
    with pytest.raises(AuditLogError, match="belongs to uid 65534"):
        async with AuditLog(path):
            pass


async def test_a_full_disk_loses_the_line_not_the_call(
    start_server: Callable[..., Awaitable[Served]], tiny_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    filler = fill(tiny_fs)
    served = await start_server(path=tiny_fs / "audit.jsonl")  # created: an inode, no data
    with caplog.at_level(logging.WARNING, logger="trio_jobs.audit"):
        async with served.client("admin") as admin:
            job = await admin.start("true", [])  # answered although its line is lost
            await admin.stop(job.job_id)  # the job's end does not wait for the log either
            assert (served.audit.lost, served.audit.written) == (2, 0)
            filler.unlink()
            await admin.list()  # a refused-or-not read is not logged; a refusal is:
            with pytest.raises(JobsError):
                await admin.status(str(uuid.uuid4()))
    assert (served.audit.lost, served.audit.written) == (2, 1)
    warnings = [r.getMessage() for r in caplog.records if r.name == "trio_jobs.audit"]
    assert "1 line(s) could not be written (No space left on device)" in warnings[0]
    assert "1 line(s) could not be written" in warnings[1]
    assert "2 lost" in warnings[1]
    assert "writing again" in warnings[1]
    assert [r["method"] for r in records(served.audit.path)] == ["GetJobStatus"]


async def test_a_partial_line_is_cut_off(tiny_fs: Path) -> None:
    path = tiny_fs / "audit.jsonl"
    line = b'{"x":"' + b"a" * 91 + b'"}\n'  # 100 bytes: 40 fit a 4 KiB page, the 41st is cut
    async with AuditLog(path) as log:
        assert log.write_line(line)  # the file has its first page now
        fill(tiny_fs)
        while log.write_line(line):
            pass
        assert log.lost == 1
        assert path.stat().st_size == 40 * len(line)  # the 96 bytes written of the 41st: gone
        assert not log.write_line(line)
    assert records(path) == [{"x": "a" * 91}] * 40


def test_lost_lines_are_reported_at_most_once_per_interval(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl", warn_interval=3600)
    log.open()
    log.close()  # every write from now on fails: the log is closed
    with caplog.at_level(logging.WARNING, logger="trio_jobs.audit"):
        for _ in range(3):
            assert not log.write_line(b"{}\n")
        log.close()
    assert log.lost == 3
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # the first loss at once, the rest when closing
    assert "1 line(s)" in messages[0]
    assert "2 line(s)" in messages[1]
    assert "3 lost" in messages[1]


# -- records and encoding ---------------------------------------------------------------------


def test_the_encoder_takes_any_string() -> None:
    nasty = ["\udc80lone surrogate", "\x00\x1b\x7f\u2028", "é中😀", "\\\"", "x" * 10]
    line = encode_line(audit_record(when_ns=0, identity="a\nb", peer=None, method="StartJob",
                                    code=StatusCode.OK, job_id=None, command="\udcff", args=nasty))  # fmt: skip
    assert line.isascii()
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    record = json.loads(line)
    assert record == {"time": "1970-01-01T00:00:00.000000Z", "identity": "a\nb", "peer": None,
                      "method": "StartJob", "code": "OK", "command": "\udcff", "args": nasty}  # fmt: skip
    assert not any(0x00 <= b < 0x20 or b == 0x7F for b in line[:-1])  # nothing raw for a terminal


def test_huge_fields_are_bounded_and_say_so() -> None:
    record = audit_record(when_ns=1, identity="alice", peer="[::1]:5", method="StartJob",
                          code=StatusCode.INVALID_ARGUMENT, command="c", args=["a" * 700_000] * 3,
                          message="m" * 10_000, job_id="j" * 5000)  # fmt: skip
    assert record["args"] == ["a" * 700_000]
    assert len(record["message"]) == 4096
    assert len(record["job_id"]) == 4096
    assert record["truncated"] is True
    assert "truncated" not in audit_record(when_ns=1, identity=None, peer=None, method="ListJobs", code=StatusCode.OK)


def test_rfc3339() -> None:
    assert rfc3339(1_764_683_100_123_456_789) == "2025-12-02T13:45:00.123456Z"
    assert dt.datetime.fromisoformat(rfc3339(0)) == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


# -- the real `trio-jobs serve` ------------------------------------------------------------------


@pytest.mark.slow
def test_serve_flags_default_location_and_sighup(host: Host) -> None:  # noqa: F811
    host.start_server("--audit-reads")
    job = host.start("true", identity="alice")
    host.run("status", job, identity="alice")
    path = host.home / "audit.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [(r["method"], r["identity"], r["code"]) for r in records(path)] == [
        ("StartJob", "alice", "OK"), ("GetJobStatus", "alice", "OK")]  # fmt: skip
    rotated = path.with_name("audit.jsonl.1")
    path.rename(rotated)
    assert host.server is not None
    host.server.send_signal(signal.SIGHUP)
    trio.run(until, path.exists)
    host.run("list", identity="bob")
    assert [r["method"] for r in records(rotated)] == ["StartJob", "GetJobStatus"]
    assert [(r["method"], r["identity"]) for r in records(path)] == [("ListJobs", "bob")]


@pytest.mark.slow
def test_serve_refuses_an_audit_log_it_cannot_use(host: Host, tmp_path: Path) -> None:  # noqa: F811
    target = tmp_path / "precious"
    target.write_bytes(b"keep\n")
    link = tmp_path / "audit.jsonl"
    link.symlink_to(target)
    done = host.run("serve", "--port", "0", "--cgroup-parent", host.cgroup_parent, "--audit-log", str(link), check=False)
    assert done.returncode == 8
    lines = done.stderr.decode().strip().splitlines()
    assert lines[-1] == f"trio-jobs: error: cannot open the audit log {link}: it is a symbolic link " \
        "(refused: the audit log is never opened through one)"
    assert target.read_bytes() == b"keep\n"
