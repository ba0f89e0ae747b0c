"""A hostile authenticated user tries to run code as root, to run what the policy forbids, to
look where her job's user may not, and to reach another identity's jobs (issue #16, 1-5).

Every test drives a real root ``trio-jobs serve`` (its real spawn path, setpriv, cgroups) and
performs the attack for real: a preload library built with the system C compiler, symlinks
swapped by a racing thread hundreds of times, ``/proc/self/cwd`` and ``/dev/fd`` paths, a
setuid-root copy of ``id``, and ``kill``/``/proc/PID/environ`` aimed at another user's job.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Final

import pytest
import trio

from trio_jobs.client import JobsClient, JobsError
from trio_jobs.rpc import StatusCode

if TYPE_CHECKING:
    from collections.abc import Iterator

    from e2e.conftest import Host

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="the attacks target a root server"),
]

EVIL_OUTPUT: Final = b"PWNED"

PRELOAD_C: Final = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>

/* Runs in every process that loads it: record who we are, what runs us and in which cgroup. */
__attribute__((constructor)) static void spy(void) {
    const char *dir = MARKER_DIR;
    char path[4096], comm[64] = "", cg[2048] = "";
    int fd = open("/proc/self/comm", O_RDONLY);
    if (fd >= 0) { ssize_t n = read(fd, comm, sizeof comm - 1); if (n > 0) comm[n - 1] = 0; close(fd); }
    fd = open("/proc/self/cgroup", O_RDONLY);
    if (fd >= 0) { ssize_t n = read(fd, cg, sizeof cg - 1); if (n > 0) cg[n] = 0; close(fd); }
    for (char *p = cg; *p; p++) if (*p == '\n') *p = ' ';
    snprintf(path, sizeof path, "%s/%d", dir, (int)getpid());
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (fd >= 0) { dprintf(fd, "uid=%d euid=%d comm=%s cgroup=%s\n", (int)getuid(), (int)geteuid(), comm, cg); close(fd); }
}
"""


@contextlib.contextmanager
def public_dir(mode: int = 0o755) -> Iterator[Path]:
    """A directory of our own under /tmp that every user can reach (tmp_path's parents are
    root's 0700 directories, which no job user may enter)."""
    path = Path(tempfile.mkdtemp(prefix="trio-jobs-hostile-"))
    path.chmod(mode)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def client(host: Host, identity: str) -> contextlib.AbstractAsyncContextManager[JobsClient]:
    pki = host.home / "pki"
    return JobsClient.connect(host.address, cert=pki / f"{identity}.crt", key=pki / f"{identity}.key",
                              ca=pki / "ca.crt")


async def output_of(jobs: JobsClient, job_id: str) -> tuple[bytes, int | None]:
    chunks: list[bytes] = []

    async def sink(data: bytes) -> None:
        chunks.append(data)

    final = await jobs.tail(job_id, sink)
    return b"".join(chunks), final.exit_code


def restricted_policy(host: Host, programs: str = '["/usr/bin/echo"]') -> Path:
    path = host.home.parent / "policy.toml"
    path.write_text(
        f'[identities.admin]\nadmin = true\nrun_as = ""\n'
        f"[identities.alice]\nprograms = {programs}\n"
        f'[identities.bob]\n'
    )
    return path


# --- 1. the user's environment never reaches code that runs as root --------------------------


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the preload library")
def test_ld_preload_runs_only_in_the_users_program_as_the_user(served: Host) -> None:
    with public_dir() as lib_dir, public_dir(0o1777) as markers:
        src = lib_dir / "spy.c"
        src.write_text(PRELOAD_C.replace("MARKER_DIR", f'"{markers}"'))
        lib = lib_dir / "spy.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, timeout=60)
        lib.chmod(0o755)

        async def attack() -> None:
            async with client(served, "alice") as jobs:
                for env in ({"LD_PRELOAD": str(lib)}, {"LD_AUDIT": str(lib), "LD_PRELOAD": str(lib)}):
                    job = await jobs.start("true", env=env)
                    _, code = await output_of(jobs, job.job_id)
                    assert code == 0

        trio.run(attack)
        records = [p.read_text() for p in markers.iterdir()]
        assert records, "the library never ran: the attack was not armed"
        for record in records:
            assert "euid=0" not in record, record
            assert "uid=0 " not in record, record
            assert "comm=true" in record, record  # only the user's program loaded it
            assert served.cgroup_parent in record, record  # and only inside the job's cgroup


