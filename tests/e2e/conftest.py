"""End-to-end fixtures: the real ``trio-jobs`` entry point in subprocesses.

Each test gets its own ``TRIO_JOBS_HOME`` in tmp_path, a server on 127.0.0.1 port 0 (it
prints ``trio-jobs listening on HOST:PORT`` as its first stdout line, which is how we learn
the port) and its own cgroup parent with a unique name, so concurrent test runs never touch
each other's cgroups. Every wait is bounded; nothing sleeps to wait for something.

Teardown is a check, not only a cleanup: a server that exits 0 has shut down cleanly and
must have removed every job and group cgroup, and the parent cgroup it created
(``server.py`` calls the driver's ``remove_parent`` after the jobs are stopped); a Host whose
server never started must have none. What such a server left is removed and then reported
as an error in the teardown of the test that ran it. Two exemptions, both by design: a
server that was killed or failed may leave anything (its next start cleans up), and a
parent that an earlier, killed server of the same Host created stays after a later clean
stop (``remove_parent`` removes only the directories its own ``prepare`` created; see
docs/cgroups.md), so only what is below it counts then. A server that does not exit within
``SHUTDOWN_WAIT`` of the teardown's SIGTERM is killed and reported too.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import selectors
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

import pytest

from trio_jobs.rpc._mode import RpcMode
from trio_jobs.worker.cgroups.detect import default_cgroup_parent as default_parent_for

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

CLI: Final = (sys.executable, "-m", "trio_jobs.cli")
STARTUP_TIMEOUT: Final = 60.0
COMMAND_TIMEOUT: Final = 60.0
# The server bounds a graceful stop by 15 s (DEFAULT_SHUTDOWN_TIMEOUT) plus a short forced
# drain; 60 s leaves room for a loaded 2-CPU host.
SHUTDOWN_WAIT: Final = 60.0
KILL_WAIT: Final = 10.0  # for SIGKILLed processes to exit before their cgroup is removed
_LISTEN_RE: Final = re.compile(rb"trio-jobs listening on (\S+):(\d+)")


def read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a pipe, or TimeoutError (select-based: no sleeping)."""
    fd = stream.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not buf.endswith(b"\n"):
            if not sel.select(timeout):
                raise TimeoutError(f"no complete line within {timeout}s (got {buf!r})")
            byte = os.read(fd, 1)
            if not byte:
                break
            buf += byte
    return buf


def read_until(stream: IO[bytes], marker: bytes, timeout: float) -> bytes:
    """Read from a pipe until ``marker`` has been seen (raises TimeoutError/EOFError)."""
    fd = stream.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while marker not in buf:
            if not sel.select(timeout):
                raise TimeoutError(f"{marker!r} not seen within {timeout}s")
            data = os.read(fd, 65536)
            if not data:
                raise EOFError(f"EOF before {marker!r}")
            buf += data
    return buf


