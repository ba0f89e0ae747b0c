"""The ceilings each figure is compared with, measured in the same run.

- spawn: ``posix_spawn`` + ``waitpid`` of ``/bin/true`` from Python, nothing else.
- cgroup writes: what a job's cgroups cost the kernel: per hierarchy the driver uses, mkdir a
  directory, write the limit files a job gets, rmdir it (no process is moved).
- bare TLS: ``trio.SSLStream`` bulk transfer between two processes over loopback with the
  same mutual-TLS 1.3 contexts (the benchmark PKI), no HTTP/2, gRPC or protobuf: a sender
  process writes the bytes in 64 KiB writes, this process receives and times them.

- ideal live chain: what a live tail would reach with nothing of ours in it. The job's
  output goes through a pipe into a spool file (``head -c N /dev/zero | cat > SPOOL``: ``cat``
  is the leanest possible pump), a sender process follows that file as it grows and sends
  it with the bare TLS of the ceiling above, and this process receives it and writes it
  into a pipe that a reader process drains -- every step of ``trio-jobs tail JOB | ...``
  minus HTTP/2, gRPC, protobuf and our code. The sender (with ``cat``) and the job each
  run in a session of their own, as the server (with its pump thread) and its jobs do: the
  kernel's autogroup shares the CPUs between sessions. On a machine with few CPUs the job and the follower share them, so this is
  the bound for the live-tail figure, and the job's wall time in it (alone vs followed)
  the bound for "the job is not slowed".

``python -m benchmarks.e2e.ceilings send --pki D --size N`` is the bare TLS sender, ``chain
--pki D --size N --spool F`` the sender of the ideal chain.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from trio_jobs.security.tls import client_ssl_context, server_ssl_context

from .harness import PYTHON, own_cgroup_dirs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

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


async def _start_sender(role: str, pki: Path, size: int, *extra: str) -> trio.Process:
    """A sender process of ours (``main`` below), in a session of its own as the server is."""
    return await trio.lowlevel.open_process(
        [PYTHON, "-m", "benchmarks.e2e.ceilings", role, "--pki", str(pki), "--size", str(size), *extra],
        stdout=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


async def _connect(pki: Path, sender: trio.Process) -> trio.SSLStream[trio.SocketStream]:
    """A TLS stream to ``sender`` once it has printed its port (handshake not done yet)."""
    assert sender.stdout is not None
    port = int((await _line(sender.stdout)).split()[1])
    ctx = client_ssl_context(cert=pki / "admin.crt", key=pki / "admin.key", ca=pki / "ca.crt")
    return trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), ctx, server_hostname="localhost")


async def _reap(*children: trio.Process) -> None:
    """Wait (shielded, bounded) for child processes to exit; kill what is still running."""
    with trio.move_on_after(30, shield=True):
        for child in children:
            await child.wait()
    for child in children:
        if child.returncode is None:
            child.kill()


@asynccontextmanager
async def _accept_one(pki: Path) -> AsyncIterator[trio.SSLStream[trio.SocketStream]]:
    """A sender's side: print a loopback port, accept one mutual-TLS client, handshake."""
    ctx = server_ssl_context(cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        print(f"port {listeners[0].socket.getsockname()[1]}", flush=True)
        stream = trio.SSLStream(await listeners[0].accept(), ctx, server_side=True)
        await stream.do_handshake()
        yield stream
    finally:
        for listener in listeners:
            await listener.aclose()


async def bare_tls_receive(pki: Path, size: int) -> float:
    """MB/s (10^6 B/s) of ``size`` bytes sent by a sender process over mutual TLS."""
    proc = await _start_sender("send", pki, size)
    try:
        stream = await _connect(pki, proc)
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
        await _reap(proc)


async def _send(pki: Path, size: int) -> None:
    with trio.fail_after(600):
        async with _accept_one(pki) as stream:
            block = bytes(CHUNK)
            left = size
            while left > 0:
                n = min(left, CHUNK)
                await stream.send_all(block if n == CHUNK else block[:n])
                left -= n
            await stream.aclose()


def _start_job(size: int, spool: Path) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """``head -c SIZE /dev/zero | cat > SPOOL``: ``head`` in a session of its own, as the
    worker starts jobs; ``cat``, the pump, in ours, as the server's pump thread is in its."""
    with spool.open("wb") as out:
        head = subprocess.Popen(["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE, start_new_session=True)
        assert head.stdout is not None
        try:
            cat = subprocess.Popen(["cat"], stdin=head.stdout, stdout=out)
        finally:
            head.stdout.close()
    return head, cat


def job_alone(size: int, spool: Path) -> float:
    """Wall time of the ideal chain's job with nobody following it, in seconds."""
    t0 = time.perf_counter()
    head, cat = _start_job(size, spool)
    cat.wait()
    head.wait()
    return time.perf_counter() - t0


async def _send_chain(pki: Path, size: int, spool: Path) -> None:
    """The ideal chain's sender: start the job once a receiver is connected, follow its spool
    file as it grows (64 KiB preads; a 0.5 ms nap when caught up, which a job faster than
    the follower seldom leaves it) and send it over bare TLS. Prints the job's wall time."""
    with trio.fail_after(600):
        async with _accept_one(pki) as stream:
            t0 = time.perf_counter()
            head, cat = _start_job(size, spool)
            job_wall = 0.0
            fd = os.open(spool, os.O_RDONLY | os.O_CLOEXEC)
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            offset = 0
            try:
                while offset < size:
                    if not job_wall and cat.poll() is not None:
                        job_wall = time.perf_counter() - t0
                    got = os.preadv(fd, [buf], offset)
                    if not got:
                        if cat.returncode is not None and cat.returncode != 0:
                            raise RuntimeError(f"the ideal chain's cat exited {cat.returncode}")
                        await trio.sleep(0.0005)
                        continue
                    await stream.send_all(view[:got])
                    offset += got
            finally:
                os.close(fd)
            # every byte is in the file, so cat is at its end; if the last bytes went out
            # before we saw it exit, its exit is the job's end
            await trio.to_thread.run_sync(cat.wait)
            job_wall = job_wall or time.perf_counter() - t0
            await stream.aclose()
            await trio.to_thread.run_sync(head.wait)
    print(f"job {job_wall:.6f}", flush=True)


_DRAIN = "import os\nb = bytearray(1 << 20)\nwhile os.readv(0, [b]): pass\n"
"""The ideal chain's reader: drains its stdin into one reused buffer, like the driver's
reader of ``trio-jobs tail`` (scenarios.run_cli_tail)."""


async def ideal_live_chain(pki: Path, size: int, spool: Path) -> dict[str, float]:
    """One run of the ideal live chain (see the module docstring): MB/s (10^6 B/s) from the
    first to the last byte received, and the job's wall time while followed, in seconds.
    ``spool`` is overwritten (each run truncates it)."""
    proc = await _start_sender("chain", pki, size, "--spool", str(spool))
    pipe_r, pipe_w = os.pipe2(os.O_CLOEXEC)
    try:
        reader = await trio.lowlevel.open_process([PYTHON, "-c", _DRAIN], stdin=pipe_r)
    finally:
        os.close(pipe_r)
    try:
        assert proc.stdout is not None
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, 1 << 20)  # as trio-jobs tail grows its stdout
        stream = await _connect(pki, proc)
        received = 0
        first = 0.0
        with trio.fail_after(600):
            await stream.do_handshake()
            while data := await stream.receive_some(CHUNK):
                if not received:
                    first = time.perf_counter()
                received += len(data)
                view = memoryview(data)
                while view:  # blocking, in this thread: the leanest way into the pipe
                    view = view[os.write(pipe_w, view) :]
            elapsed = time.perf_counter() - first
            job_wall = float((await _line(proc.stdout)).split()[1])
        await trio.aclose_forcefully(stream)
        if received != size:
            raise RuntimeError(f"ideal chain: received {received} of {size} bytes")
        return {"mbps": size / elapsed / 1e6, "job_followed_s": job_wall}
    finally:
        os.close(pipe_w)  # the reader's EOF
        await _reap(reader, proc)


async def _line(stream: trio.abc.ReceiveStream) -> bytes:
    """One line from a child's stdout (bounded)."""
    line = b""
    with trio.fail_after(60):
        while not line.endswith(b"\n"):
            data = await stream.receive_some(1)
            if not data:
                raise RuntimeError(f"a ceiling process ended early (got {line!r})")
            line += data
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.e2e.ceilings")
    parser.add_argument("role", choices=("send", "chain"))
    parser.add_argument("--pki", required=True, type=Path)
    parser.add_argument("--size", required=True, type=int)
    parser.add_argument("--spool", type=Path, help="the ideal chain's spool file (role chain)")
    args = parser.parse_args(argv)
    if args.role == "chain":
        if args.spool is None:
            parser.error("chain needs --spool")
        trio.run(_send_chain, args.pki, args.size, args.spool)
    else:
        trio.run(_send, args.pki, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
