"""The soak's server: a real ``trio-jobs serve`` subprocess, and what /proc says about it.

The server gets a fresh ``TRIO_JOBS_HOME`` (a temporary directory), a policy with one
identity per group of clients (certificates issued from the development PKI the server makes
on its first run), and its own cgroup parent ``trio-jobs-soak-<random>``, so the soak never
touches another server's jobs or cgroups. :func:`snapshot` reads RSS, file descriptors,
threads, descendant processes and leftover job cgroups from /proc and /sys/fs/cgroup.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from trio_jobs.security.pki import issue_client
from trio_jobs.security.tls import client_ssl_context

if TYPE_CHECKING:
    import ssl

STARTUP_TIMEOUT: Final = 60.0
STOP_TIMEOUT: Final = 60.0
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")


def identity_name(i: int) -> str:
    return f"soak{i:03d}"


def policy_toml(identities: int, max_running_jobs: int) -> str:
    lines = [
        "[defaults]",
        'run_as = ""',  # jobs run as the server's user: the soak measures the server, not setuid
        f"max_running_jobs = {max_running_jobs}",
        'programs = ["*"]',
        "[identities.admin]",
        "admin = true",
    ]
    lines += [f"[identities.{identity_name(i)}]" for i in range(identities)]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    rss_bytes: int
    fds: int
    threads: int
    processes: int  # descendants of the server (jobs and their children)
    cgroups: int  # job cgroup directories under the soak's parent, over every hierarchy


def _descendants(root: int) -> int:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    count, todo = 0, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        count += 1
        todo += children.get(pid, [])
    return count


def cgroup_dirs(parent_name: str) -> list[Path]:
    """Every directory named ``parent_name`` in any cgroup hierarchy (v1 or v2)."""
    if not CGROUP_ROOT.is_dir():
        return []
    found = []
    for top in [CGROUP_ROOT, *(p for p in CGROUP_ROOT.iterdir() if p.is_dir())]:
        try:
            found += [p for p in top.rglob(parent_name) if p.is_dir()]
        except OSError:
            continue
    return sorted(set(found))


def job_cgroups(parent_name: str) -> int:
    """Job cgroups left under the parent: directly below it, or in an identity's group
    cgroup (``g...``, which stays until the server stops: docs/cgroups.md). A v2
    ``supervisor`` leaf is the server's own."""
    count = 0
    for d in cgroup_dirs(parent_name):
        for c in d.iterdir():
            if not c.is_dir() or c.name == "supervisor":
                continue
            count += sum(1 for j in c.iterdir() if j.is_dir()) if c.name.startswith("g") else 1
    return count


def snapshot(pid: int, parent_name: str) -> Snapshot:
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return Snapshot(
        rss_bytes=rss,
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=threads,
        processes=_descendants(pid),
        cgroups=job_cgroups(parent_name),
    )


@dataclass(frozen=True, kw_only=True)
class HeapProbe:
    traced: int  # bytes of live Python objects (0 unless tracemalloc ran)
    rss: int
    trimmed: int  # RSS after malloc_trim(0)
    snapshot: Path | None  # the tracemalloc snapshot
    allocator: dict[str, int]  # _traced_serve._allocator_stats(): where the memory is


