"""The ceilings each figure is compared with, measured in the same run.

- spawn: ``posix_spawn`` + ``waitpid`` of ``/bin/true`` from Python, nothing else.
- cgroup writes: what a job's cgroups cost the kernel: per hierarchy the driver uses, mkdir a
  directory, write the limit files a job gets, rmdir it (no process is moved).
- bare TLS: ``trio.SSLStream`` bulk transfer between two processes over loopback with the
  same mutual-TLS 1.3 contexts (the benchmark PKI), no HTTP/2, gRPC or protobuf: a sender
  process writes the bytes in 64 KiB writes, this process receives and times them.

``python -m benchmarks.e2e.ceilings send --pki D --size N`` is the sender.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Final

import trio

from trio_jobs.security.tls import client_ssl_context, server_ssl_context

from .harness import PYTHON, own_cgroup_dirs

CHUNK: Final = 64 * 1024
# The limit files a job's cgroups get written (v1 and v2 names); what exists is written.
LIMIT_FILES: Final = {
    "cpu.cfs_period_us": "100000",
    "cpu.cfs_quota_us": "200000",
    "memory.limit_in_bytes": "1048576000",
    "pids.max": "4096",
    "cpu.max": "200000 100000",
    "memory.max": "1048576000",
}
DRIVER_HIERARCHIES: Final = ("cpu", "cpuacct", "memory", "blkio", "pids", "freezer")


def spawn_true(count: int) -> list[float]:
    """Seconds per bare posix_spawn + waitpid of /bin/true."""
    samples = []
    env = {"PATH": "/usr/bin:/bin"}
    for _ in range(count):
        t0 = time.perf_counter()
        pid = os.posix_spawn("/bin/true", ["/bin/true"], env)
        os.waitpid(pid, 0)
        samples.append(time.perf_counter() - t0)
    return samples


def cgroup_writes(count: int) -> tuple[list[float], int]:
    """Seconds per job-cgroup create + limit writes + remove, and how many hierarchies.

    Works in a directory of our own under this process's cgroup, removed at the end.
    ``([], 0)`` when there are no writable cgroups.
    """
    name = f"trio-jobs-bench-ceiling-{uuid.uuid4().hex[:8]}"
    bases = [b for b in own_cgroup_dirs(name) if _hierarchy_used(b)]
    made: list[Path] = []
    try:
        for base in bases:
            try:
                base.mkdir()
            except OSError:
                continue
            made.append(base)
        samples = []
        for i in range(count if made else 0):
            t0 = time.perf_counter()
            for base in made:
                job = base / f"job-{i}"
                job.mkdir()
                for fname, value in LIMIT_FILES.items():
                    path = job / fname
                    if path.exists():
                        path.write_text(value)
                job.rmdir()
            samples.append(time.perf_counter() - t0)
        return samples, len(made)
    finally:
        for base in made:  # also after an error half-way: job dirs first (empty cgroups)
            for child in base.glob("job-*"):
                with contextlib.suppress(OSError):
                    child.rmdir()
            with contextlib.suppress(OSError):
                base.rmdir()


def _hierarchy_used(base: Path) -> bool:
    hierarchy = base.parts[4] if len(base.parts) > 4 else ""
    unified = (Path("/sys/fs/cgroup") / "cgroup.controllers").is_file()
    return unified or any(c in hierarchy.split(",") for c in DRIVER_HIERARCHIES)


async def bare_tls_receive(pki: Path, size: int) -> float:
    """MB/s (10^6 B/s) of ``size`` bytes sent by a sender process over mutual TLS."""
    proc = await trio.lowlevel.open_process(
        [PYTHON, "-m", "benchmarks.e2e.ceilings", "send", "--pki", str(pki), "--size", str(size)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                data = await proc.stdout.receive_some(1)
                if not data:
                    raise RuntimeError("the bare TLS sender did not start")
                line += data
        port = int(line.split()[1])
        ctx = client_ssl_context(cert=pki / "admin.crt", key=pki / "admin.key", ca=pki / "ca.crt")
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, ctx, server_hostname="localhost")
        received = 0
        with trio.fail_after(600):
            await stream.do_handshake()
            first = time.perf_counter()
            while data := await stream.receive_some(CHUNK):
                received += len(data)
            elapsed = time.perf_counter() - first
        await trio.aclose_forcefully(stream)
        if received != size:
            raise RuntimeError(f"bare TLS: received {received} of {size} bytes")
        return size / elapsed / 1e6
    finally:
        with trio.move_on_after(30, shield=True):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()


async def _send(pki: Path, size: int) -> None:
    ctx = server_ssl_context(cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    print(f"port {port}", flush=True)
    with trio.fail_after(600):
        tcp = await listeners[0].accept()
        stream = trio.SSLStream(tcp, ctx, server_side=True)
        await stream.do_handshake()
        block = bytes(CHUNK)
        left = size
        while left > 0:
            n = min(left, CHUNK)
            await stream.send_all(block if n == CHUNK else block[:n])
            left -= n
        await stream.aclose()
    for listener in listeners:
        await listener.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.e2e.ceilings")
    parser.add_argument("role", choices=("send",))
    parser.add_argument("--pki", required=True, type=Path)
    parser.add_argument("--size", required=True, type=int)
    args = parser.parse_args(argv)
    trio.run(_send, args.pki, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
