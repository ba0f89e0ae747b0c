"""Two users at once: each sees and controls only their own jobs; admin sees everything."""

from __future__ import annotations

import json
import os
import pwd
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Host

pytestmark = pytest.mark.slow


def test_alice_and_bob_are_kept_apart(served: Host) -> None:
    alice_job = served.start("sleep", "600", identity="alice")
    bob_job = served.start("echo", "from bob", identity="bob")

    def ids(identity: str, *extra: str) -> list[str]:
        out = served.run("list", "--json", *extra, identity=identity).stdout
        return [j["job_id"] for j in json.loads(out).get("jobs", [])]

    assert ids("alice") == [alice_job]
    assert ids("bob") == [bob_job]
    assert set(ids("admin", "--all")) == {alice_job, bob_job}
    assert ids("admin") == []

    # another user's job is NOT_FOUND, with exactly the message of a job that does not exist
    for args in (["status", bob_job], ["tail", bob_job], ["stop", bob_job]):
        denied = served.run(*args, identity="alice", check=False)
        assert denied.returncode == 4, denied.stderr
        assert denied.stdout == b""
    missing = served.run("status", "11111111-1111-4111-8111-111111111111", identity="alice", check=False)
    assert missing.stderr.decode().replace("11111111-1111-4111-8111-111111111111", "X") == served.run(
        "status", bob_job, identity="alice", check=False
    ).stderr.decode().replace(bob_job, "X")

    # bob's job did run, as its owner, and only bob (and admin) can read it
    assert served.run("tail", bob_job, identity="bob").stdout == b"from bob\n"
    assert served.run("tail", bob_job, identity="admin").stdout == b"from bob\n"
    assert json.loads(served.run("status", bob_job, "--json", identity="bob").stdout)["owner"] == "bob"

    # alice's job is still running; bob cannot stop it, admin can
    assert json.loads(served.run("status", alice_job, "--json", identity="alice").stdout)["state"] == "JOB_STATE_RUNNING"
    served.run("stop", alice_job, "--grace", "0", identity="admin")
    status = json.loads(served.run("status", alice_job, "--json", identity="alice").stdout)
    assert status["state"] == "JOB_STATE_KILLED"


@pytest.mark.skipif(os.geteuid() != 0, reason="jobs change user only when the server runs as root")
def test_jobs_run_as_the_unix_user_of_the_policy(host: Host, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        "[defaults]\nrun_as = \"nobody\"\nprograms = [\"*\"]\n"
        "[identities.admin]\nadmin = true\nrun_as = \"\"\n"
        "[identities.alice]\n"
        "[identities.bob]\nrun_as = \"daemon\"\n"
    )
    host.start_server("--policy", str(policy))

    def whoami(identity: str) -> bytes:
        job = host.start("sh", "-c", "id -un; id -u", identity=identity)
        return host.run("tail", job, identity=identity).stdout

    assert whoami("alice") == f"nobody\n{pwd.getpwnam('nobody').pw_uid}\n".encode()
    assert whoami("bob") == f"daemon\n{pwd.getpwnam('daemon').pw_uid}\n".encode()
    assert whoami("admin") == b"root\n0\n"  # run_as "" = the server's own user
