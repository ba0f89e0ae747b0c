"""The cgroup tests on a cgroup v2 kernel: boots the QEMU VM of tests/vm and runs them inside.

This host is hybrid (controllers on cgroup v1), so the v2 driver can only be proven in a VM.
The guest runs `pytest -m cgroups tests/vm/test_guest_smoke.py tests/cgroups` as root (or
`$TRIO_JOBS_VM_PYTEST_ARGS`); this test fails with the guest's output when they fail, and is
skipped with the reason when qemu or the kernel is not available (`./dev test` fetches them
when it runs as root with apt; see docs/testing-vm.md).
"""

from __future__ import annotations

import os

import pytest
from vm.assets import VMUnavailable, locate
from vm.harness import default_pytest_args, default_timeout, run_guest_pytest, run_lock

pytestmark = [pytest.mark.slow, pytest.mark.cgroups]


def test_cgroup_tests_pass_in_cgroup_v2_vm(capsys: pytest.CaptureFixture[str]) -> None:
    if os.environ.get("TRIO_JOBS_IN_VM") == "1":
        pytest.skip("already inside the cgroup v2 VM")
    if os.environ.get("TRIO_JOBS_VM") == "0":
        pytest.skip("the cgroup v2 VM is turned off (TRIO_JOBS_VM=0)")
    try:
        assets = locate()
    except VMUnavailable as exc:
        pytest.skip(f"cgroup v2 VM unavailable: {exc}")
    run = run_guest_pytest(
        assets, default_pytest_args(), timeout=default_timeout(), lock=run_lock()
    )
    if not run.ok:
        pytest.fail(run.report(), pytrace=False)
    # The guest must really have run tests: pytest's summary line says how many passed.
    assert " passed" in run.output, run.report()
    with capsys.disabled():
        ready = "?" if run.ready_seconds is None else f"{run.ready_seconds:.1f}"
        summary = run.output.strip().splitlines()[-1] if run.output.strip() else ""
        print(
            f"\n[cgroup v2 VM] {summary.strip('= ')}; guest ready after {ready} s, "
            f"{run.wall_seconds:.1f} s in all"
        )
