"""Host-side tests of the VM harness's parts that need no VM: kernel unpacking, module order,
the initramfs, the guest job script, and how a run that goes wrong is reported (with a fake
qemu: a real process that behaves like a guest that failed, or one that hangs)."""

from __future__ import annotations

import fcntl
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from vm.assets import Assets, VMError, exclusive, extract_vmlinux, module_depends, module_load_order
from vm.harness import (
    DEFAULT_TIMEOUT,
    GuestRun,
    build_initramfs,
    default_pytest_args,
    default_timeout,
    job_script,
    main,
    parse_junit,
    qemu_command,
    run_guest_pytest,
    run_lock,
)


def test_extract_vmlinux_skips_decoy_magic_and_stops_at_stream_end() -> None:
    elf = b"\x7fELF" + bytes(range(256)) * 64
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ)
    bzimage = b"setup" + b"\xfd7zXZ\x00not-xz" + b"\x00" * 7 + payload + b"\x10\x20trailer"
    assert extract_vmlinux(bzimage) == elf


def test_extract_vmlinux_without_an_elf_payload_is_an_error() -> None:
    not_elf = lzma.compress(b"MZ not a kernel", format=lzma.FORMAT_XZ)
    with pytest.raises(VMError, match="no xz-compressed ELF"):
        extract_vmlinux(b"setup" + not_elf)


def _ko(path: Path, depends: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x7fELF...\x00license=GPL\x00depends=" + depends.encode() + b"\x00name=x\x00"
    )


def test_module_depends_parses_modinfo() -> None:
    assert module_depends(b"\x00depends=jbd2,mbcache,crc16\x00vermagic=6.1\x00") == [
        "jbd2",
        "mbcache",
        "crc16",
    ]
    assert module_depends(b"\x00depends=\x00") == []
    assert module_depends(b"no modinfo") == []


def test_module_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    _ko(tmp_path / "fs" / "top.ko", "mid-dash,base")
    _ko(tmp_path / "lib" / "mid_dash.ko", "base")
    _ko(tmp_path / "base.ko", "")
    _ko(tmp_path / "other.ko", "base")
    order = [p.name for p in module_load_order(tmp_path, ("top", "other"))]
    assert order == ["base.ko", "mid_dash.ko", "top.ko", "other.ko"]


def test_module_load_order_reports_missing_and_cycles(tmp_path: Path) -> None:
    _ko(tmp_path / "a.ko", "b")
    _ko(tmp_path / "b.ko", "a")
    _ko(tmp_path / "c.ko", "nowhere")
    with pytest.raises(VMError, match="cycle"):
        module_load_order(tmp_path, ("a",))
    with pytest.raises(VMError, match="nowhere not found"):
        module_load_order(tmp_path, ("c",))


def _fake_assets(tmp_path: Path, qemu: Path | None = None) -> Assets:
    (tmp_path / "busybox").write_bytes(b"busybox-binary")
    (tmp_path / "01-virtio.ko").write_bytes(b"module-one")
    (tmp_path / "02-9p.ko").write_bytes(b"module-two-" * 3)
    (tmp_path / "vmlinux").write_bytes(b"\x7fELF")
    return Assets(
        qemu=qemu or Path("/nonexistent/qemu"),
        bios=None,
        vmlinux=tmp_path / "vmlinux",
        busybox=tmp_path / "busybox",
        modules=(tmp_path / "01-virtio.ko", tmp_path / "02-9p.ko"),
        kernel_release="test",
    )


def test_initramfs_is_a_cpio_archive_cpio_can_read(tmp_path: Path) -> None:
    cpio = shutil.which("cpio")
    cmd = [cpio] if cpio else None
    if cmd is None:
        try:
            from vm.assets import locate

            cmd = [str(locate().busybox), "cpio"]
        except VMError:
            pytest.skip("no cpio tool here (neither cpio nor the VM's busybox)")
    archive = build_initramfs(_fake_assets(tmp_path), b"#!/bin/busybox sh\necho hi\n")
    assert len(archive) % 4 == 0
    listing = subprocess.run([*cmd, "-t"], input=archive, capture_output=True, check=True)
    names = listing.stdout.decode().split()
    assert names == [
        "bin",
        "dev",
        "proc",
        "sys",
        "modules",
        "dev/console",
        "init",
        "bin/busybox",
        "modules/01-virtio.ko",
        "modules/02-9p.ko",
    ]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(
        [*cmd, "-i", "-d", "init", "modules/02-9p.ko"], input=archive, cwd=out, check=True
    )
    assert (out / "init").read_bytes() == b"#!/bin/busybox sh\necho hi\n"
    assert (out / "init").stat().st_mode & 0o777 == 0o755
    assert (out / "modules" / "02-9p.ko").read_bytes() == b"module-two-" * 3


