"""Boot the cgroup v2 VM and run a pytest subset inside it as root.

Theory of operation. qemu (TCG: this host's /dev/kvm is nested PVM, which cannot run a stock
kernel) boots the cached Debian 6.1 `vmlinux` through PVH with an initramfs built here for
each run: busybox, the modules, and `init.sh` as /init. Two 9p shares: the host root
(read-only; the guest overlays it with a tmpfs so it can write) and a per-run results
directory (writable) through which the host hands in `job.sh` and gets back `output.txt`,
`status`, `ready_uptime` and `junit.xml` (the guest pytest's report: which tests passed,
failed or were skipped, and why). A sparse raw file is the guest's virtio disk /dev/vda (254:0),
formatted ext2 and mounted at /mnt/scratch, so io.max has a real block device to limit.

The guest's pytest uses this interpreter (`sys.executable`, the venv's real binary: a pyenv
shim would cost ~7 s per start under TCG, where Python is ~14x slower) and this repository
(its path comes from this file at run time, so any clone works). The whole run has a hard
timeout after which qemu is terminated, killed and reaped.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from vm.assets import (
    Assets,
    VMError,
    VMUnavailable,
    default_cache_dir,
    exclusive,
    locate,
    prepare,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

REPO: Final = Path(__file__).resolve().parents[2]
INIT_SCRIPT: Final = Path(__file__).with_name("init.sh")
# Measured: 16 s for the smoke alone, 4-5 min with the cgroup tests on a 2-core host at load 9.
DEFAULT_TIMEOUT: Final = 600.0
SCRATCH_BYTES: Final = 64 * 1024 * 1024
# What the guest's tests are told (documented in docs/testing-vm.md).
GUEST_ENV: Final = {
    "TRIO_JOBS_IN_VM": "1",
    "TRIO_JOBS_TEST_BLOCKDEV": "/dev/vda",
    "TRIO_JOBS_TEST_BLOCKDEV_DIR": "/mnt/scratch",
}
# Tail kept of the console and of the guest's output: a runaway guest must not make the host
# test read gigabytes into memory; the end is what explains a failure.
MAX_CONSOLE: Final = 64 * 1024
MAX_OUTPUT: Final = 1024 * 1024
MAX_JUNIT: Final = 8 * 1024 * 1024  # a report larger than this is dropped (parse_junit fails)
# The results share as the guest's pytest sees it (init.sh mounts it at $R/mnt/vm-results).
GUEST_RESULTS: Final = "/mnt/vm-results"


@dataclass(frozen=True, kw_only=True)
class GuestTest:
    """One test of the guest's pytest, from its junit report."""

    outcome: str  # "passed", "skipped", "failed" or "error"
    message: str = ""  # the skip reason, or the failure's message


@dataclass(frozen=True, kw_only=True)
class GuestRun:
    status: int | None  # the guest pytest's exit status; None if the guest reported none
    failure: str | None  # why there is no status (init error, timeout, qemu crash)
    output: str  # the guest pytest's stdout+stderr
    console: str  # the serial console: kernel and init messages
    ready_seconds: float | None  # guest uptime when pytest was started (boot time)
    wall_seconds: float  # qemu start to exit
    junit: str = ""  # the guest pytest's junit XML report ("" if it wrote none)

    @property
    def ok(self) -> bool:
        return self.status == 0

    def report(self) -> str:
        what = f"exit status {self.status}" if self.failure is None else self.failure
        ready = "?" if self.ready_seconds is None else f"{self.ready_seconds:.1f}"
        return (
            f"cgroup v2 VM: {what} (guest ready after {ready} s, "
            f"{self.wall_seconds:.1f} s in all)\n"
            f"----- guest pytest output -----\n{self.output}\n"
            f"----- guest console (tail) -----\n{self.console}"
        )


