"""What the cgroup v2 VM needs from the host, obtained once and cached outside the repository.

- `qemu-system-x86_64` (Debian package `qemu-system-x86`, installed with apt when we are root);
- a Debian 6.1 kernel (`linux-image-6.1.0-N-amd64`, the newest apt lists): its bzImage is
  unpacked to the ELF `vmlinux` so qemu boots it directly through PVH (no real-mode setup, no
  decompression under TCG: about twice as fast to the guest's first command as bzImage);
- the modules the guest needs (Debian builds virtio, 9p, overlayfs and ext4 as modules), in
  load order, found from each module's own `depends=` so no depmod is needed;
- a static busybox for the initramfs.

`prepare()` may use the network and apt (the `./dev test` step calls it); `locate()` never does
and raises `VMUnavailable` with the reason, which the VM test reports as its skip reason.
The cache is `$TRIO_JOBS_VM_CACHE`, else `${XDG_CACHE_HOME:-~/.cache}/trio-jobs/vm`; it holds
`assets.json` (written last, atomically) and the files it names. Concurrent `prepare()` calls
(teammates running the test command at once) serialise on an flock.
"""

from __future__ import annotations

import fcntl
import json
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

KERNEL_PACKAGE_RE: Final = re.compile(r"^linux-image-(6\.1\.0-(\d+)-amd64)$")
# Leaves only; their dependencies come from the modules' modinfo. crc32c_generic is not a
# declared dependency of ext4, but ext4 asks for the "crc32c" algorithm at mount time (and
# there is no modprobe in the guest to load it on demand).
WANTED_MODULES: Final = (
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "virtio_blk",
    "overlay",
    "crc32c_generic",
    "ext4",
)
QBOOT: Final = Path("/usr/share/qemu/qboot.rom")
XZ_MAGIC: Final = b"\xfd7zXZ\x00"
MANIFEST: Final = "assets.json"


class VMError(Exception):
    """Base of the VM harness's errors."""


class VMUnavailable(VMError):
    """This host cannot obtain or run the VM; the message says why and what to do."""


@dataclass(frozen=True, kw_only=True)
class Assets:
    qemu: Path
    bios: Path | None  # qboot when installed (fastest); None = qemu's default SeaBIOS
    vmlinux: Path
    busybox: Path
    modules: tuple[Path, ...]  # in load order
    kernel_release: str


