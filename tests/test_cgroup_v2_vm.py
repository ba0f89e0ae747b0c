"""The cgroup tests on a cgroup v2 kernel: boots the QEMU VM of tests/vm and runs them inside.

This host is hybrid (controllers on cgroup v1), so the v2 driver can only be proven in a VM.
The guest runs `pytest -m cgroups tests/vm/test_guest_smoke.py tests/cgroups` as root (or
`$TRIO_JOBS_VM_PYTEST_ARGS`); this test fails with the guest's output when they fail, and is
skipped with the reason when qemu or the kernel is not available (`./dev test` fetches them
when it runs as root with apt; see docs/testing-vm.md).

A guest whose tests all skip would exit 0 too, so the guest's junit report is read back and
checked: with the default selection every VM smoke test and each test in `REQUIRED` passed,
at least `MIN_PASSED` passed in all, and a test skipped only for a reason in `ALLOWED_SKIPS`.
One of those reasons is itself evidence: the controller-less variant of the mechanics tests
skips because "the detected driver is already v2", which the fixture only says of a
V2Driver, so every such variant must have skipped for it. With `$TRIO_JOBS_VM_PYTEST_ARGS`
(a selection of one's own) only "something passed, nothing failed" is required.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from typing import TYPE_CHECKING, Final

import pytest
from vm.assets import VMUnavailable, locate
from vm.harness import (
    GuestRun,
    default_pytest_args,
    default_timeout,
    parse_junit,
    run_guest_pytest,
    run_lock,
)

if TYPE_CHECKING:
    from vm.harness import GuestTest

SMOKE: Final = "tests.vm.test_guest_smoke::"
SMOKE_TESTS: Final = 5  # every test of tests/vm/test_guest_smoke.py
# The v2 driver's limits and mechanics, each proven only in the guest: they must have run.
REQUIRED: Final = (
    "tests.cgroups.test_limits::test_memory_limit_oom_kills[True]",
    "tests.cgroups.test_limits::test_memory_limit_oom_kills[False]",
    "tests.cgroups.test_limits::test_pids_limit_contains_a_fork_loop",
    "tests.cgroups.test_limits::test_limits_are_written_as_asked",
    "tests.cgroups.test_mechanics::test_forking_job_has_every_descendant_inside[detected]",
    "tests.cgroups.test_mechanics::test_kill_leaves_no_descendant_incl_setsid_and_double_fork[detected]",
    "tests.cgroups.test_mechanics::test_wait_empty_returns_when_the_job_exits_by_itself[detected]",
    "tests.cgroups.test_groups::test_two_jobs_of_a_group_together_stop_at_the_group_pids_max",
    "tests.cgroups.test_groups::test_group_memory_limit_oom_kills_one_of_two_jobs",
    "tests.cgroups.test_worker_cgroups::test_memory_job_is_oom_killed_only_under_the_limit[True]",
    "tests.cgroups.test_worker_cgroups::test_stop_leaves_no_descendant_alive",
)
# Skips the guest may report (substrings of the reason): the controller-less v2 variant,
# which the guest's detected driver already is; a CPU-share test when a loaded host gives the
# VM too little CPU to measure a share.
V2_DETECTED: Final = "the detected driver is already v2"
CONTROLLERLESS: Final = "[cgroup2-without-controllers]"
ALLOWED_SKIPS: Final = (V2_DETECTED, "the host gave only")
MIN_PASSED: Final = 38  # 40 passed in the guest here (5 smoke, 35 cgroup), less 2 CPU-share tests


def _summary(tests: dict[str, GuestTest]) -> str:
    counts = Counter(t.outcome for t in tests.values())
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))


def check_guest_tests(run: GuestRun, *, default_selection: bool) -> list[str]:
    """What is wrong with the guest's report (nothing: an empty list)."""
    try:
        tests = parse_junit(run.junit)
    except ValueError as exc:
        return [f"no usable junit report from the guest ({exc})"]
    passed = [k for k, t in tests.items() if t.outcome == "passed"]
    problems = [
        f"{k}: {t.outcome} {t.message}"
        for k, t in tests.items()
        if t.outcome in ("failed", "error")
    ]
    if not passed:
        problems.append("no guest test passed")
    if not default_selection:
        return problems
    smoke = [k for k in tests if k.startswith(SMOKE)]
    problems += [
        f"{k}: {tests[k].outcome} (a VM smoke test must pass)" for k in smoke if k not in passed
    ]
    if len(smoke) != SMOKE_TESTS:
        problems.append(f"{len(smoke)} VM smoke tests ran, expected {SMOKE_TESTS}")
    problems += [
        f"{k}: {tests[k].outcome} {tests[k].message}" if k in tests else f"{k}: did not run"
        for k in REQUIRED
        if k not in passed
    ]
    skipped = {k: t.message for k, t in tests.items() if t.outcome == "skipped"}
    problems += [
        f"{k}: skipped for a reason not allowed in the VM: {why}"
        for k, why in skipped.items()
        if not any(allowed in why for allowed in ALLOWED_SKIPS)
    ]
    variants = [k for k in tests if k.endswith(CONTROLLERLESS)]
    if not variants:
        problems.append(f"no {CONTROLLERLESS} test: nothing shows that the guest detected v2")
    problems += [
        f"{k}: {tests[k].outcome} {tests[k].message} (the guest's detected driver is not v2?)"
        for k in variants
        if V2_DETECTED not in skipped.get(k, "")
    ]
    if len(passed) < MIN_PASSED:
        problems.append(f"only {len(passed)} guest tests passed (>= {MIN_PASSED})")
    return problems