def parse_junit(text: str) -> dict[str, GuestTest]:
    """The tests of a junit XML report by ``module.path::name`` (``tests.vm.test_x::test_y``);
    raises ValueError if it is not one. A test reported twice (e.g. passed, then an error at
    teardown) keeps its worst outcome."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise ValueError(f"not a junit report: {exc}") from exc
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    tests: dict[str, GuestTest] = {}
    for case in root.iter("testcase"):
        key = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for tag, meaning in (("skipped", "skipped"), ("failure", "failed"), ("error", "error")):
            child = case.find(tag)
            if child is not None and rank[meaning] > rank[outcome]:
                outcome, message = meaning, child.get("message", "")
        old = tests.get(key)
        if old is None or rank[outcome] > rank[old.outcome]:
            tests[key] = GuestTest(outcome=outcome, message=message)
    return tests


def default_pytest_args(repo: Path = REPO) -> list[str]:
    """The guest's test selection: `$TRIO_JOBS_VM_PYTEST_ARGS`, else the cgroup tests."""
    if explicit := os.environ.get("TRIO_JOBS_VM_PYTEST_ARGS"):
        return shlex.split(explicit)
    args = ["-m", "cgroups", "tests/vm/test_guest_smoke.py"]
    if (repo / "tests" / "cgroups").is_dir():
        args.append("tests/cgroups")
    return args


def default_timeout() -> float:
    """`$TRIO_JOBS_VM_TIMEOUT` (seconds), else DEFAULT_TIMEOUT."""
    text = os.environ.get("TRIO_JOBS_VM_TIMEOUT", "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400:
        raise VMError(f"TRIO_JOBS_VM_TIMEOUT={text!r}: give seconds, e.g. 600")
    return value


def run_lock() -> Path | None:
    """One VM at a time per host: two TCG guests on a small host starve each other and make
    the timing tests inside (cpu.max, io.max) flaky, so runs queue on this lock instead.
    None (no queueing) when the cache directory is not writable."""
    path = default_cache_dir() / "run.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        return None
    return path


def build_initramfs(assets: Assets, init_script: bytes) -> bytes:
    """A cpio "newc" archive: /init, /bin/busybox, /modules/*.ko and /dev/console."""
    w = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "modules"):
        w.add(d, 0o040755)
    w.add("dev/console", 0o020600, rdev=(5, 1))  # the kernel opens it before /init runs
    w.add("init", 0o100755, init_script)
    w.add("bin/busybox", 0o100755, assets.busybox.read_bytes())
    for module in assets.modules:
        w.add(f"modules/{module.name}", 0o100644, module.read_bytes())
    return w.finish()