def test_shell_variables_never_reach_the_launcher(served: Host) -> None:
    """Exported bash functions, ENV, BASH_ENV, IFS, PS4: the held shell (root before the drop
    on some hosts) runs with a fixed environment, so none of them is read; the program gets
    every variable exactly."""
    with public_dir(0o1777) as markers:
        evil = markers / "evil.sh"
        evil.write_text(f"touch {markers}/sourced\n")
        evil.chmod(0o755)
        env = {
            "BASH_FUNC_read%%": f"() {{ touch {markers}/function; }}",
            "BASH_FUNC_cd%%": f"() {{ touch {markers}/function; }}",
            "ENV": str(evil), "BASH_ENV": str(evil), "IFS": "/", "PS4": "$(touch /x)",
            "SHELLOPTS": "xtrace", "PATH": f"{markers}:/usr/bin:/bin",
        }

        async def attack() -> bytes:
            async with client(served, "alice") as jobs:
                job = await jobs.start("env", env=env)
                data, code = await output_of(jobs, job.job_id)
                assert code == 0
                return data

        printed = trio.run(attack).decode().splitlines()
        for name, value in env.items():
            assert f"{name}={value}" in printed  # exact, for the program
        assert sorted(p.name for p in markers.iterdir()) == ["evil.sh"]


def test_loader_variables_are_refused_to_a_restricted_identity(host: Host) -> None:
    host.start_server("--policy", str(restricted_policy(host)))
    for name in ("LD_PRELOAD", "LD_LIBRARY_PATH", "GCONV_PATH", "LD_AUDIT"):
        result = host.run("start", "-e", f"{name}=/tmp/x.so", "--", "echo", "hi", identity="alice",
                          check=False)
        assert result.returncode == 5, result
        assert name in result.stderr.decode()
    assert host.run("start", "-e", "GREETING=hi", "--", "echo", "hi", identity="alice").returncode == 0


# --- 2. the working directory and the program are looked at as the job's user ----------------


def test_paths_root_can_see_look_missing_to_the_user(served: Host) -> None:
    with public_dir() as top:
        secret = top / "secret"
        secret.mkdir(mode=0o700)
        (secret / "data").write_text("root's secret\n")
        tool = secret / "tool"
        tool.write_text("#!/bin/sh\ncat data\n")
        tool.chmod(0o755)
        attempts = {
            "cwd exists": ("--cwd", str(secret), "--", "cat", "data"),
            "cwd missing": ("--cwd", str(secret / "nope"), "--", "cat", "data"),
            "program exists": ("--", str(tool)),
            "program missing": ("--", str(secret / "nope")),
        }
        answers = {}
        for name, argv in attempts.items():
            result = served.run("start", *argv, identity="alice", check=False)
            assert result.returncode == 6, (name, result)
            text = result.stderr.decode()
            for path in (tool, secret / "nope", secret):
                text = text.replace(str(path), "X")
            answers[name] = text
        assert answers["cwd exists"] == answers["cwd missing"]
        assert answers["program exists"] == answers["program missing"]
        assert "root's secret" not in "".join(answers.values())
        # The admin's jobs run as root and may go there.
        job = served.start("cat", "data", options=("--cwd", str(secret)))
        assert served.run("tail", job).stdout == b"root's secret\n"


def test_a_directory_changed_after_the_check_is_entered_as_the_user(served: Host) -> None:
    """The check and the entry are both the user's: swap the working directory (a symlink)
    between an open directory and a root-only one while starting jobs, and no job ever
    reads the root-only one."""
    with public_dir(0o1777) as top:
        secret = top / "secret"
        secret.mkdir(mode=0o700)
        (secret / "data").write_text("root's secret\n")
        public = top / "public"
        public.mkdir(mode=0o755)
        (public / "data").write_text("public\n")
        link = top / "cwd"
        os.symlink(public, link)
        stop = threading.Event()

        def swap() -> None:
            n = 0
            while not stop.is_set():
                tmp = top / "cwd.tmp"
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                os.symlink((public, secret)[n % 2], tmp)
                os.replace(tmp, link)
                n += 1

        async def attack() -> list[bytes]:
            outputs = []
            async with client(served, "alice") as jobs:
                for _ in range(60):
                    with contextlib.suppress(JobsError):
                        job = await jobs.start("cat", ["data"], working_dir=str(link))
                        outputs.append((await output_of(jobs, job.job_id))[0])
            return outputs

        racer = threading.Thread(target=swap)
        racer.start()
        try:
            outputs = trio.run(attack)
        finally:
            stop.set()
            racer.join()
        assert outputs, "every start was refused: the race was not run"
        assert all(b"root's secret" not in out for out in outputs), outputs


# --- 3. the file that runs is the file the policy checked --------------------------------------


