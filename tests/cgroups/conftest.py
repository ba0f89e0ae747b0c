"""Fixtures: the host's cgroup driver, under a parent cgroup made (and removed) per test.

Each test is written once and runs on whatever driver detection picks: v1 on the hybrid
build hosts, v2 in the cgroup v2 VM (tests/vm). ``mechanics_driver`` adds, on hybrid hosts,
a v2 driver on the controller-less cgroup2 mount: no limits there, but placement, kill,
``cgroup.events`` waiting and removal are the real v2 code paths.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from trio_jobs.worker.cgroups._layout import parse_mountinfo, parse_proc_cgroup, resolve_parent
from trio_jobs.worker.cgroups.base import CgroupError
from trio_jobs.worker.cgroups.detect import detect_driver
from trio_jobs.worker.cgroups.v1 import V1Driver
from trio_jobs.worker.cgroups.v2 import V2Driver

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

Driver = V1Driver | V2Driver


def _test_parent() -> str:
    return f"trio-jobs-test-{uuid.uuid4().hex[:12]}"


def _detected(parent: str) -> Driver:
    try:
        driver = detect_driver(parent=parent, require=True)
    except CgroupError as exc:
        pytest.skip(f"this host offers no usable cgroups: {exc}")
    assert isinstance(driver, V1Driver | V2Driver)
    return driver


def _controllerless_v2(parent: str) -> V2Driver:
    """A v2 driver on a hybrid host's cgroup2 mount (which has no controllers)."""
    mounts = [
        m
        for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text())
        if m.fstype == "cgroup2"
    ]
    own = parse_proc_cgroup(Path("/proc/self/cgroup").read_text()).get("")
    if not mounts or own is None:
        pytest.skip("no cgroup2 mount on this host")
    mount = mounts[-1]
    own_dir = mount.dir_of(own)
    parent_cg = resolve_parent(own, parent)
    parent_dir = mount.dir_of(parent_cg)
    if own_dir is None or parent_dir is None or not os.access(own_dir, os.W_OK):
        pytest.skip(f"cannot create cgroups under {mount.mount_point}")
    return V2Driver(
        mount_dir=mount.mount_point,
        own_dir=own_dir,
        parent_dir=parent_dir,
        parent_cgroup=parent_cg,
        controllers=frozenset(),
        is_root=own == "/",
        reason="test: controller-less cgroup2",
    )


async def _cleanup(driver: Driver) -> None:
    with trio.move_on_after(30) as scope:
        scope.shield = True
        await driver.prepare()  # kills and removes whatever job cgroups the test left
        await driver.remove_parent()


# Detection (and any skip) happens in sync fixtures, so a skip reason reaches the report;
# the async fixtures only prepare and clean up.
@pytest.fixture
def detected_driver() -> Driver:
    return _detected(_test_parent())


@pytest.fixture
async def driver(detected_driver: Driver) -> AsyncIterator[Driver]:
    await detected_driver.prepare()
    try:
        yield detected_driver
    finally:
        await _cleanup(detected_driver)


@pytest.fixture(params=["detected", "cgroup2-without-controllers"])
def mechanics_factory(request: pytest.FixtureRequest) -> Callable[[], Driver]:
    """Makes drivers over one test parent: each call is a new driver instance (a new key
    for its opaque names), as a restarted server would have."""
    parent = _test_parent()
    if request.param == "detected":
        _detected(parent)  # skips here when the host has no usable cgroups
        return lambda: _detected(parent)
    if isinstance(_detected(parent), V2Driver):
        pytest.skip("the detected driver is already v2 (covered by 'detected')")
    _controllerless_v2(parent)
    return lambda: _controllerless_v2(parent)


@pytest.fixture
def new_mechanics_driver(mechanics_factory: Callable[[], Driver]) -> Driver:
    return mechanics_factory()


@pytest.fixture
async def mechanics_driver(new_mechanics_driver: Driver) -> AsyncIterator[Driver]:
    await new_mechanics_driver.prepare()
    try:
        yield new_mechanics_driver
    finally:
        await _cleanup(new_mechanics_driver)