class SoakServer:
    """``trio-jobs serve`` on 127.0.0.1 port 0 in ``home``; :meth:`start`, then :meth:`stop`."""

    def __init__(
        self, home: Path, *, identities: int, max_running_jobs: int, extra_args: tuple[str, ...] = (),
        heap: str = "",
    ) -> None:
        self.home = home
        self.heap = heap  # "" / "none", "rss" or "tracemalloc": probe the heap after rounds (_traced_serve)
        self._snapshots = 0
        self.identities = identities
        self.max_running_jobs = max_running_jobs
        self.extra_args = extra_args
        self.cgroup_parent = f"trio-jobs-soak-{uuid.uuid4().hex[:12]}"
        self.process: trio.Process | None = None
        self.address = ""
        self.stderr_path = home / "server.stderr"
        self.banner = ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_JOBS_")}
        env["TRIO_JOBS_HOME"] = str(self.home)
        if self.heap == "tracemalloc":
            env["SOAK_TRACEMALLOC"] = "1"
        return env

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the server, wait for its first line (the address), then issue certificates."""
        self.home.mkdir(parents=True, exist_ok=True)
        policy = self.home / "policy.toml"
        policy.write_text(policy_toml(self.identities, self.max_running_jobs))
        module = "benchmarks.soak._traced_serve" if self.heap not in ("", "none") else "trio_jobs.cli"
        argv = [sys.executable, "-m", module, "serve", "--port", "0", "--policy", str(policy)]
        argv += ["--cgroup-parent", self.cgroup_parent, *self.extra_args]
        with self.stderr_path.open("wb") as stderr:
            self.process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=stderr, env=self.env())
        assert self.process.stdout is not None
        first = b""
        with trio.fail_after(STARTUP_TIMEOUT):
            while not first.endswith(b"\n"):
                data = await self.process.stdout.receive_some(1)
                if not data:
                    raise RuntimeError(f"the server exited at start: {self.stderr_path.read_text(errors='replace')}")
                first += data
        prefix = b"trio-jobs listening on "
        if not first.startswith(prefix):
            raise RuntimeError(f"unexpected first line from the server: {first!r}")
        self.address = first[len(prefix) :].decode().strip()
        nursery.start_soon(self._drain_stdout)
        pki = self.home / "pki"
        for i in range(self.identities):
            await trio.to_thread.run_sync(issue_client, pki, identity_name(i))

    async def _drain_stdout(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        while data := await self.process.stdout.receive_some(65536):
            if len(self.banner) < 4096:  # the banner; anything later is not kept
                self.banner += data.decode(errors="replace")

    def ssl_context(self, identity: str) -> ssl.SSLContext:
        pki = self.home / "pki"
        return client_ssl_context(cert=pki / f"{identity}.crt", key=pki / f"{identity}.key", ca=pki / "ca.crt")

    async def stop(self) -> int | None:
        """SIGTERM, then wait (SIGKILL past the timeout). Returns the exit code."""
        if self.process is None or self.process.returncode is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            return await self.process.wait()
        self.process.kill()
        return await self.process.wait()

    async def heap_probe(self) -> HeapProbe:
        """Probe a ``heap`` server's memory now (see _traced_serve); trims the C heap."""
        assert self.heap not in ("", "none")
        assert self.process is not None
        n, self._snapshots = self._snapshots, self._snapshots + 1
        done = self.home / f"heap-{n}.done"
        self.process.send_signal(signal.SIGUSR2)
        with trio.fail_after(STARTUP_TIMEOUT):
            while not done.exists():  # noqa: ASYNC110 - another process writes it
                await trio.sleep(0.1)
        traced, rss, trimmed = (int(word) for word in done.read_text().split())
        snap = self.home / f"heap-{n}.snap"
        alloc = self.home / f"heap-{n}.alloc"
        stats = {}
        if alloc.exists():
            for line in alloc.read_text().splitlines():
                name, _, value = line.rpartition(" ")
                stats[name] = int(value)
        return HeapProbe(traced=traced, rss=rss, trimmed=trimmed,
                         snapshot=snap if snap.exists() else None, allocator=stats)

    def cgroup_driver(self) -> str:
        """The banner's ``cgroups: ...`` line (which driver the server uses)."""
        line = next((ln for ln in self.banner.splitlines() if ln.startswith("cgroups:")), "cgroups: ?")
        return line.split(":", 2)[1].strip()  # "cgroup v1 driver" (the paths follow)

    def stderr_text(self) -> str:
        return self.stderr_path.read_text(errors="replace")