def _evil_tree(top: Path) -> Path:
    evil = top / "evil"
    evil.write_text(f"#!/bin/sh\necho {EVIL_OUTPUT.decode()}\n")
    evil.chmod(0o755)
    fake = top / "usr" / "bin"
    fake.mkdir(parents=True)
    shutil.copy(evil, fake / "echo")
    (fake / "echo").chmod(0o755)
    return evil


def test_a_swapped_symlink_never_runs_another_program(host: Host) -> None:
    host.start_server("--policy", str(restricted_policy(host)))
    with public_dir(0o1777) as top:
        evil = _evil_tree(top)
        link = top / "link"
        os.symlink("/usr/bin/echo", link)
        stop = threading.Event()
        swaps = 0

        def swap() -> None:
            nonlocal swaps
            targets = ("/usr/bin/echo", str(evil))
            while not stop.is_set():
                tmp = top / "link.tmp"
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                os.symlink(targets[swaps % 2], tmp)
                os.replace(tmp, link)
                swaps += 1

        async def attack() -> tuple[list[bytes], int]:
            outputs, refused = [], 0
            codes: set[StatusCode] = set()
            async with client(host, "alice") as jobs:
                for _ in range(300):
                    try:
                        job = await jobs.start(str(link), ["hello"])
                    except JobsError as exc:
                        codes.add(exc.code)
                        refused += 1
                        continue
                    outputs.append((await output_of(jobs, job.job_id))[0])
            assert codes <= {StatusCode.PERMISSION_DENIED}, codes
            return outputs, refused

        racer = threading.Thread(target=swap)
        racer.start()
        try:
            outputs, refused = trio.run(attack)
        finally:
            stop.set()
            racer.join()
        assert swaps > 300, "the race was not run"
        assert outputs, refused  # both sides of the race were hit
        assert refused, len(outputs)
        assert all(out == b"hello\n" for out in outputs), set(outputs)


def test_proc_and_dev_fd_paths_run_nothing_but_the_checked_file(host: Host) -> None:
    host.start_server("--policy", str(restricted_policy(host)))
    with public_dir(0o1777) as top:
        _evil_tree(top)

        async def attack() -> list[bytes]:
            outputs = []
            codes: set[StatusCode] = set()
            async with client(host, "alice") as jobs:
                for command in ("/proc/self/cwd/usr/bin/echo", "/proc/thread-self/cwd/usr/bin/echo",
                                "/proc/self/root/usr/bin/echo", "/dev/fd/0", "/dev/stdin",
                                "/proc/self/fd/3", "/proc/self/exe", "usr/bin/echo", "./usr/bin/echo"):
                    try:
                        job = await jobs.start(command, ["hello"], working_dir=str(top))
                    except JobsError as exc:
                        codes.add(exc.code)
                        continue
                    outputs.append((await output_of(jobs, job.job_id))[0])
            assert codes <= {StatusCode.PERMISSION_DENIED, StatusCode.INVALID_ARGUMENT}, codes
            return outputs

        outputs = trio.run(attack)
        assert outputs, "every path was refused: nothing was tried"
        assert all(out == b"hello\n" for out in outputs), outputs


# --- 4. no_new_privs and no capabilities: setuid binaries grant nothing -----------------------


def test_a_setuid_root_program_gives_the_user_nothing(served: Host) -> None:
    with public_dir() as top:
        suid = top / "id"
        shutil.copy("/usr/bin/id", suid)
        os.chown(suid, 0, 0)
        suid.chmod(0o4755)
        check = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(suid), "-u"],
                               capture_output=True, check=True, timeout=30)
        assert check.stdout == b"0\n", "the setuid copy does not work outside: the attack is not armed"
        job = served.start(str(suid), "-u", identity="alice")
        out = served.run("tail", job, identity="alice").stdout
        assert int(out) > 0
        job = served.start("grep", "-E", "^(NoNewPrivs|CapBnd|CapPrm|CapEff)", "/proc/self/status",
                           identity="alice")
        fields = dict(line.split(":") for line in served.run("tail", job, identity="alice").stdout.decode().splitlines())
        assert fields["NoNewPrivs"].strip() == "1"
        assert all(int(fields[c], 16) == 0 for c in ("CapBnd", "CapPrm", "CapEff"))


# --- 5. two identities never share a Unix user --------------------------------------------------


