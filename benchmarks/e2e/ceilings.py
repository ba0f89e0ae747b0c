"""The ceilings each figure is compared with, measured in the same run.

- job start (:class:`StartCeiling`): ``posix_spawn`` of ``/bin/true`` from Python, timed to
  its exec, with cgroups after a mkdir and the limit writes in each hierarchy the driver uses.
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
import collections
import contextlib
import fcntl
import os
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final, final

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


TRUE: Final = "/bin/true"
SPAWN_ENV: Final = {"PATH": "/usr/bin:/bin"}


@final
class StartCeiling:
    """The job-start ceiling, measured in the same rounds as the StartJob figures
    (``scenarios.job_start``), in this process's own cgroup.

    Like for like, *to exec*: ``os.posix_spawn`` returns once the child has executed
    ``/bin/true`` (glibc's ``posix_spawn`` clones with ``CLONE_VFORK``: the parent resumes
    at the child's exec), and ``StartJob`` answers once the job's process has executed its
    wrapper and been released (``worker/spawn.py``): one process created and executed once,
    in both. Neither includes the program's own run, its exit or its reaping, which come
    after the sample here, as the server handles a job's end after its answer. The other
    like-for-like pair, *to exit*, is measured in the same samples (:meth:`latencies`).

    With cgroups (a writable hierarchy the driver uses, see ``DRIVER_HIERARCHIES``), each
    sample also makes one job directory in every such hierarchy and writes the limit files
    a job gets, before the spawn: one span, so the p99 is the p99 of those sums. No process
    is moved into them (the server also moves its held wrapper: one more write per
    hierarchy), so the ceiling is below the server's minimum, not equal to it.
    """

    def __init__(self, *, cgroups: bool) -> None:
        self._bases: list[Path] = []
        self._files: dict[Path, list[tuple[str, str]]] = {}  # the limit files each hierarchy has
        self._next = 0
        if not cgroups:
            return
        name = f"trio-jobs-bench-ceiling-{uuid.uuid4().hex[:8]}"
        try:
            for base in own_cgroup_dirs(name):
                if not _hierarchy_used(base):
                    continue
                try:
                    base.mkdir()
                except OSError:
                    continue
                self._bases.append(base)
                probe = base / "probe"
                probe.mkdir()
                self._files[base] = [(f, v) for f, v in LIMIT_FILES.items() if (probe / f).exists()]
                probe.rmdir()
        except BaseException:
            self.close()
            raise

    @property
    def hierarchies(self) -> int:
        """How many cgroup directories a sample makes (0: no cgroups)."""
        return len(self._bases)

    def _start(self) -> tuple[int, list[Path]]:
        dirs = []
        for base in self._bases:
            job = base / f"job-{self._next}"
            job.mkdir()
            dirs.append(job)
            for fname, value in self._files[base]:
                (job / fname).write_text(value)
        self._next += 1
        return os.posix_spawn(TRUE, [TRUE], SPAWN_ENV), dirs

    @staticmethod
    def _remove(dirs: list[Path]) -> None:
        for job in dirs:
            job.rmdir()

    def latencies(self, count: int) -> list[tuple[float, float]]:
        """Seconds per start, one at a time: (to exec, to exit). *To exit* goes on to
        ``waitpid`` and the removal of the cgroup directories (the server removes a job's
        cgroup before it publishes the job's end), for the figure that includes the
        program's run on both sides."""
        samples = []
        for _ in range(count):
            t0 = time.perf_counter()
            pid, dirs = self._start()
            t1 = time.perf_counter()
            os.waitpid(pid, 0)
            self._remove(dirs)
            samples.append((t1 - t0, time.perf_counter() - t0))
        return samples

    def rate(self, count: int) -> float:
        """Starts per second, back to back in one loop, timed to the last start's exec; the
        children that have exited meanwhile are reaped (and their directories removed)
        between starts, inside the timed span, as the server handles ends while it starts."""
        pending: collections.deque[tuple[int, list[Path]]] = collections.deque()
        t0 = time.perf_counter()
        try:
            for _ in range(count):
                pending.append(self._start())
                while pending and os.waitpid(pending[0][0], os.WNOHANG)[0]:
                    self._remove(pending.popleft()[1])
            return count / (time.perf_counter() - t0)
        finally:
            for pid, dirs in pending:
                os.waitpid(pid, 0)
                self._remove(dirs)

    def close(self) -> None:
        """Remove our directories (job directories first: a cgroup must be empty of children)."""
        for base in self._bases:
            for child in base.glob("*"):
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                base.rmdir()
        self._bases.clear()

    def __enter__(self) -> StartCeiling:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