def default_cache_dir() -> Path:
    if explicit := os.environ.get("TRIO_JOBS_VM_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trio-jobs" / "vm"


def locate(cache_dir: Path | None = None) -> Assets:
    """The cached assets, without network or apt; raises `VMUnavailable` with the reason."""
    cache_dir = cache_dir or default_cache_dir()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VMUnavailable(
            "qemu-system-x86_64 is not installed (apt-get install --no-install-recommends "
            "qemu-system-x86; `./dev test` does this when run as root)"
        )
    check_qemu(Path(qemu))
    manifest = cache_dir / MANIFEST
    try:
        data = json.loads(manifest.read_text())
        assets = Assets(
            qemu=Path(qemu),
            bios=QBOOT if QBOOT.is_file() else None,
            vmlinux=cache_dir / data["vmlinux"],
            busybox=cache_dir / data["busybox"],
            modules=tuple(cache_dir / m for m in data["modules"]),
            kernel_release=str(data["kernel_release"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VMUnavailable(
            f"no VM kernel in {cache_dir} ({exc.__class__.__name__}: {exc}); "
            "fetch it with `PYTHONPATH=tests python -m vm prepare` (needs apt-get)"
        ) from exc
    missing = [p for p in (assets.vmlinux, assets.busybox, *assets.modules) if not p.is_file()]
    if missing:
        raise VMUnavailable(
            f"VM cache {cache_dir} is incomplete (missing {missing[0]}); re-run prepare"
        )
    return assets


def check_qemu(qemu: Path) -> None:
    """Raise `VMUnavailable` unless this qemu can emulate (TCG) and share files over 9p."""
    for option, needle, what in (
        ("-accel", "tcg", "TCG emulation"),
        ("-device", "virtio-9p-pci", "9p file sharing (virtfs)"),
    ):
        try:
            proc = subprocess.run(
                [str(qemu), option, "help"], capture_output=True, text=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VMUnavailable(f"{qemu} cannot run: {exc}") from exc
        if proc.returncode != 0 or needle not in proc.stdout:
            raise VMUnavailable(f"{qemu} has no {what} ({option} help lists no {needle})")


def prepare(
    cache_dir: Path | None = None, *, install: bool = True, log: Callable[[str], None] = print
) -> Assets:
    """Install qemu (root + apt only) and fetch the kernel and busybox into the cache.

    Does nothing when everything is already there, so it is cheap and offline on later runs.
    """
    cache_dir = cache_dir or default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(cache_dir / ".lock"):
        is_root = os.geteuid() == 0
        have_apt = shutil.which("apt-get") is not None
        updated = False
        if shutil.which("qemu-system-x86_64") is None and install and is_root and have_apt:
            log("vm: installing qemu-system-x86")
            _run(["apt-get", "update", "-qq"])
            updated = True
            _run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-system-x86"],
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            )
        try:
            return locate(cache_dir)
        except VMUnavailable:
            if shutil.which("qemu-system-x86_64") is None:
                raise
        if not have_apt or shutil.which("dpkg-deb") is None:
            raise VMUnavailable("no apt-get/dpkg-deb on this host to fetch the VM kernel")
        if is_root and not updated:
            _run(["apt-get", "update", "-qq"])
        release = newest_kernel_release()
        log(f"vm: fetching linux-image-{release} and busybox-static into {cache_dir}")
        _fetch(cache_dir, release)
        return locate(cache_dir)


def newest_kernel_release() -> str:
    out = _run(["apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-amd64$"])
    found: list[tuple[int, str]] = []
    for line in out.splitlines():
        m = KERNEL_PACKAGE_RE.match(line.split(" ", 1)[0])
        if m:
            found.append((int(m.group(2)), m.group(1)))
    if not found:
        raise VMUnavailable("apt-cache lists no linux-image-6.1.0-N-amd64 (run apt-get update)")
    return max(found)[1]


def _fetch(cache_dir: Path, release: str) -> None:
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix="fetch-") as tmp_name:
        tmp = Path(tmp_name)
        cmd = ["apt-get", "download", "-q", f"linux-image-{release}", "busybox-static"]
        if os.geteuid() == 0:  # _apt cannot write into root's cache: download as root
            cmd[1:1] = ["-o", "APT::Sandbox::User=root"]
        _run(cmd, cwd=tmp)
        kernel_deb = next(tmp.glob("linux-image-*.deb"))
        busybox_deb = next(tmp.glob("busybox-static_*.deb"))
        _run(["dpkg-deb", "-x", str(kernel_deb), str(tmp / "kernel")])
        _run(["dpkg-deb", "-x", str(busybox_deb), str(tmp / "busybox")])
        dest = cache_dir / release
        staging = tmp / "staging"  # renamed into place when complete
        (staging / "modules").mkdir(parents=True)
        vmlinux = extract_vmlinux((tmp / "kernel" / "boot" / f"vmlinuz-{release}").read_bytes())
        (staging / "vmlinux").write_bytes(vmlinux)
        shutil.copy2(tmp / "busybox" / "bin" / "busybox", staging / "busybox")
        order = module_load_order(tmp / "kernel" / "lib" / "modules" / release, WANTED_MODULES)
        names = []
        for i, path in enumerate(order):
            name = f"{i:02d}-{path.name}"
            shutil.copy2(path, staging / "modules" / name)
            names.append(f"{release}/modules/{name}")
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
        manifest = {
            "kernel_release": release,
            "vmlinux": f"{release}/vmlinux",
            "busybox": f"{release}/busybox",
            "modules": names,
        }
        tmp_manifest = cache_dir / f"{MANIFEST}.tmp"
        tmp_manifest.write_text(json.dumps(manifest, indent=1))
        tmp_manifest.replace(cache_dir / MANIFEST)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage whose payload is xz-compressed (Debian's).

    The payload is one xz stream; the decompressor stops at its end and ignores what follows
    (the payload's size trailer and the rest of the setup image).
    """
    start = bzimage.find(XZ_MAGIC)
    while start != -1:
        decomp = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        try:
            elf = decomp.decompress(bzimage[start:])
        except lzma.LZMAError:
            elf = b""
        if decomp.eof and elf.startswith(b"\x7fELF"):
            return elf
        start = bzimage.find(XZ_MAGIC, start + 1)
    raise VMError("no xz-compressed ELF kernel found in the bzImage")


def module_depends(ko: bytes) -> list[str]:
    """The `depends=` of a module's .modinfo section (names, '-' normalised to '_')."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko)
    if m is None or not m.group(1):
        return []
    return [d.decode().replace("-", "_") for d in m.group(1).split(b",")]


def module_load_order(modules_root: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Paths of `wanted` and their dependencies, each after everything it depends on."""
    by_name = {p.name[:-3].replace("-", "_"): p for p in modules_root.rglob("*.ko")}
    order: list[Path] = []
    state: dict[str, str] = {}

    def visit(name: str) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise VMError(f"module dependency cycle at {name}")
        if name not in by_name:
            raise VMError(f"kernel module {name} not found under {modules_root}")
        state[name] = "visiting"
        for dep in module_depends(by_name[name].read_bytes()):
            visit(dep)
        state[name] = "done"
        order.append(by_name[name])

    for name in wanted:
        visit(name)
    return order


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an flock on `path` (created if missing); the kernel drops it if we die."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VMUnavailable(f"{' '.join(cmd)}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise VMUnavailable(f"{' '.join(cmd)} failed ({proc.returncode}): {' | '.join(tail)}")
    return proc.stdout
