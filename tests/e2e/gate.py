"""A job held after its first line until every follower has received that line.

Tests that claim "several followers of a *running* job" use it: the job prints
:data:`MARKER` and then blocks reading a FIFO; :meth:`Gate.release_when_attached` reads the
marker from every follower's stdout (each ``tail`` is then attached to the job's output
stream on the server and has been sent bytes by it), checks that the job is still running
and has written the marker and nothing else, and only then writes the FIFO. Without it a
follower process (~0.2 s of imports) can start after a short job has ended, and the test
exercises the replay of an ended job instead of live following.
"""

from __future__ import annotations

import json
import os
import shlex
from typing import TYPE_CHECKING, Final

from .conftest import COMMAND_TIMEOUT, read_line

if TYPE_CHECKING:
    import subprocess
    from collections.abc import Sequence
    from pathlib import Path

    from .conftest import Host

MARKER: Final = b"attached?\n"


class Gate:
    """A FIFO the job reads before its real work. The test holds it open for reading and
    writing (Linux): the job's open never blocks, and the release line stays in the FIFO
    until the job reads it, whenever it gets there."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def script(self, then: str) -> str:
        """A ``sh -c`` script: the marker, the wait, then ``then``."""
        return f"echo {MARKER.decode().strip()}; read go < {shlex.quote(str(self.path))}; {then}"

    def release_when_attached(self, host: Host, job: str, followers: Sequence[subprocess.Popen[bytes]]) -> None:
        for follower in followers:
            assert follower.stdout is not None
            assert read_line(follower.stdout, COMMAND_TIMEOUT) == MARKER
        held = json.loads(host.run("status", job, "--json").stdout)
        assert held["state"] == "JOB_STATE_RUNNING", held
        assert int(held["output_bytes"]) == len(MARKER), held  # held at its marker
        os.write(self._fd, b"go\n")

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
