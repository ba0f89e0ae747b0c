"""Processes and helpers the scenarios share: a server process, clients, RSS, percentiles.

The server always runs in its own process (``server_main``) so that its RSS and CPU are its
own, and every client (this driver, ``trio-jobs tail``, ``followers``) talks to it over
mutual TLS on 127.0.0.1, as a user would. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import sys
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from trio_jobs.client import JobsClient
from trio_jobs.security.pki import init_dev_pki, issue_client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

PYTHON: Final = sys.executable
STARTUP_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 60.0
_LISTEN_RE: Final = re.compile(rb"listening on (\S+):(\d+) (\S+)")

# Admin may hold the 1,000 sleeping jobs of the scale figure; alice and bob are the
# ordinary users of the isolation figure (their jobs run as nobody when we are root).
POLICY: Final = """\
[defaults]
run_as = "nobody"
max_running_jobs = 32
programs = ["*"]

[identities.admin]
admin = true
run_as = ""
max_running_jobs = 1100

[identities.alice]
[identities.bob]
{watchers}"""
# The service allows 64 output streams per identity: the 100 followers of the fan-out figure
# are spread over admin and these admin identities ("a team watching one job").
WATCHERS: Final = ("watcher1", "watcher2")
FOLLOWER_IDENTITIES: Final = ("admin", *WATCHERS)


def read_line(stream: IO[bytes], timeout: float) -> bytes:
    """One line from a pipe, or TimeoutError (select-based, no sleeping)."""
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


def status_bytes(pid: int, field: str) -> int:
    """A size field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``...) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for pid {pid}")


def rss_of(pid: int) -> int:
    """Resident set size of a process in bytes."""
    return status_bytes(pid, "VmRSS")


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class BenchServer:
    """A server process with its own home (PKI, policy, data) under ``workdir``."""

    def __init__(
        self, workdir: Path, *, cgroups: bool, profile: Path | None = None, home: Path | None = None,
        server_args: Sequence[str] = (),
    ) -> None:
        """``home``: an existing home whose ``data`` directory already holds jobs.
        ``server_args``: more arguments for ``server_main`` (e.g. ``--audit-log F``)."""
        self.home = home or workdir / f"server-{uuid.uuid4().hex[:8]}"
        self.home.mkdir(parents=True, exist_ok=home is not None)
        self.pki = self.home / "pki"
        policy = self.home / "policy.toml"
        policy.write_text(POLICY.format(watchers="".join(f"[identities.{w}]\nadmin = true\n" for w in WATCHERS)))
        if not self.pki.exists():
            init_dev_pki(self.pki)
        for name in WATCHERS if not (self.pki / f"{WATCHERS[0]}.crt").exists() else ():
            issue_client(self.pki, name)
        self.cgroup_parent = f"trio-jobs-bench-{uuid.uuid4().hex[:12]}"
        self.stderr_path = self.home / "server.stderr"
        argv = [
            PYTHON, "-m", "benchmarks.e2e.server_main", "--home", str(self.home),
            "--policy", str(policy), "--cgroups", "auto" if cgroups else "none",
            "--cgroup-parent", self.cgroup_parent,
        ]  # fmt: skip
        if profile is not None:
            argv += ["--profile", str(profile)]
        argv += server_args
        # In a session of its own, as a service is (systemd, or a terminal of its own): with
        # the kernel's autogroup on, the CPUs are shared between sessions, and a server in
        # the driver's session would share one group's CPU with every CLI the driver runs.
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        assert self.proc.stdout is not None
        try:
            line = read_line(self.proc.stdout, STARTUP_TIMEOUT)
        except TimeoutError:
            self.close()
            raise
        m = _LISTEN_RE.match(line)
        if m is None:
            self.close()
            raise RuntimeError(f"the benchmark server did not start: {self.stderr_tail()}")
        self.address = f"{m.group(1).decode()}:{m.group(2).decode()}"
        self.driver = m.group(3).decode()
        self.pid = self.proc.pid

    def stderr_tail(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-2000:]

    def rss(self) -> int:
        return rss_of(self.pid)

    def credentials(self, identity: str) -> dict[str, Path]:
        return {
            "cert": self.pki / f"{identity}.crt",
            "key": self.pki / f"{identity}.key",
            "ca": self.pki / "ca.crt",
        }

    @asynccontextmanager
    async def client(self, identity: str = "admin") -> AsyncIterator[JobsClient]:
        creds = self.credentials(identity)
        async with JobsClient.connect(self.address, cert=creds["cert"], key=creds["key"], ca=creds["ca"]) as client:
            yield client

    def cli_env(self, identity: str = "admin") -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_JOBS_")}
        env.update(TRIO_JOBS_HOME=str(self.home), TRIO_JOBS_SERVER=self.address, TRIO_JOBS_IDENTITY=identity)
        return env

    def close(self) -> None:
        """SIGTERM (the server stops its jobs and removes its cgroups), SIGKILL if stuck."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        remove_cgroup_dirs(self.cgroup_parent)

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def own_cgroup_dirs(name: str) -> list[Path]:
    """Directories ``name`` under this process's cgroup in every mounted hierarchy."""
    root = Path("/sys/fs/cgroup")
    found: list[Path] = []
    if not root.is_dir():
        return found
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, own = line.split(":", 2)
        names = controllers.split(",") if controllers else [""]
        candidates = [root / c for c in names] + ([root / controllers] if controllers else [])
        for sub in candidates:
            # only real cgroup hierarchies (on a hybrid host /sys/fs/cgroup itself is tmpfs)
            if (sub / "cgroup.procs").is_file() and sub / own.lstrip("/") / name not in found:
                found.append(sub / own.lstrip("/") / name)
    return found


def remove_cgroup_dirs(name: str) -> None:
    """Kill and remove what a killed benchmark server left under ``name`` (ours only)."""
    for base in own_cgroup_dirs(name):
        if not base.is_dir():
            continue
        for child in sorted(base.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir():
                _kill_and_rmdir(child)
        _kill_and_rmdir(base)


def _kill_and_rmdir(d: Path) -> None:
    try:
        for pid in (d / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        d.rmdir()
    except OSError:
        pass
