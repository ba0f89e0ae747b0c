"""Authorization policy: who exists, what each may run, as whom, and within which caps."""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

import pytest

from trio_jobs.security import PermissionDenied, PolicyError
from trio_jobs.security.dynamic_users import UID_RANGE, DynamicUsers
from trio_jobs.security.policy import (
    DEFAULT_SEARCH_PATH,
    LimitAboveCap,
    Policy,
    QuotaExceeded,
    lookup_unix_user,
)

REPO = Path(__file__).resolve().parents[2]
SH = shutil.which("sh", path=DEFAULT_SEARCH_PATH)
LS = shutil.which("ls", path=DEFAULT_SEARCH_PATH)
assert SH is not None
assert LS is not None


def policy(text: str) -> Policy:
    return Policy.from_toml(text, source="test.toml")


def test_default_roles() -> None:
    p = Policy.default()
    assert set(p.identities) == {"admin", "alice", "bob"}
    admin, alice, bob = p.lookup("admin"), p.lookup("alice"), p.lookup("bob")
    assert admin.admin
    assert not alice.admin
    assert not bob.admin
    assert admin.programs is None
    assert alice.programs is None
    assert bob.programs is None
    assert admin.run_as == ""  # the server's own user
    assert alice.run_as is None  # unset: a dynamic user of her own on a root server
    assert bob.run_as is None
    assert alice.max_total["pids_max"] <= 8192  # the identity's jobs together
    assert alice.max_running_jobs > 0
    assert alice.max_limits["cpu_millis"] > 0


@pytest.mark.parametrize("who", ["carol", "Admin", "alice ", ""])
def test_unknown_identity_is_denied_with_advice(who: str) -> None:
    with pytest.raises(PermissionDenied, match=r"not allowed on this server.*\[identities\."):
        Policy.default().lookup(who)


def test_missing_identity_is_denied() -> None:
    with pytest.raises(PermissionDenied, match="no single usable subject common name"):
        Policy.default().lookup(None)


def test_run_as_only_switches_users_when_root() -> None:
    p = policy('[identities.alice]\nrun_as = "nobody"\n[identities.admin]\nadmin = true\n')
    nobody = pwd.getpwnam("nobody")
    user = p.resolve_run_as(p.lookup("alice"), euid=0)
    assert user is not None
    assert (user.name, user.uid, user.gid) == ("nobody", nobody.pw_uid, nobody.pw_gid)
    assert user.groups[0] == nobody.pw_gid
    assert p.resolve_run_as(p.lookup("admin"), euid=0) is None
    assert p.resolve_run_as(p.lookup("alice"), euid=1000) is None
    p.check_users(euid=0)


def test_identities_without_run_as_get_users_of_their_own(tmp_path: Path) -> None:
    p = Policy.default()
    users = DynamicUsers(tmp_path / "users.json")
    alice = p.resolve_run_as(p.lookup("alice"), euid=0, dynamic=users)
    bob = p.resolve_run_as(p.lookup("bob"), euid=0, dynamic=users)
    assert alice is not None
    assert bob is not None
    assert alice.uid != bob.uid
    for user in (alice, bob):
        assert user.uid in UID_RANGE
        assert (user.gid, user.groups) == (user.uid, (user.uid,))
        with pytest.raises(KeyError):
            pwd.getpwuid(user.uid)  # never an existing account
    assert p.resolve_run_as(p.lookup("admin"), euid=0, dynamic=users) is None
    assert p.resolve_run_as(p.lookup("alice"), euid=1000, dynamic=users) is None
    # Stable across restarts: a new allocator on the same file gives the same ids.
    again = DynamicUsers(tmp_path / "users.json")
    assert (again.get("bob").uid, again.get("alice").uid) == (bob.uid, alice.uid)
    assert (tmp_path / "users.json").stat().st_mode & 0o777 == 0o600
    with pytest.raises(PolicyError, match="no dynamic users"):
        p.resolve_run_as(p.lookup("alice"), euid=0)