class Host:
    """A TRIO_JOBS_HOME with (at most) one running server and a way to run client commands."""

    def __init__(self, home: Path, logs: Path, *, default_cgroup_parent: bool = False) -> None:
        self.home = home
        self.logs = logs
        # default_cgroup_parent: let the server choose (trio-jobs-<hash of its home>)
        self.explicit_cgroup_parent = not default_cgroup_parent
        self.cgroup_parent = (
            default_parent_for(home) if default_cgroup_parent else f"trio-jobs-e2e-{uuid.uuid4().hex[:12]}"
        )
        self.server: subprocess.Popen[bytes] | None = None
        self.servers: list[subprocess.Popen[bytes]] = []  # every server started, kept
        self.address = ""
        self.banner = ""
        self._starts = 0

    def env(self, identity: str | None = None, **extra: str) -> dict[str, str]:
        # (the rpc mode of the run -- tests/conftest.py's rpc_mode -- goes to every process)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("TRIO_JOBS_") or k.startswith("TRIO_JOBS_RPC_")
        }
        env["TRIO_JOBS_HOME"] = str(self.home)
        if self.address:
            env["TRIO_JOBS_SERVER"] = self.address
        if identity:
            env["TRIO_JOBS_IDENTITY"] = identity
        env.update(extra)
        return env

    def start_server(self, *extra: str) -> str:
        assert self.server is None, "a server is already running"
        self._starts += 1
        stderr = (self.logs / f"server-{self._starts}.stderr").open("wb")
        proc = subprocess.Popen(
            [
                *CLI,
                "serve",
                "--port",
                "0",
                *(["--cgroup-parent", self.cgroup_parent] if self.explicit_cgroup_parent else []),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=self.env(),
        )
        stderr.close()
        self.server = proc
        self.servers.append(proc)
        assert proc.stdout is not None
        try:
            first = read_line(proc.stdout, STARTUP_TIMEOUT)
        except TimeoutError:
            self.kill_server()
            raise
        m = _LISTEN_RE.match(first)
        if m is None:
            proc.wait(timeout=COMMAND_TIMEOUT)
            raise AssertionError(f"server did not start: {first!r}; stderr: {self.server_stderr()}")
        self.address = f"{m.group(1).decode()}:{m.group(2).decode()}"
        rest = read_until(proc.stdout, b"at once)\n", STARTUP_TIMEOUT)
        self.banner = (first + rest).decode()
        # The server runs in the rpc mode of this run (the banner says which, DESIGN §5).
        mode = RpcMode.from_environ(self.env()).describe()
        assert f"rpc: {mode}\n" in self.banner, (mode, self.banner)
        return self.address

    def server_stderr(self) -> str:
        return (self.logs / f"server-{self._starts}.stderr").read_text(errors="replace")

    def stop_server(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.server is not None
        self.server.send_signal(sig)
        try:
            code = self.server.wait(timeout=timeout)
        finally:
            self._forget()
        return code

    def kill_server(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait(timeout=COMMAND_TIMEOUT)
            self._forget()

    def _forget(self) -> None:
        if self.server is not None and self.server.stdout is not None:
            self.server.stdout.close()
        self.server = None

    def run(
        self, *args: str, identity: str | None = None, timeout: float = COMMAND_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run([*CLI, *args], env=self.env(identity), capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"trio-jobs {' '.join(args)} exited {result.returncode}: {result.stderr.decode(errors='replace')}"
            )
        return result

    def popen(self, *args: str, identity: str | None = None) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*CLI, *args], env=self.env(identity), stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def start(self, *argv: str, identity: str | None = None, options: Sequence[str] = ()) -> str:
        out = self.run("start", *options, "--", *argv, identity=identity).stdout.decode()
        job_id = out.strip()
        assert re.fullmatch(r"[0-9a-f-]{36}", job_id), out
        return job_id

    def close(self) -> None:
        """Stop the server (SIGTERM), remove the cgroups left under our parent, and raise
        AssertionError if the stop or the cgroups show a failure (see the module head)."""
        problems: list[str] = []
        if self.server is not None:
            try:
                self.stop_server(signal.SIGTERM, timeout=SHUTDOWN_WAIT)
            except subprocess.TimeoutExpired:
                self.kill_server()
                problems.append(f"the server did not exit within {SHUTDOWN_WAIT:g} s of SIGTERM")
        codes = [p.poll() for p in self.servers]
        parents, below = _remove_cgroup_dirs(self.cgroup_parent)
        if not codes or codes[-1] == 0:
            what = "a server that exited 0" if codes else "a Host whose server never started"
            parent_predates = any(code != 0 for code in codes[:-1])
            left = below if parent_predates else parents + below
            if left:
                problems.append(
                    f"{what} left {len(left)} cgroup(s) (removed now): {', '.join(left)}"
                )
        if problems:
            raise AssertionError("; ".join(problems))


def _remove_cgroup_dirs(name: str) -> tuple[list[str], list[str]]:
    """Remove the directories named ``name`` (and everything below) in every hierarchy we
    are in: ours only. Returns what was found, as the ``name`` directories and those below
    them; one that could not be removed says why."""
    parents: set[str] = set()
    below: set[str] = set()
    root = Path("/sys/fs/cgroup")
    if not root.is_dir():
        return [], []
    for proc_line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, own = proc_line.split(":", 2)
        for sub in [root / c for c in (controllers.split(",") if controllers else [""])] + [root / controllers]:
            base = (sub / own.lstrip("/") / name) if own != "/" else sub / name
            if base.is_dir():
                for child in sorted(base.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if child.is_dir():
                        below.add(_kill_and_rmdir(child))
                parents.add(_kill_and_rmdir(base))
    return sorted(parents), sorted(below)


def _kill_and_rmdir(d: Path) -> str:
    try:
        _kill_and_wait([int(pid) for pid in (d / "cgroup.procs").read_text().split()])
        d.rmdir()
    except OSError as exc:
        return f"{d} (not removed: {exc.strerror})"
    return str(d)


def _kill_and_wait(pids: list[int]) -> None:
    """SIGKILL the processes and wait until they have exited (at most KILL_WAIT): until then
    their cgroup cannot be removed (EBUSY), in this hierarchy and, on v1, in those removed
    next. A pidfd becomes readable when its process exits, so this waits on an event."""
    fds: list[int] = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fds[-1], signal.SIGKILL)
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        pending = set(fds)
        deadline = time.monotonic() + KILL_WAIT
        while pending and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(left * 1000):
                pending.discard(fd)
                poller.unregister(fd)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    logs = tmp_path / "logs"
    logs.mkdir()
    h = Host(tmp_path / "home", logs)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def served(host: Host) -> Host:
    host.start_server()
    return host