def test_job_script_passes_arguments_and_environment_exactly(tmp_path: Path) -> None:
    fake_python = tmp_path / "bin dir" / "python"
    fake_python.parent.mkdir()
    fake_python.write_text('#!/bin/sh\nprintf "%s\\0" "$PWD" "$@"\nenv\n')
    fake_python.chmod(0o755)
    repo = tmp_path / "repo with 'quotes'"
    repo.mkdir()
    args = ["-m", "cgroups", "it's a $HOME `x`", "a\nb", "tests/cgroups"]
    script = job_script(repo=repo, python=str(fake_python), pytest_args=args)
    out = subprocess.run(
        ["/bin/sh", "-c", script], capture_output=True, check=True, env={"LEAK": "no"}
    ).stdout
    *argv, env_text = out.split(b"\0")
    assert [a.decode() for a in argv] == [
        str(repo),
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        *args,
    ]
    env = dict(line.split("=", 1) for line in env_text.decode().splitlines())
    assert env["PATH"].startswith(f"{fake_python.parent}:")
    assert env["TRIO_JOBS_IN_VM"] == "1"
    assert env["TRIO_JOBS_TEST_BLOCKDEV"] == "/dev/vda"
    assert env["TRIO_JOBS_TEST_BLOCKDEV_DIR"] == "/mnt/scratch"
    assert "LEAK" not in env


def test_default_pytest_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIO_JOBS_VM_PYTEST_ARGS", raising=False)
    assert default_pytest_args(tmp_path) == ["-m", "cgroups", "tests/vm/test_guest_smoke.py"]
    (tmp_path / "tests" / "cgroups").mkdir(parents=True)
    assert default_pytest_args(tmp_path)[-1] == "tests/cgroups"
    monkeypatch.setenv("TRIO_JOBS_VM_PYTEST_ARGS", "-k 'a or b' tests/x")
    assert default_pytest_args(tmp_path) == ["-k", "a or b", "tests/x"]


def _fake_qemu(tmp_path: Path, body: str) -> Path:
    """A stand-in for qemu: finds the results share in its arguments, then runs `body`."""
    script = tmp_path / "fake-qemu"
    script.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case "$a" in local,path=*,mount_tag=results,*)'
        " R=${a#local,path=}; R=${R%%,*};; esac; done\n" + body
    )
    script.chmod(0o755)
    return script


def test_guest_status_and_output_come_back(tmp_path: Path) -> None:
    qemu = _fake_qemu(
        tmp_path,
        'grep -q "pytest" "$R/job.sh" || exit 9\n'
        'echo 1.25 > "$R/ready_uptime"; echo "1 failed" > "$R/output.txt"; echo 1 > "$R/status"\n',
    )
    run = run_guest_pytest(_fake_assets(tmp_path, qemu), ["-q"], timeout=60)
    assert (run.status, run.failure, run.ok) == (1, None, False)
    assert run.ready_seconds == 1.25
    assert "1 failed" in run.report()


def test_guest_junit_report_comes_back(tmp_path: Path) -> None:
    """The guest pytest is told to write its junit report into the results share (the
    guest's /mnt/vm-results), and the host gets it back with the run."""
    qemu = _fake_qemu(
        tmp_path,
        'grep -q -- "--junitxml=/mnt/vm-results/junit.xml" "$R/job.sh" || exit 9\n'
        'echo "<testsuites/>" > "$R/junit.xml"; echo 0 > "$R/status"\n',
    )
    run = run_guest_pytest(_fake_assets(tmp_path, qemu), ["-q"], timeout=60)
    assert (run.status, run.failure) == (0, None)
    assert run.junit.strip() == "<testsuites/>"


