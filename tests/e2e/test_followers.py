"""20 ``tail`` processes following one running job all receive identical, complete output."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import pytest

from .gate import MARKER, Gate

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Host

pytestmark = pytest.mark.slow

FOLLOWERS = 20


def test_twenty_followers_get_identical_output(served: Host, tmp_path: Path) -> None:
    # The job prints a marker and waits; it is released (and writes ~1.9 MB) only once every
    # follower has received the marker, so all 20 follow it live (tests/e2e/gate.py).
    with Gate(tmp_path / "go") as gate:
        job = served.start("sh", "-c", gate.script("seq 1 300000; echo done"))
        tails = [served.popen("tail", job) for _ in range(FOLLOWERS)]
        gate.release_when_attached(served, job, tails)
        results = [t.communicate(timeout=120) for t in tails]  # what came after the marker
    rest = b"".join(b"%d\n" % i for i in range(1, 300001)) + b"done\n"
    digests = {hashlib.sha256(out).hexdigest() for out, _ in results}
    assert digests == {hashlib.sha256(rest).hexdigest()}
    assert [t.returncode for t in tails] == [0] * FOLLOWERS
    # a late follower replays everything from the log
    expected = MARKER + rest
    assert served.run("tail", job).stdout == expected
    # --offset resumes mid-stream, --no-follow stops at the current end
    assert served.run("tail", job, "--offset", "1000", "--no-follow").stdout == expected[1000:]
