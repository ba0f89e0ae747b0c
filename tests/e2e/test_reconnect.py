"""``tail`` survives a dropped TCP connection: a proxy cuts it mid-stream, tail reconnects
and resumes at the last offset, and the output is byte-exact."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import TYPE_CHECKING

import pytest

from .conftest import read_until

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Host

pytestmark = pytest.mark.slow


class CuttingProxy:
    """A TCP proxy on 127.0.0.1:0 that can cut every connection it carries, on demand."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self._socks: list[socket.socket] = []
        self._all: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)
        self._accept_thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream, timeout=30)
            upstream.settimeout(None)
            with self._lock:
                self.connections += 1
                self._socks += [client, upstream]
                self._all += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                t = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                t.start()
                self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every connection now (both directions, like a failing network path)."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()
        self._accept_thread.join(timeout=10)
        self.cut()
        for t in self._threads:
            t.join(timeout=10)
        for s in self._all:
            s.close()


def test_tail_resumes_after_dropped_connection(served: Host, tmp_path: Path) -> None:
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    first = b"".join(b"first %d\n" % i for i in range(1, 20001))
    second = b"".join(b"second %d\n" % i for i in range(1, 20001))
    job = served.start("sh", "-c", f"seq -f 'first %g' 1 20000; read x < {fifo}; seq -f 'second %g' 1 20000")
    host, port = served.address.rsplit(":", 1)
    proxy = CuttingProxy((host, int(port)))
    try:
        tail = served.popen("tail", job, "--server", f"127.0.0.1:{proxy.port}")
        assert tail.stdout is not None
        received = read_until(tail.stdout, b"first 20000\n", timeout=60)
        assert proxy.connections == 1
        proxy.cut()  # mid-stream: the job is still running and has more to say
        with fifo.open("w") as release:
            release.write("go\n")
        rest, err = tail.communicate(timeout=120)
        assert received + rest == first + second, err.decode()
        assert tail.returncode == 0, err.decode()
        assert proxy.connections >= 2
    finally:
        proxy.close()


async def test_a_client_idle_past_the_servers_idle_timeout_still_answers(host: Host) -> None:
    """The server closes a connection without streams after its idle timeout (GOAWAY); a
    JobsClient left idle that long makes its next calls on a new connection, transparently."""
    import trio

    from trio_jobs.client import JobsClient, _usable

    host.start_server("--idle-timeout", "1s")
    pki = host.home / "pki"
    async with JobsClient.connect(host.address, cert=pki / "alice.crt", key=pki / "alice.key",
                                  ca=pki / "ca.crt") as jobs:
        job = await jobs.start("echo", ["hi"])
        channel = jobs._connected()
        with trio.fail_after(30):
            while _usable(channel):  # the server's GOAWAY arrives after about a second
                await trio.sleep(0.05)
        assert (await jobs.status(job.job_id)).job_id == job.job_id
        assert [j.job_id for j in await jobs.list()] == [job.job_id]
        again = await jobs.start("true")
        assert again.job_id != job.job_id