def test_parse_junit_keeps_each_tests_worst_outcome() -> None:
    tests = parse_junit(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a" name="test_ok"/>'
        '<testcase classname="tests.a" name="test_skip"><skipped message="why"/></testcase>'
        '<testcase classname="tests.a" name="test_bad"><failure message="boom"/></testcase>'
        '<testcase classname="tests.a" name="test_td"/>'
        '<testcase classname="tests.a" name="test_td"><error message="teardown"/></testcase>'
        "</testsuite></testsuites>"
    )
    got = {k: (t.outcome, t.message) for k, t in tests.items()}
    assert got == {
        "tests.a::test_ok": ("passed", ""),
        "tests.a::test_skip": ("skipped", "why"),
        "tests.a::test_bad": ("failed", "boom"),
        "tests.a::test_td": ("error", "teardown"),
    }
    with pytest.raises(ValueError, match="not a junit report"):
        parse_junit("")


def test_init_failure_is_reported(tmp_path: Path) -> None:
    qemu = _fake_qemu(tmp_path, 'echo "init: cannot mount cgroup2" > "$R/status"\n')
    run = run_guest_pytest(_fake_assets(tmp_path, qemu), ["-q"], timeout=60)
    assert run.status is None
    assert run.failure == "init: cannot mount cgroup2"


def test_crashed_qemu_is_reported(tmp_path: Path) -> None:
    qemu = _fake_qemu(tmp_path, "echo 'qemu: could not load kernel' >&2; exit 1\n")
    run = run_guest_pytest(_fake_assets(tmp_path, qemu), ["-q"], timeout=60)
    assert run.status is None
    assert run.failure is not None
    assert "qemu exit 1" in run.failure
    assert "could not load kernel" in run.console


def test_hung_guest_is_killed_at_the_timeout(tmp_path: Path) -> None:
    qemu = _fake_qemu(tmp_path, "exec sleep 600\n")
    run = run_guest_pytest(_fake_assets(tmp_path, qemu), ["-q"], timeout=0.5)
    assert run.status is None
    assert run.failure == "timed out after 0.5 s (qemu killed)"
    assert run.wall_seconds < 30


def test_guest_run_report_says_why() -> None:
    run = GuestRun(
        status=None, failure="timed out", output="OUT", console="CON", ready_seconds=None,
        wall_seconds=3.0,
    )  # fmt: skip
    assert not run.ok
    text = run.report()
    assert "timed out" in text
    assert "OUT" in text
    assert "CON" in text


def test_qemu_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = _fake_assets(tmp_path)
    paths = {k: tmp_path / k for k in ("initrd", "results", "scratch", "console")}
    monkeypatch.delenv("TRIO_JOBS_VM_ACCEL", raising=False)
    cmd = qemu_command(assets, **paths)
    assert cmd[cmd.index("-accel") + 1] == "tcg,thread=multi"
    shares = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-virtfs"]
    assert shares[0].startswith("local,path=/,mount_tag=hostroot,")
    assert "readonly=on" in shares[0].split(",")
    assert shares[1].startswith(f"local,path={paths['results']},mount_tag=results,")
    assert "readonly=on" not in shares[1].split(",")
    assert f"file={paths['scratch']},if=virtio,format=raw" in cmd
    assert "-no-reboot" in cmd
    monkeypatch.setenv("TRIO_JOBS_VM_ACCEL", "kvm")
    cmd = qemu_command(assets, **paths)
    assert cmd[cmd.index("-accel") + 1] == "kvm"


def test_default_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIO_JOBS_VM_TIMEOUT", raising=False)
    assert default_timeout() == DEFAULT_TIMEOUT
    monkeypatch.setenv("TRIO_JOBS_VM_TIMEOUT", "90.5")
    assert default_timeout() == 90.5
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv("TRIO_JOBS_VM_TIMEOUT", bad)
        with pytest.raises(VMError, match="TRIO_JOBS_VM_TIMEOUT"):
            default_timeout()


def test_vm_runs_queue_on_the_run_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRIO_JOBS_VM_CACHE", str(tmp_path / "cache"))
    lock = run_lock()
    assert lock == tmp_path / "cache" / "run.lock"
    with exclusive(lock), lock.open("a") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with lock.open("a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on exit


def test_cli_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
    assert main(["bogus"]) == 2