@pytest.mark.slow
@pytest.mark.cgroups
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
    default_selection = not os.environ.get("TRIO_JOBS_VM_PYTEST_ARGS")
    problems = check_guest_tests(run, default_selection=default_selection)
    if problems:
        listed = "\n".join(f"- {p}" for p in problems)
        pytest.fail(
            f"the guest's tests did not prove the v2 driver:\n{listed}\n{run.report()}",
            pytrace=False,
        )
    with capsys.disabled():
        ready = "?" if run.ready_seconds is None else f"{run.ready_seconds:.1f}"
        print(
            f"\n[cgroup v2 VM] {_summary(parse_junit(run.junit))}; guest ready after {ready} s, "
            f"{run.wall_seconds:.1f} s in all"
        )


# -- the check of the guest's report (no VM) ------------------------------------------------


def _junit(cases: dict[str, str]) -> str:
    """A junit report of ``{"module::name": "passed" | "skipped:why" | "failed:why"}``."""
    rows = []
    for key, outcome in cases.items():
        classname, name = key.split("::")
        kind, _, why = outcome.partition(":")
        inner = {
            "passed": "",
            "skipped": f'<skipped message="{why}"/>',
            "failed": f'<failure message="{why}"/>',
        }[kind]
        rows.append(
            f'<testcase classname="{classname}" name="{name}" time="0.1">{inner}</testcase>'
        )
    return f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{"".join(rows)}</testsuite></testsuites>'


def _guest(cases: dict[str, str]) -> GuestRun:
    return GuestRun(
        status=0, failure=None, output="", console="", ready_seconds=1.0, wall_seconds=2.0,
        junit=_junit(cases),
    )  # fmt: skip


def _full_report() -> dict[str, str]:
    cases = {f"{SMOKE}test_smoke_{i}": "passed" for i in range(SMOKE_TESTS)}
    cases.update(dict.fromkeys(REQUIRED, "passed"))
    for i in range(MIN_PASSED - len(cases)):
        cases[f"tests.cgroups.test_more::test_{i}"] = "passed"
    cases[f"tests.cgroups.test_mechanics::test_x{CONTROLLERLESS}"] = (
        f"skipped:{V2_DETECTED} (covered)"
    )
    cases["tests.cgroups.test_limits::test_cpu_limit_half_a_cpu"] = (
        "skipped:the host gave only 0.9 CPU-s"
    )
    return cases


def test_a_full_guest_report_passes_the_check() -> None:
    assert check_guest_tests(_guest(_full_report()), default_selection=True) == []


def test_a_guest_whose_tests_all_skipped_fails_the_check() -> None:
    """The hole this check closes: pytest exits 0 and prints "skipped" when nothing ran."""
    skipped = dict.fromkeys(_full_report(), "skipped:no cgroup2 mount on this host")
    problems = check_guest_tests(_guest(skipped), default_selection=True)
    assert "no guest test passed" in problems
    assert any(p.startswith(REQUIRED[0]) for p in problems), problems
    assert any("VM smoke test must pass" in p for p in problems), problems
    assert any("detected driver is not v2" in p for p in problems), problems
    assert any(p.startswith("only 0 guest tests passed") for p in problems), problems
    # with a selection of one's own, passing something is all that is asked
    assert check_guest_tests(_guest(skipped), default_selection=False) == ["no guest test passed"]


def test_each_hole_in_a_guest_report_is_named() -> None:
    for change, expected in [
        ({REQUIRED[3]: "skipped:the host gave only 0.5 CPU-s"}, f"{REQUIRED[3]}: skipped"),
        ({REQUIRED[1]: "failed:boom"}, f"{REQUIRED[1]}: failed boom"),
        ({"tests.cgroups.test_more::test_0": "skipped:no block device"}, "not allowed in the VM"),
        ({f"{SMOKE}test_smoke_0": "skipped:not in the VM"}, "a VM smoke test must pass"),
        ({f"tests.cgroups.test_mechanics::test_x{CONTROLLERLESS}": "passed"}, "is not v2?"),
    ]:
        cases = {**_full_report(), **change}
        problems = check_guest_tests(_guest(cases), default_selection=True)
        assert any(expected in p for p in problems), (change, problems)
    cases = _full_report()
    del cases[REQUIRED[0]]
    assert f"{REQUIRED[0]}: did not run" in check_guest_tests(_guest(cases), default_selection=True)
    for junit in ("", "<oops"):  # none written (a crashed guest pytest), or cut short
        run = dataclasses.replace(_guest({}), junit=junit)
        problems = check_guest_tests(run, default_selection=False)
        assert problems[0].startswith("no usable junit report"), problems
