"""Running under systemd: readiness notification, journal-friendly logs, a closed stdout,
the unit file, and (slow) the unit on a real systemd in the cgroup v2 VM."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

import pytest
from e2e.conftest import CLI, COMMAND_TIMEOUT, STARTUP_TIMEOUT, read_until

from operations._systemd import NotifyListener
from trio_jobs import sdnotify
from trio_jobs.cli import serve_io

if TYPE_CHECKING:
    from collections.abc import Iterator

    from e2e.conftest import Host

REPO: Final = Path(__file__).resolve().parents[2]
UNIT: Final = REPO / "contrib" / "systemd" / "trio-jobs.service"
INSTALLED_AT: Final = "/opt/trio-jobs/bin/trio-jobs"


# -- sd_notify ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["abstract", "path"])
def test_notify_reaches_the_socket(kind: str) -> None:
    if kind == "abstract":
        listener = NotifyListener(f"@trio-jobs-test/{uuid.uuid4().hex}")
    else:
        # sun_path holds 108 bytes: a short directory of our own, not pytest's tmp_path.
        directory = Path("/tmp") / f"tj-{uuid.uuid4().hex[:8]}"
        directory.mkdir()
        listener = NotifyListener(str(directory / "notify"))
    try:
        env = {"NOTIFY_SOCKET": listener.name}
        assert sdnotify.ready(environ=env)
        assert listener.expect("READY=1", timeout=5) == "READY=1"
        assert sdnotify.reloading(environ=env)
        message = listener.expect("RELOADING=1", timeout=5)
        usec = int(message.split("\n")[1].removeprefix("MONOTONIC_USEC="))
        assert 0 < usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert sdnotify.stopping(environ=env)
        assert listener.expect("STOPPING=1", timeout=5) == "STOPPING=1"
    finally:
        listener.close()
        if kind == "path":
            shutil.rmtree(Path(listener.name).parent)


@pytest.mark.parametrize("name", ["", "relative/notify", "/nonexistent/trio-jobs/notify", "@nobody-listens-here"])
def test_notify_without_a_listener_is_not_an_error(name: str) -> None:
    assert sdnotify.ready(environ={"NOTIFY_SOCKET": name} if name else {}) is False


def test_notify_to_a_socket_that_is_not_a_datagram_socket_is_not_an_error() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        path = Path("/tmp") / f"tj-{uuid.uuid4().hex[:8]}.sock"
        stream.bind(str(path))
        try:
            assert sdnotify.ready(environ={"NOTIFY_SOCKET": str(path)}) is False
        finally:
            path.unlink()


def test_serve_notifies_ready_once_listening_and_stopping_when_draining(
    host: Host, notify_socket: NotifyListener
) -> None:
    host.start_server()
    assert notify_socket.expect("READY=1") == "READY=1"
    # It listens by then: a call works.
    host.run("list")
    assert host.server is not None
    host.server.send_signal(signal.SIGTERM)
    assert notify_socket.expect("STOPPING=1") == "STOPPING=1"
    assert host.server.wait(timeout=COMMAND_TIMEOUT) == 0
    host.server.stdout.close()  # type: ignore[union-attr]
    host.server = None
    assert notify_socket.received == ["READY=1", "STOPPING=1"]


# -- logs --------------------------------------------------------------------------------


@pytest.fixture
def package_logger() -> Iterator[logging.Logger]:
    """The package logger, restored afterwards (configure_logging changes it)."""
    logger = logging.getLogger(serve_io.PACKAGE_LOGGER)
    saved = (logger.handlers[:], logger.level, logger.propagate)
    rpc = logging.getLogger("trio_jobs.rpc")
    rpc_level = rpc.level
    try:
        yield logger
    finally:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]
        rpc.setLevel(rpc_level)


def _log_through(stream: TextIO, environ: dict[str, str]) -> None:
    serve_io.configure_logging(stream, environ)
    logging.getLogger("trio_jobs.reload").info("reloaded: policy \x1b[2J%s", "x\ny")
    logging.getLogger("trio_jobs.reload").warning("reload failed")
    logging.getLogger("trio_jobs.rpc._transport").info("TLS handshake failed: from anyone")


def test_logs_on_a_terminal_or_file_carry_a_timestamp(tmp_path: Path, package_logger: logging.Logger) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        # JOURNAL_STREAM inherited from a service but naming another file: not the journal.
        _log_through(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
    lines = path.read_text().splitlines()
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z trio-jobs: "
    assert re.fullmatch(stamp + r"reloaded: policy \\x1b\[2Jx\\ny", lines[0]), lines
    assert re.fullmatch(stamp + "warning: reload failed", lines[1]), lines
    assert len(lines) == 2, lines  # the rpc layer's per-connection notes stay below WARNING


def test_logs_to_the_journal_carry_a_priority_and_no_timestamp(tmp_path: Path, package_logger: logging.Logger) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream:
        st = os.fstat(stream.fileno())
        _log_through(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert path.read_text().splitlines() == ["<6>reloaded: policy \\x1b[2Jx\\ny", "<4>warning: reload failed"]


def test_serve_under_the_journal_logs_without_timestamps(
    host: Host, notify_socket: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Host.start_server opens logs/server-1.stderr with "wb": it keeps this inode.
    stderr = host.logs / "server-1.stderr"
    stderr.touch()
    st = stderr.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    host.start_server()
    notify_socket.expect("READY=1")
    assert host.server is not None
    host.server.send_signal(signal.SIGHUP)
    notify_socket.expect("RELOADING=1")
    notify_socket.expect("READY=1")
    lines = [ln for ln in host.server_stderr().splitlines() if "reloaded:" in ln]
    assert len(lines) == 1, host.server_stderr()
    assert lines[0].startswith("<6>reloaded: built-in policy unchanged;"), lines


# -- a closed stdout ---------------------------------------------------------------------

_LOGGED_ADDRESS: Final = re.compile(rb"listening on (\S+):(\d+)")


def test_serve_with_stdout_closed_from_the_start_keeps_serving(host: Host) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: the banner gets EPIPE
    try:
        proc = subprocess.Popen(
            [*CLI, "serve", "--port", "0", "--cgroup-parent", host.cgroup_parent],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=host.env(),
        )
    finally:
        os.close(write_end)
    host.server = proc
    assert proc.stderr is not None
    # The address that could not be printed is in the log instead.
    log = read_until(proc.stderr, b"listening on", STARTUP_TIMEOUT)
    log += read_until(proc.stderr, b"\n", STARTUP_TIMEOUT) if not log.endswith(b"\n") else b""
    assert b"stdout is closed" in log, log
    m = _LOGGED_ADDRESS.search(log)
    assert m is not None, log
    host.address = f"{m.group(1).decode()}:{m.group(2).decode()}"
    job = host.start("echo", "still here")
    assert host.run("tail", job).stdout == b"still here\n"
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=COMMAND_TIMEOUT)
    host.server = None
    err = (log + rest).decode()
    assert proc.returncode == 0, err
    for bad in ("internal error", "Traceback", "Exception ignored"):
        assert bad not in err, err
    assert "server stopped" in err, err


def test_serve_whose_stdout_closes_later_stops_cleanly(host: Host) -> None:
    host.start_server()
    assert host.server is not None
    assert host.server.stdout is not None
    host.server.stdout.close()  # the reader goes away: the shutdown announcement gets EPIPE
    assert host.stop_server(signal.SIGTERM) == 0, host.server_stderr()
    err = host.server_stderr()
    assert "stdout is closed" in err, err
    assert "shutting down: stopping running jobs" in err, err  # in the log instead
    for bad in ("internal error", "Traceback", "Exception ignored"):
        assert bad not in err, err


# -- the unit file -----------------------------------------------------------------------


def test_unit_file_has_what_the_design_asks_for() -> None:
    text = UNIT.read_text()
    settings = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    assert settings["Type"] == "notify"
    assert settings["Delegate"] == "yes"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["KillMode"] == "mixed"
    assert settings["StateDirectory"] == "trio-jobs"
    assert settings["Environment"] == "TRIO_JOBS_HOME=%S/trio-jobs"
    assert settings["OOMPolicy"] == "continue"
    # Longer than the server's own graceful stop (15 s) plus the forced drain (2 s).
    assert int(settings["TimeoutStopSec"]) > 17
    for breaks_delegation in ("ProtectControlGroups", "ProtectKernelTunables", "PrivateDevices", "ProtectClock"):
        assert breaks_delegation not in settings
    assert settings["ExecStart"].split()[0] == INSTALLED_AT


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # verify also checks that ExecStart's program exists: point it at this checkout's
    # entry point, the one change from the shipped file.
    here = Path(sys.executable).parent / "trio-jobs"
    if not here.is_file():
        pytest.skip(f"no trio-jobs entry point beside {sys.executable} (install the package)")
    text = UNIT.read_text()
    assert text.count(f"\nExecStart={INSTALLED_AT} ") == 1
    unit = tmp_path / "trio-jobs.service"
    unit.write_text(text.replace(f"\nExecStart={INSTALLED_AT} ", f"\nExecStart={here} "))
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == "", result.stdout + result.stderr