def test_alice_and_bob_cannot_signal_or_read_each_other(served: Host) -> None:
    victim = served.start("sh", "-c", "echo ready; exec sleep 120", identity="alice")
    with subprocess.Popen([*served_cli(), "tail", victim], env=served.env("alice"), stdout=subprocess.PIPE) as tail:
        assert tail.stdout is not None
        assert tail.stdout.readline() == b"ready\n"
        pid = _pid_of_job_running("sleep 120")
        uid_alice = os.stat(f"/proc/{pid}").st_uid
        probe = served.start(
            "sh", "-c",
            f"kill -0 {pid} 2>/dev/null && echo SIGNALLED; cat /proc/{pid}/environ 2>/dev/null && echo READ; "
            f"kill -9 {pid} 2>/dev/null && echo KILLED; id -u",
            identity="bob",
        )
        out = served.run("tail", probe, identity="bob").stdout.decode()
        for word in ("SIGNALLED", "READ", "KILLED"):
            assert word not in out, out
        uid_bob = int(out.split()[-1])
        assert uid_alice != uid_bob
        assert 0 not in (uid_alice, uid_bob)
        assert served.run("status", victim, identity="alice").stdout.decode().count("running") == 1
        served.run("stop", victim, "--grace", "0s", identity="alice")
        tail.wait(timeout=60)


def served_cli() -> tuple[str, ...]:
    from e2e.conftest import CLI

    return CLI


def _pid_of_job_running(cmdline: str) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "cmdline").read_bytes().replace(b"\0", b" ").strip().endswith(cmdline.encode()):
                return int(entry.name)
    raise AssertionError(f"no process runs {cmdline!r}")


def test_dynamic_users_are_stable_across_restarts(host: Host) -> None:
    host.start_server()
    first = host.start("id", "-u", identity="alice")
    uid = host.run("tail", first, identity="alice").stdout
    host.stop_server()
    host.start_server()
    again = host.start("id", "-u", identity="alice")
    assert host.run("tail", again, identity="alice").stdout == uid
    assert re.fullmatch(rb"\d+\n", uid)
    assert int(uid) > 65535
    saved = host.home / "dynamic-users.json"
    assert saved.stat().st_mode & 0o777 == 0o600


def test_fifos_and_devices_named_as_programs_never_block_the_server(served: Host) -> None:
    """The server opens user paths with O_PATH: a FIFO nobody writes, a device, a directory
    each get an answer at once, and the server keeps answering others meanwhile."""
    with public_dir(0o1777) as top:
        fifo = top / "fifo"
        os.mkfifo(fifo, 0o777)
        for command, cwd in ((str(fifo), "/"), ("/dev/zero", "/"), ("echo", str(fifo)), (str(top), "/")):
            result = served.run("start", "--cwd", cwd, "--", command, identity="alice", check=False,
                                timeout=30)
            assert result.returncode == 6, (command, cwd, result)
        job = served.start("echo", "still serving", identity="bob")
        assert served.run("tail", job, identity="bob").stdout == b"still serving\n"


# --- 9. one identity's jobs together stay within the identity's caps ---------------------------


def _cgroup_dir(pid: int, controller: str) -> Path | None:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/")
    return None


@pytest.mark.cgroups
def test_each_identitys_jobs_share_a_cgroup_with_the_policys_totals(host: Host) -> None:
    policy = host.home.parent / "policy.toml"
    policy.write_text(
        '[defaults]\nprograms = ["*"]\n[identities.admin]\nadmin = true\nrun_as = ""\n'
        "[identities.alice.max_total]\npids_max = 40\nmemory_bytes = 536870912\n"
        "[identities.bob]\n"
    )
    host.start_server("--policy", str(policy))
    if "cgroup v1" not in host.banner:
        pytest.skip(f"this check reads cgroup v1 files; the server said: {host.banner.splitlines()[1]}")
    groups = {}
    for who in ("alice", "bob"):
        job = host.start("sh", "-c", "echo up; exec sleep 60", identity=who)
        with subprocess.Popen([*served_cli(), "tail", job], env=host.env(who), stdout=subprocess.PIPE) as tail:
            assert tail.stdout is not None
            assert tail.stdout.readline() == b"up\n"
            pid = _pid_of_job_running("sleep 60")
            job_dir = _cgroup_dir(pid, "pids")
            assert job_dir is not None
            assert job not in str(job_dir)  # opaque names
            groups[who] = job_dir.parent
            if who == "alice":
                assert (job_dir.parent / "pids.max").read_text().strip() == "40"
                memory = _cgroup_dir(pid, "memory")
                assert memory is not None
                assert (memory.parent / "memory.limit_in_bytes").read_text().strip() == str(512 << 20)
            host.run("stop", job, "--grace", "0s", identity=who)
            tail.wait(timeout=60)
    assert groups["alice"] != groups["bob"]
