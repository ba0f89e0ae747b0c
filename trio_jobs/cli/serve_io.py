"""What ``trio-jobs serve`` writes: logs on stderr, the banner and announcements on stdout.

Logs go to stderr, one line per event: ``2025-01-31T12:00:00.123Z trio-jobs: warning: ...``
on a terminal or in a file. Under systemd with stderr connected to the journal
(``$JOURNAL_STREAM`` names stderr's device and inode, as systemd.exec(5) says to check), the
journal stamps the time and the unit name itself, so a line is only ``<4>warning: ...``: the
``<N>`` prefix is the syslog priority, which journald strips and records (``journalctl -p``).
Control characters in a message (a client's identity, a path) are escaped (``escape.py``), so
a log line is always one line and never drives a terminal. The package logs at INFO, except the rpc layer's
per-connection notes (a client's failed handshake...), which an anonymous peer can cause at
will and which are therefore kept at WARNING.

stdout carries the banner (its first line is the address, for scripts) and the shutdown
announcements. Losing it -- a pipe whose reader exited, a closed terminal -- must never end
the server: the first failed write points stdout at /dev/null (so neither later prints nor
the interpreter's final flush fail again), logs one line on stderr carrying what could not
be printed (the address), and later announcements go to the log instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Final, TextIO

from .escape import lines_safe, terminal_safe

if TYPE_CHECKING:
    from collections.abc import Mapping

log = logging.getLogger("trio_jobs.cli.serve")

PACKAGE_LOGGER: Final = "trio_jobs"
QUIET_LOGGERS: Final = ("trio_jobs.rpc",)  # at WARNING: see the module docstring
_PRIORITY: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def connected_to_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True if ``stream`` is the journal stream systemd set up (``$JOURNAL_STREAM=dev:ino``).

    The variable alone is not enough: a program started from a service inherits it with its
    own stderr redirected elsewhere; systemd.exec(5) says to compare device and inode.
    """
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class TerminalSafeFormatter(logging.Formatter):
    """A log formatter for a terminal: the message is escaped onto one line; a traceback
    keeps its line breaks, and each of its lines is escaped (an exception's message can
    quote what a client sent)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return terminal_safe(super().formatMessage(record))

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return lines_safe(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return lines_safe(super().formatStack(stack_info))


class _Formatter(TerminalSafeFormatter):
    def __init__(self, *, journal: bool) -> None:
        super().__init__()
        self._journal = journal

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        text = level + terminal_safe(record.getMessage())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)  # each line escaped
        if self._journal:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z trio-jobs: {text}"


class _Handler(logging.StreamHandler[TextIO]):
    """A stderr handler for which a lost stderr is not an error worth a traceback."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # stderr is gone (EPIPE, EIO): there is nowhere to say so
        super().handleError(record)


def configure_logging(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> None:
    """Send the package's logs to ``stream`` (stderr) in the format described above."""
    stream = sys.stderr if stream is None else stream
    handler = _Handler(stream)
    handler.setFormatter(_Formatter(journal=connected_to_journal(stream, os.environ if environ is None else environ)))
    package = logging.getLogger(PACKAGE_LOGGER)
    for old in [h for h in package.handlers if isinstance(h, _Handler)]:
        package.removeHandler(old)  # configured twice (tests): one line per event still
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    package.propagate = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class _Stdout:
    lost = False


def announce(text: str) -> None:
    """Print ``text`` on stdout; if stdout is gone, say its first line in the log instead."""
    if not _Stdout.lost:
        try:
            print(text, flush=True)
            return
        except OSError as exc:  # BrokenPipeError, or EIO from a terminal that hung up
            _Stdout.lost = True
            _point_stdout_at_devnull()
            log.warning("stdout is closed (%s); the server keeps running without it", exc.strerror or exc)
    first = text.splitlines()[0] if text else ""
    log.info("%s", first.removeprefix("trio-jobs: ").removeprefix("trio-jobs "))


def _point_stdout_at_devnull() -> None:
    """Later writes to fd 1 (and the interpreter's final flush of what is still buffered)
    then succeed and go nowhere, instead of failing again at exit (exit status 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):
        pass  # no fd 1 to replace (a StringIO in a test): later prints simply fail again


def say(text: str) -> None:
    """One line on stderr that must never fail the command (before the logging starts, or
    at the very end)."""
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr, flush=True)