def test_dynamic_users_skip_ids_that_accounts_or_others_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trio_jobs.security import dynamic_users

    users = DynamicUsers(None)
    first = users.get("carol").uid
    taken = {first, first + 1}
    monkeypatch.setattr(dynamic_users, "_taken_by_host", lambda uid: uid in taken)
    # Another identity whose hash lands on carol's id, or on an account's, probes past them.
    monkeypatch.setattr(dynamic_users, "_first_choice", lambda _identity: first - UID_RANGE.start)
    assert users.get("dave").uid == first + 2


def test_damaged_dynamic_users_file_is_a_policy_error(tmp_path: Path) -> None:
    path = tmp_path / "users.json"
    path.write_text('{"users": {"a": 5}}')
    with pytest.raises(PolicyError, match="damaged"):
        DynamicUsers(path)


def test_missing_run_as_user_is_a_policy_error() -> None:
    p = policy('[identities.alice]\nrun_as = "no-such-user-trio-jobs"\n')
    with pytest.raises(PolicyError, match="'no-such-user-trio-jobs' does not exist"):
        p.check_users(euid=0)
    p.check_users(euid=1000)  # a non-root server never switches users


def test_lookup_unix_user_root() -> None:
    root = lookup_unix_user("root")
    assert (root.uid, root.gid, root.groups[0]) == (0, 0, 0)
    assert root.home


def test_overrides_and_merged_caps(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        """
        [defaults]
        run_as = "nobody"
        max_running_jobs = 4
        programs = ["ls"]
        [defaults.max_limits]
        cpu_millis = 1000
        memory_bytes = 1000000
        [identities.ops]
        admin = true
        run_as = ""
        programs = ["*"]
        [identities.ops.max_limits]
        cpu_millis = 4000
        [identities."Alice Smith"]
        max_running_jobs = 1
        """
    )
    p = Policy.load(path)
    ops, alice = p.lookup("ops"), p.lookup("Alice Smith")
    assert ops.admin
    assert ops.run_as == ""
    assert ops.programs is None
    assert dict(ops.max_limits) == {"cpu_millis": 4000, "memory_bytes": 1000000}
    assert not alice.admin
    assert alice.run_as == "nobody"
    assert alice.programs == frozenset({"ls"})
    assert (alice.max_running_jobs, ops.max_running_jobs) == (1, 4)
    with pytest.raises(PermissionDenied):
        p.lookup("admin")  # a policy file replaces the built-in one entirely


def test_empty_policy_allows_nobody() -> None:
    with pytest.raises(PermissionDenied):
        policy("").lookup("admin")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1", r"<top level>\.colour: unknown key"),
        ("[defaults]\nprogramz = []", r"defaults\.programz: unknown key"),
        ("[defaults]\nadmin = true", r"defaults\.admin: unknown key"),
        ("[defaults.max_limits]\ncpu = 1", r"defaults\.max_limits\.cpu: unknown key"),
        ("[identities.a]\nrunas = 'x'", r"identities\.a\.runas: unknown key"),
        ("[identities.a]\nadmin = 'yes'", r"identities\.a\.admin: expected true or false"),
        (
            "[identities.a]\nmax_running_jobs = true",
            r"identities\.a\.max_running_jobs: expected an integer",
        ),
        ("[identities.a]\nmax_running_jobs = -1", r"max_running_jobs: expected an integer >= 0"),
        ("[identities.a]\nmax_running_jobs = '3'", r"max_running_jobs: expected an integer"),
        ("[identities.a]\nprograms = 'sh'", r"identities\.a\.programs: expected a list"),
        ("[identities.a]\nprograms = [1]", r"identities\.a\.programs: expected a list"),
        ("[identities.a]\nprograms = ['bin/sh']", r"'bin/sh' is neither a program name"),
        ("[identities.a]\nprograms = ['']", r"'' is neither"),
        ("[identities.a]\nrun_as = 0", r"identities\.a\.run_as: expected a Unix user name"),
        ("[identities.a.max_limits]\npids_max = 1.5", r"identities\.a\.max_limits\.pids_max"),
        ("identities = 3", r"identities: expected a table"),
        ("[identities]\na = 1", r"identities\.a: expected a table"),
        ("[identities.a\n", r"invalid TOML.*line 1"),
    ],
)
def test_bad_policy_names_the_key(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=r"^test\.toml: .*" + message):
        policy(text)


