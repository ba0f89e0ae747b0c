"""contrib/systemd/trio-jobs.service on a real systemd (PID 1) in the cgroup v2 VM.

Boots the VM of tests/vm with systemd as init (tests/operations/vm_systemd.py says how and
what the check does: start, jobs in the delegated subtree, an OOM-killed job, a rotated
certificate and ``systemctl reload``, ``systemctl stop`` leaving no job process or cgroup).
About 4-5 minutes under TCG on a 2-core host. Skipped with the reason where the VM or
systemd is not available, and inside the VM itself.
"""

from __future__ import annotations

import os

import pytest
from vm.assets import VMUnavailable, exclusive, locate
from vm.harness import run_lock

from operations.vm_systemd import SYSTEMD, run_systemd_check

pytestmark = [pytest.mark.slow, pytest.mark.cgroups]


def test_unit_runs_under_systemd_in_cgroup_v2_vm(capsys: pytest.CaptureFixture[str]) -> None:
    if os.environ.get("TRIO_JOBS_IN_VM") == "1":
        pytest.skip("already inside the cgroup v2 VM")
    if os.environ.get("TRIO_JOBS_VM") == "0":
        pytest.skip("the cgroup v2 VM is turned off (TRIO_JOBS_VM=0)")
    if not SYSTEMD.is_file():
        pytest.skip(f"{SYSTEMD} is missing: the guest boots the host's systemd (apt-get install systemd)")
    try:
        assets = locate()
    except VMUnavailable as exc:
        pytest.skip(f"cgroup v2 VM unavailable: {exc}")
    lock = run_lock()
    if lock is None:
        run = run_systemd_check(assets)
    else:
        with exclusive(lock):
            run = run_systemd_check(assets)
    if not run.ok:
        pytest.fail(run.report(), pytrace=False)
    assert "== ALL OK" in run.output, run.report()
    timings = [ln.strip() for ln in run.output.splitlines() if ln.startswith(("started in", "stopped in"))]
    with capsys.disabled():
        print(f"\n[systemd VM] unit checked under systemd as PID 1 in {run.wall_seconds:.0f} s; {', '.join(timings)}")