def job_script(*, repo: Path, python: str, pytest_args: Sequence[str]) -> str:
    path = ":".join(
        [str(Path(python).parent), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    )
    env = {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8", "TMPDIR": "/tmp", **GUEST_ENV}
    argv = [python, "-m", "pytest", "-p", "no:cacheprovider", *pytest_args]
    return (
        "#!/bin/sh\n"
        f"cd {shlex.quote(str(repo))} || exit 90\n"
        "exec env -i "
        + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        + " "
        + " ".join(shlex.quote(a) for a in argv)
        + "\n"
    )


def qemu_command(
    assets: Assets, *, initrd: Path, results: Path, scratch: Path, console: Path
) -> list[str]:
    cmd = [str(assets.qemu), "-machine", "q35"]
    if assets.bios is not None:
        cmd += ["-bios", str(assets.bios)]
    # TCG by default: it runs anywhere, including hosts whose /dev/kvm cannot run a stock
    # kernel (nested PVM here). TRIO_JOBS_VM_ACCEL=kvm is for machines with a working KVM.
    if os.environ.get("TRIO_JOBS_VM_ACCEL") == "kvm":
        cmd += ["-accel", "kvm", "-cpu", "host"]
    else:
        cmd += ["-accel", "tcg,thread=multi", "-cpu", "max"]
    return [
        *cmd,
        "-m", "1024", "-smp", "2",
        "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{console}",
        "-kernel", str(assets.vmlinux), "-initrd", str(initrd),
        "-append", "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={results},mount_tag=results,security_model=none,multidevs=remap",
        "-drive", f"file={scratch},if=virtio,format=raw",
    ]  # fmt: skip


def run_guest_pytest(
    assets: Assets,
    pytest_args: Sequence[str],
    *,
    repo: Path = REPO,
    python: str = sys.executable,
    timeout: float = DEFAULT_TIMEOUT,
    lock: Path | None = None,
) -> GuestRun:
    """Boot the VM, run `python -m pytest ARGS` in `repo` inside it, power off, report.

    With `lock`, waits for an flock on it first (see `run_lock`); the timeout starts after.
    """
    with exclusive(lock) if lock is not None else contextlib.nullcontext():
        return _run(assets, pytest_args, repo=repo, python=python, timeout=timeout)


def _run(
    assets: Assets, pytest_args: Sequence[str], *, repo: Path, python: str, timeout: float
) -> GuestRun:
    keep = os.environ.get("TRIO_JOBS_VM_KEEP") == "1"  # keep the run directory for debugging
    tmp = Path(tempfile.mkdtemp(prefix="trio-jobs-vm-"))
    try:
        results = tmp / "results"
        results.mkdir()
        initrd = tmp / "initramfs.cpio"
        initrd.write_bytes(build_initramfs(assets, INIT_SCRIPT.read_bytes()))
        scratch = tmp / "scratch.img"
        with scratch.open("wb") as f:
            f.truncate(SCRATCH_BYTES)  # sparse: costs no disk until written
        console = tmp / "console.log"
        junit_arg = f"--junitxml={GUEST_RESULTS}/junit.xml"
        (results / "job.sh").write_text(
            job_script(repo=repo, python=python, pytest_args=[*pytest_args, junit_arg])
        )
        cmd = qemu_command(assets, initrd=initrd, results=results, scratch=scratch, console=console)
        failure: str | None = None
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            qemu_out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            failure = f"timed out after {timeout:g} s (qemu killed)"
            qemu_out = _stop(proc)
        except BaseException:
            _stop(proc)
            raise
        wall = time.monotonic() - start
        status_text = _read_tail(results / "status", 200).strip()
        status: int | None = None
        if status_text.isdigit():
            status = int(status_text)
        elif failure is None:
            failure = status_text or f"the guest reported no status (qemu exit {proc.returncode})"
        ready = _read_tail(results / "ready_uptime", 100).strip()
        console_text = _read_tail(console, MAX_CONSOLE)
        if qemu_out:
            console_text += "\n[qemu] " + qemu_out.decode(errors="replace")[-4096:]
        return GuestRun(
            status=status,
            failure=failure,
            output=_read_tail(results / "output.txt", MAX_OUTPUT),
            console=console_text,
            ready_seconds=float(ready) if _is_float(ready) else None,
            wall_seconds=wall,
            junit=_read_whole(results / "junit.xml", MAX_JUNIT),
        )
    finally:
        if keep:
            print(f"vm: kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    """Terminate qemu, kill it if it lingers, reap it; return what it printed."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or b""


def _read_tail(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read()
    except FileNotFoundError:
        return ""
    prefix = f"[... {size - limit} bytes cut ...]\n" if size > limit else ""
    return prefix + data.decode(errors="replace")


def _read_whole(path: Path, limit: int) -> str:
    """The file's text, or "" if it is missing or larger than ``limit`` bytes."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        return ""
    return "" if len(data) > limit else data.decode(errors="replace")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class _Cpio:
    """Writer of the cpio "newc" format the kernel unpacks as the initramfs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def add(
        self, name: str, mode: int, data: bytes = b"", *, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self._parts += [header, encoded, _pad(len(header) + len(encoded)), data, _pad(len(data))]

    def finish(self) -> bytes:
        self.add("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def main(argv: Sequence[str]) -> int:
    """CLI: `prepare` fetches what the VM needs; `run [PYTEST ARGS]` runs the guest tests."""
    if not argv or argv[0] not in ("prepare", "run"):
        print(
            "usage: PYTHONPATH=tests python -m vm prepare | run [PYTEST ARGS...]", file=sys.stderr
        )
        return 2
    try:
        if argv[0] == "prepare":
            assets = prepare()
            print(f"vm: ready (kernel {assets.kernel_release}, qemu {assets.qemu})")
            return 0
        run = run_guest_pytest(
            locate(),
            list(argv[1:]) or default_pytest_args(),
            timeout=default_timeout(),
            lock=run_lock(),
        )
    except VMUnavailable as exc:
        print(f"vm: unavailable: {exc}", file=sys.stderr)
        return 3
    except (VMError, OSError) as exc:
        print(f"vm: {exc}", file=sys.stderr)
        return 1
    print(run.report() if not run.ok else run.output)
    ready = "?" if run.ready_seconds is None else f"{run.ready_seconds:.1f}"
    print(f"vm: guest ready after {ready} s; {run.wall_seconds:.1f} s in all", file=sys.stderr)
    return run.status if run.status is not None else 1