def test_unreadable_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        Policy.load(tmp_path / "missing.toml")
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        Policy.load(tmp_path / "bin.toml")


def test_example_policy_file_matches_the_builtin_default() -> None:
    example = Policy.load(REPO / "docs" / "policy.example.toml")
    assert example.identities == Policy.default().identities


# --- programs ----------------------------------------------------------------------------


def test_star_allows_anything() -> None:
    p = Policy.default()
    p.check_program(p.lookup("alice"), "/definitely/not/there")


def test_program_by_name_matches_the_file_not_the_string(tmp_path: Path) -> None:
    assert SH is not None
    assert LS is not None
    p = policy("[identities.u]\nprograms = ['sh']\n")
    u = p.lookup("u")
    p.check_program(u, SH)
    p.check_program(u, os.path.realpath(SH))  # e.g. /usr/bin/dash: the same file
    link = tmp_path / "my-shell"
    link.symlink_to(SH)
    p.check_program(u, str(link))  # a symlink to sh is sh
    copy = tmp_path / "sh"
    shutil.copy(SH, copy)
    with pytest.raises(PermissionDenied, match=r"may not run .*\(allowed: sh\)"):
        p.check_program(u, str(copy))  # a user's own file named sh is not sh
    with pytest.raises(PermissionDenied, match="may not run"):
        p.check_program(u, LS)


def test_sh_dash_c_is_only_as_allowed_as_sh() -> None:
    """Arguments are not inspected: `sh -c 'rm ...'` is the program sh."""
    assert SH is not None
    only_ls = policy("[identities.u]\nprograms = ['ls']\n")
    with pytest.raises(PermissionDenied):
        only_ls.check_program(only_ls.lookup("u"), SH)
    with_sh = policy("[identities.u]\nprograms = ['ls', 'sh']\n")
    with_sh.check_program(with_sh.lookup("u"), SH)


def test_program_by_absolute_path(tmp_path: Path) -> None:
    assert LS is not None
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    p = policy(f"[identities.u]\nprograms = ['{tool}']\n")
    u = p.lookup("u")
    p.check_program(u, str(tool))
    with pytest.raises(PermissionDenied):
        p.check_program(u, LS)


@pytest.mark.parametrize("path", ["sh", "bin/sh", "/no/such/file"])
def test_unresolvable_paths_are_denied(path: str) -> None:
    p = policy("[identities.u]\nprograms = ['sh', '/no/such/file']\n")
    with pytest.raises(PermissionDenied):
        p.check_program(p.lookup("u"), path)


def test_empty_program_list_allows_nothing() -> None:
    assert SH is not None
    p = policy("[identities.u]\n")
    with pytest.raises(PermissionDenied, match="allowed: nothing"):
        p.check_program(p.lookup("u"), SH)


# --- caps --------------------------------------------------------------------------------


def test_limit_caps() -> None:
    p = policy("[defaults.max_limits]\ncpu_millis = 2000\n[identities.u]\n")
    u = p.lookup("u")
    p.check_limits(u, {"cpu_millis": 2000, "memory_bytes": None})  # uncapped may be unlimited
    with pytest.raises(LimitAboveCap, match="cpu_millis=2001 is above the cap of 2000"):
        p.check_limits(u, {"cpu_millis": 2001})
    with pytest.raises(LimitAboveCap, match="cpu_millis=unlimited"):
        p.check_limits(u, {"cpu_millis": None})


def test_running_job_quota() -> None:
    p = policy("[identities.u]\nmax_running_jobs = 2\n")
    u = p.lookup("u")
    p.check_running_jobs(u, 1)
    with pytest.raises(QuotaExceeded, match="already has 2 running jobs"):
        p.check_running_jobs(u, 2)
