"""20 ``tail`` processes on one job all receive identical, complete output."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Host

pytestmark = pytest.mark.slow

FOLLOWERS = 20


def test_twenty_followers_get_identical_output(served: Host, tmp_path: Path) -> None:
    # The job waits on a FIFO until every follower is attached, then writes ~1.9 MB.
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    script = f"read x < {fifo}; seq 1 300000; echo done"
    job = served.start("sh", "-c", script)
    tails = [served.popen("tail", job) for _ in range(FOLLOWERS)]
    with fifo.open("w") as go:
        go.write("go\n")
    results = [t.communicate(timeout=120) for t in tails]
    expected = b"".join(b"%d\n" % i for i in range(1, 300001)) + b"done\n"
    digests = {hashlib.sha256(out).hexdigest() for out, _ in results}
    assert digests == {hashlib.sha256(expected).hexdigest()}
    assert [t.returncode for t in tails] == [0] * FOLLOWERS
    # a late follower replays everything from the log
    assert served.run("tail", job).stdout == expected
    # --offset resumes mid-stream, --no-follow stops at the current end
    assert served.run("tail", job, "--offset", "1000", "--no-follow").stdout == expected[1000:]
