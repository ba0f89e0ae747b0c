"""The state directory cannot be squatted (issue #16, items 6 and 9a; DESIGN §3).

A local user reaches ``TRIO_JOBS_HOME`` (or a directory on its way) before a root
``trio-jobs serve`` does: with a PKI of their own (so their ``admin`` certificate would be
admin), with symlinks planted where the server writes, or with a parent directory they can
rename things in. Each attack is performed for real, as root, on real files, against a real
``trio-jobs serve --port 0`` subprocess: it must exit 8 with exactly one line on stderr and
no traceback, having created or changed nothing in the tree it was given. A fresh start
makes everything private (0700 directories, 0600 database, -wal, -shm and keys) even with a
umask of 0, which the jobs still inherit.

Below those, fast tests of :func:`trio_jobs.security.statedir.prepare_state` itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
from e2e.conftest import Host

from trio_jobs.security import statedir
from trio_jobs.security.pki import init_dev_pki
from trio_jobs.security.statedir import StateDirError, prepare_state

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

NOBODY: Final = 65534  # the squatter
EXIT_CONFIG: Final = 8
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="the squatter's files are chown'ed: needs root")

Snapshot = dict[str, tuple[object, ...]]


def snapshot(root: Path) -> Snapshot:
    """Everything observable about a tree without following a symlink: type, mode, owner,
    size, times, inode, links, and the content of files (sha256) and symlinks."""
    result: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):  # never follows symlinks
        for path in [dirpath, *(os.path.join(dirpath, n) for n in (*dirnames, *filenames))]:
            st = os.lstat(path)
            entry: tuple[object, ...] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                         st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_nlink)
            if stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(path),)
            elif stat.S_ISREG(st.st_mode):
                entry += (hashlib.sha256(Path(path).read_bytes()).hexdigest(),)
            result[path] = entry
    return result


def chown_tree(root: Path, uid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for path in [dirpath, *(os.path.join(dirpath, n) for n in (*dirnames, *filenames))]:
            os.lchown(path, uid, uid)


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """Where the attacks happen (tmp_path itself also holds the server logs)."""
    path = tmp_path / "world"
    path.mkdir(mode=0o755)
    return path


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator[Callable[[Path], Host]]:
    """``make_host(home)``: an e2e Host (real ``trio-jobs`` subprocesses) for that home."""
    made: list[Host] = []
    logs = tmp_path / "logs"
    logs.mkdir()

    def make(home: Path) -> Host:
        made.append(Host(home, logs))
        return made[-1]

    try:
        yield make
    finally:
        with contextlib.ExitStack() as closing:  # every host is closed, even if one reports
            for h in made:
                closing.callback(h.close)


def serve_refused(host: Host, *words: str) -> str:
    """Run ``trio-jobs serve --port 0``: it must refuse with exit 8 and one clear line that
    holds ``words``, print nothing on stdout (it never listened), and no traceback."""
    result = host.run("serve", "--port", "0", "--cgroup-parent", host.cgroup_parent,
                      check=False, timeout=60)
    err = result.stderr.decode(errors="replace")
    assert result.returncode == EXIT_CONFIG, (result.returncode, err)
    assert result.stdout == b"", result.stdout  # no "listening on": no certificate accepted
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("trio-jobs: error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# -- the attacks, against a real root server --------------------------------------------------


@pytest.mark.root
@as_root
def test_home_made_by_another_user_is_not_adopted(world: Path, make_host: Callable[[Path], Host]) -> None:
    """(1) The squatter made TRIO_JOBS_HOME with a complete development PKI of their own: the
    server must not trust their CA (their admin.crt would be admin)."""
    host = make_host(world / "home")
    host.run("certs", "init")  # the squatter's PKI, made the ordinary way, then given away
    chown_tree(host.home, NOBODY)
    assert (host.home / "pki" / "admin.key").stat().st_uid == NOBODY
    before = snapshot(world)
    serve_refused(host, str(host.home), "uid 65534", "TRIO_JOBS_HOME")
    assert snapshot(world) == before


@pytest.mark.root
@as_root
@pytest.mark.parametrize("mode", [0o770, 0o707])
def test_group_or_world_writable_home_is_refused(world: Path, make_host: Callable[[Path], Host],
                                                  mode: int) -> None:
    """(2) A state directory others can write to: they could replace pki/ or the database."""
    host = make_host(world / "home")
    host.run("certs", "init")
    host.home.chmod(mode)
    before = snapshot(world)
    serve_refused(host, str(host.home), "writable by group/others", f"{mode:04o}")
    assert snapshot(world) == before


@pytest.mark.root
@as_root
def test_planted_key_symlink_is_refused(world: Path, make_host: Callable[[Path], Host]) -> None:
    """(3) pki/server.key is a symlink to a key elsewhere (whose owner would be the server)."""
    host = make_host(world / "home")
    host.run("certs", "init")
    elsewhere = world / "elsewhere"
    init_dev_pki(elsewhere)
    key = host.home / "pki" / "server.key"
    key.unlink()
    key.symlink_to(elsewhere / "server.key")
    before = snapshot(world)
    serve_refused(host, str(key), "symbolic link")
    assert snapshot(world) == before


@pytest.mark.root
@as_root
@pytest.mark.parametrize("content", [b"", b"root:x:0:0:root:/root:/bin/bash\n"],
                         ids=["empty", "passwd-like"])
def test_planted_database_symlink_is_refused(world: Path, make_host: Callable[[Path], Host],
                                             content: bytes) -> None:
    """(4) jobs.sqlite3 is a symlink to a system file: root's SQLite would have written a
    database into an empty one. Refused, and the victim is untouched."""
    victim = world / "etc" / "victim.conf"
    victim.parent.mkdir()
    victim.write_bytes(content)
    host = make_host(world / "home")
    host.run("certs", "init")
    (host.home / "jobs.sqlite3").symlink_to(victim)
    before = snapshot(world)
    serve_refused(host, "jobs.sqlite3", "symbolic link")
    assert snapshot(world) == before
    assert victim.read_bytes() == content


@pytest.mark.root
@as_root
@pytest.mark.parametrize("home_exists", [True, False], ids=["home-exists", "home-missing"])
def test_world_writable_parent_without_sticky_bit_is_refused(
    world: Path, make_host: Callable[[Path], Host], home_exists: bool
) -> None:
    """(5) A parent anyone can write to (no sticky bit): they could rename our directory away
    and put theirs in its place -- or make it first. Nothing is created in it."""
    shared = world / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    host = make_host(shared / "trio-jobs")
    if home_exists:
        host.run("certs", "init")
    before = snapshot(world)
    serve_refused(host, str(shared), "without the sticky bit", "0777")
    assert snapshot(world) == before


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.root
@as_root
def test_fresh_start_makes_everything_private(world: Path, make_host: Callable[[Path], Host]) -> None:
    """(6) First run under a sticky, world-writable parent (like /tmp) with umask 0: the
    directories are 0700, the database, -wal, -shm and keys 0600; the job inherits umask 0."""
    shared = world / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    host = make_host(shared / "a" / "home")
    with umask(0):  # fixed at fork: the server runs with it, the test does not
        host.start_server()
    job = host.start("sh", "-c", "umask")
    assert host.run("tail", job).stdout == b"0000\n"  # the server left the umask alone
    home = host.home
    assert (home / "jobs.sqlite3-wal").exists()  # a job was recorded: the WAL is there
    expected = {
        shared / "a": 0o700, home: 0o700, home / "pki": 0o700, home / "output": 0o700,
        home / "jobs.sqlite3": 0o600, home / "jobs.sqlite3-wal": 0o600,
        home / "jobs.sqlite3-shm": 0o600, home / "output" / f"{job}.out": 0o600,
        **{home / "pki" / f"{s}.key": 0o600 for s in ("ca", "server", "admin", "alice", "bob")},
    }
    for path, mode in expected.items():
        st = path.lstat()
        assert (oct(stat.S_IMODE(st.st_mode)), st.st_uid) == (oct(mode), 0), path
    for path_text in snapshot(home):  # and nothing else in it is open to others
        st = os.lstat(path_text)
        public = path_text.endswith(".crt")
        allowed = 0o644 if public else 0o700
        assert not stat.S_ISLNK(st.st_mode), path_text
        assert stat.S_IMODE(st.st_mode) & ~allowed == 0, (path_text, oct(st.st_mode))
    assert host.stop_server() == 0
    assert "readable by group/others" not in host.server_stderr()


# -- the checker itself -------------------------------------------------------------------------


def _home(world: Path) -> Path:
    return world / "home"


def _prepare(home: Path, *, data_dir: Path | None = None, pki_dir: Path | None = None) -> list[str]:
    return prepare_state(home=home, data_dir=home if data_dir is None else data_dir,
                         pki_dir=home / "pki" if pki_dir is None else pki_dir)


def _refused(home: Path, pattern: str, *, data_dir: Path | None = None,
             pki_dir: Path | None = None) -> str:
    with pytest.raises(StateDirError) as info:
        _prepare(home, data_dir=data_dir, pki_dir=pki_dir)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(pattern, message), message
    return message


def test_names_agree_with_the_modules_that_make_the_files() -> None:
    from trio_jobs.audit import AUDIT_FILE_NAME
    from trio_jobs.security.dynamic_users import FILE_NAME as DYNAMIC
    from trio_jobs.worker import finals, worker

    assert (statedir.DB_NAME, statedir.LOCK_NAME, statedir.OUTPUT_DIR) == (
        worker.DB_NAME, worker.LOCK_NAME, worker.OUTPUT_DIR)
    assert statedir.FINALS_NAME == finals.FILE_NAME
    assert statedir.DYNAMIC_USERS_NAME == DYNAMIC
    assert statedir.AUDIT_NAME == AUDIT_FILE_NAME


def test_fresh_state_is_created_private_and_checked_again(world: Path) -> None:
    home = world / "a" / "b" / "home"
    with umask(0):
        assert _prepare(home) == []
    for path in (world / "a", world / "a" / "b", home, home / "pki", home / "output"):
        assert stat.S_IMODE(path.lstat().st_mode) == 0o700, path
    init_dev_pki(home / "pki")
    assert _prepare(home) == []  # a second start finds it all in order


def test_nothing_is_created_when_a_later_check_fails(world: Path) -> None:
    data = world / "data"
    data.mkdir()
    data.chmod(0o775)
    _refused(_home(world), "data.* is writable by group/others", data_dir=data)
    assert not _home(world).exists()


def test_group_writable_home_is_refused(world: Path) -> None:
    home = _home(world)
    home.mkdir()
    home.chmod(0o720)
    _refused(home, r"home is writable by group/others \(mode 0720\): run `chmod go-w")


@pytest.mark.parametrize("name", ["pki", "output", "jobs.sqlite3", "jobs.sqlite3-wal",
                                  "jobs.sqlite3-shm", "lock", "audit.jsonl", "final-records"])
def test_planted_symlinks_are_refused(world: Path, name: str) -> None:
    home = _home(world)
    home.mkdir(mode=0o700)
    target = world / "target"
    target.mkdir()
    (home / name).symlink_to(target)
    _refused(home, f"{name} is a symbolic link; .* someone planted it")


def test_planted_symlink_in_pki_is_refused(world: Path) -> None:
    home = _home(world)
    init_dev_pki(home / "pki")
    (home / "pki" / "ca.crt").unlink()
    (home / "pki" / "ca.crt").symlink_to("/etc/hostname")
    _refused(home, "ca.crt is a symbolic link")


def test_wrong_types_are_refused(world: Path) -> None:
    home = _home(world)
    (home / "jobs.sqlite3").mkdir(parents=True)
    _refused(home, "jobs.sqlite3 is not a regular file")
    (home / "jobs.sqlite3").rmdir()
    (home / "output").write_bytes(b"")
    _refused(home, "output is not a directory")


def test_hard_link_to_a_file_elsewhere_is_refused(world: Path) -> None:
    home = _home(world)
    home.mkdir()
    victim = world / "victim"
    victim.write_bytes(b"x")
    victim.chmod(0o600)
    os.link(victim, home / "jobs.sqlite3")
    _refused(home, "jobs.sqlite3 has 2 hard links")


def test_private_key_readable_by_others_is_refused(world: Path) -> None:
    home = _home(world)
    init_dev_pki(home / "pki")
    (home / "pki" / "alice.key").chmod(0o640)
    _refused(home, r"alice.key is a private key readable by group/others \(mode 0640\)")


def test_database_readable_by_others_is_tightened(world: Path) -> None:
    home = _home(world)
    home.mkdir()
    db = home / "jobs.sqlite3"
    db.write_bytes(b"")
    db.chmod(0o644)  # as an earlier release made it
    notes = _prepare(home)
    assert notes == [f"{db} was readable by group/others (mode 0644): made it 0600"]
    assert stat.S_IMODE(db.stat().st_mode) == 0o600
    db.chmod(0o664)  # writable by others: someone may have changed it -> refused, not fixed
    _refused(home, "jobs.sqlite3 is writable by group/others")
    assert stat.S_IMODE(db.stat().st_mode) == 0o664


def test_parents_writable_without_sticky_bit_are_refused(world: Path) -> None:
    shared = world / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    _refused(shared / "home", r"shared \(on the way to TRIO_JOBS_HOME .*\) is writable by "
                              r"group/others without the sticky bit \(mode 0777\)")
    assert list(shared.iterdir()) == []
    shared.chmod(0o1777)  # as /tmp: others can add names, not rename or remove ours
    assert _prepare(shared / "home") == []


def test_symlinks_on_the_way_are_followed_when_trusted(world: Path) -> None:
    real = world / "real"
    real.mkdir()
    (world / "alias").symlink_to("real")  # ours, in a directory that passed: /var/run -> /run
    assert _prepare(world / "alias" / "home") == []
    assert (real / "home" / "output").is_dir()
    (world / "loop").symlink_to("loop")
    _refused(world / "loop" / "home", "too many levels of symbolic links")


def test_dotdot_and_relative_paths_are_resolved_like_the_kernel(world: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (world / "x").mkdir()
    (world / "shared").mkdir()
    (world / "shared").chmod(0o777)
    monkeypatch.chdir(world / "x")
    _refused(Path("../shared/home"), "without the sticky bit")
    _refused(world / "missing" / ".." / "home", r"missing directory .* then '\.\.'")
    assert _prepare(Path("../home")) == []
    assert (world / "home" / "output").is_dir()


def test_messages_escape_control_characters(world: Path) -> None:
    evil = world / "a\x1b[2J\nb"
    evil.mkdir()
    evil.chmod(0o777)
    message = _refused(evil / "home", "without the sticky bit")
    assert "\x1b" not in message
    assert "a\\x1b[2J\\x0ab" in message


@pytest.mark.root
@as_root
def test_squatted_home_data_and_pki_are_refused(world: Path) -> None:
    home = _home(world)
    init_dev_pki(home / "pki")
    chown_tree(home, NOBODY)
    msg = _refused(home, r"home belongs to uid 65534.* not to root .*`chown -R root ")
    assert "set TRIO_JOBS_HOME to another directory" in msg
    chown_tree(home, 0)
    os.lchown(home / "pki" / "bob.key", NOBODY, NOBODY)
    _refused(home, r"bob.key belongs to uid 65534")
    data = world / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    chown_tree(home, 0)
    _refused(home, r"data belongs to uid 65534.*pass another --data-dir", data_dir=data)
    other_pki = world / "other-pki"
    init_dev_pki(other_pki)
    os.chown(other_pki, NOBODY, NOBODY)
    _refused(home, r"other-pki belongs to uid 65534.*pass another --pki", pki_dir=other_pki)


@pytest.mark.root
@as_root
def test_parent_owned_by_another_user_is_refused(world: Path) -> None:
    theirs = world / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)  # 0755, but they may rename what is in it
    _refused(theirs / "home", r"theirs \(on the way to .*\) belongs to uid 65534")


@pytest.mark.root
@as_root
def test_symlink_of_another_user_in_a_sticky_directory_is_refused(world: Path) -> None:
    sticky = world / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (world / "real").mkdir()
    link = sticky / "link"
    link.symlink_to(world / "real")
    os.lchown(link, NOBODY, NOBODY)
    _refused(link / "home", r"link .* is a symbolic link owned by uid 65534")


@pytest.mark.root
@as_root
def test_directory_made_in_the_race_window_is_checked_again(world: Path) -> None:
    """Someone creates the missing directory between the check and our mkdir (a sticky /tmp
    lets them): the second phase finds it, checks it again, and refuses it."""
    sticky = world / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    home = sticky / "home"
    plan = statedir._Plan(0)
    plan.own_dir(home, statedir._HOME)  # phase one: missing, to be created
    assert list(plan.create) == [str(home)]
    home.mkdir(mode=0o700)
    os.chown(home, NOBODY, NOBODY)  # the squatter wins the race
    with pytest.raises(StateDirError, match="home belongs to uid 65534"):
        plan.apply()
    os.chown(home, 0, 0)  # made by another start of ours: accepted as it is
    plan.apply()


# -- the operator's own TLS files (--cert/--key/--ca) ------------------------------------------


@pytest.fixture
def letsencrypt(world: Path) -> tuple[Path, Path, Path]:
    """/etc/letsencrypt-like: live/x/*.pem are relative symlinks into archive/x/."""
    pki = world / "made"
    init_dev_pki(pki)
    archive = world / "le" / "archive" / "x"
    live = world / "le" / "live" / "x"
    archive.mkdir(parents=True)
    live.mkdir(parents=True)
    for src, name, mode in (("server.crt", "fullchain", 0o644), ("server.key", "privkey", 0o600),
                            ("ca.crt", "chain", 0o644)):
        (archive / f"{name}1.pem").write_bytes((pki / src).read_bytes())
        (archive / f"{name}1.pem").chmod(mode)
        (live / f"{name}.pem").symlink_to(f"../../archive/x/{name}1.pem")
    return live / "fullchain.pem", live / "privkey.pem", live / "chain.pem"


def _prepare_tls(world: Path, files: tuple[Path, Path, Path]) -> list[str]:
    cert, key, ca = files
    return prepare_state(home=_home(world), data_dir=_home(world), cert=cert, key=key, ca=ca)


def test_operator_files_through_trusted_symlinks_are_accepted(
    world: Path, letsencrypt: tuple[Path, Path, Path]
) -> None:
    assert _prepare_tls(world, letsencrypt) == []
    assert not (_home(world) / "pki").exists()  # no development PKI with the operator's files
    key = world / "le" / "archive" / "x" / "privkey1.pem"
    key.chmod(0o640)  # group-readable: the ssl-cert group convention
    assert _prepare_tls(world, letsencrypt) == []


@pytest.mark.parametrize(("name", "mode", "pattern"), [
    ("privkey1.pem", 0o604, r"--key .*privkey.pem \(-> .*privkey1.pem\) is a private key "
                            r"readable by others \(mode 0604\)"),
    ("fullchain1.pem", 0o664, r"--cert .* is writable by group/others"),
    ("chain1.pem", 0o646, r"--ca .* is writable by group/others"),
])
def test_operator_files_open_to_others_are_refused(
    world: Path, letsencrypt: tuple[Path, Path, Path], name: str, mode: int, pattern: str
) -> None:
    (world / "le" / "archive" / "x" / name).chmod(mode)
    with pytest.raises(StateDirError, match=pattern):
        _prepare_tls(world, letsencrypt)
    assert not _home(world).exists()


def test_operator_files_in_an_open_directory_are_refused(
    world: Path, letsencrypt: tuple[Path, Path, Path]
) -> None:
    (world / "le" / "archive").chmod(0o777)
    with pytest.raises(StateDirError, match=r"archive \(on the way to --cert .*\) is writable"):
        _prepare_tls(world, letsencrypt)


@pytest.mark.root
@as_root
def test_operator_files_of_another_user_are_refused(
    world: Path, letsencrypt: tuple[Path, Path, Path]
) -> None:
    key = letsencrypt[1]
    os.lchown(key, NOBODY, NOBODY)  # the link itself: they could point it at their key
    with pytest.raises(StateDirError, match=r"privkey\.pem is a symbolic link owned by uid 65534"):
        _prepare_tls(world, letsencrypt)
    os.lchown(key, 0, 0)
    os.chown(world / "le" / "archive" / "x" / "fullchain1.pem", NOBODY, NOBODY)
    with pytest.raises(StateDirError, match=r"--cert .* belongs to uid 65534"):
        _prepare_tls(world, letsencrypt)


@pytest.mark.root
@as_root
def test_serve_refuses_a_key_symlink_of_another_user(
    world: Path, make_host: Callable[[Path], Host], letsencrypt: tuple[Path, Path, Path]
) -> None:
    """The same through the real command line (--cert/--key/--ca)."""
    cert, key, ca = letsencrypt
    os.lchown(key, NOBODY, NOBODY)
    host = make_host(world / "home")
    result = host.run("serve", "--port", "0", "--cgroup-parent", host.cgroup_parent,
                      "--cert", str(cert), "--key", str(key), "--ca", str(ca),
                      check=False, timeout=60)
    assert result.returncode == EXIT_CONFIG, result
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert "privkey.pem is a symbolic link owned by uid 65534" in lines[0]

