"""Exit codes of the ``trio-jobs`` command and the one exception the commands raise.

Every failure reaches the user as one line ``trio-jobs: error: ...`` on stderr and one of
these exit codes (documented in docs/cli.md and ``trio-jobs --help``). ``tail`` and
``start -f`` exit with the *job's* status instead when they ran to the end.
"""

from __future__ import annotations

from typing import Final

from ..rpc import StatusCode

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1  # any other failure reported by the server
EXIT_USAGE: Final = 2  # bad command line (argparse's convention)
EXIT_UNAVAILABLE: Final = 3  # cannot connect, connection lost, or server shutting down
EXIT_NOT_FOUND: Final = 4  # no such job (or not yours)
EXIT_DENIED: Final = 5  # the policy does not allow it
EXIT_INVALID: Final = 6  # the server rejected the request (bad program, limit above cap, ...)
EXIT_QUOTA: Final = 7  # too many running jobs
EXIT_CONFIG: Final = 8  # local setup: missing/invalid certificates, policy, data dir, platform
EXIT_INTERRUPTED: Final = 130  # Ctrl-C (128 + SIGINT)
EXIT_BROKEN_PIPE: Final = 141  # 128 + SIGPIPE: the reader of stdout went away (`... | head`)

EXIT_CODES_HELP: Final = """\
exit codes:
  0    success
  1    other error reported by the server
  2    bad command line
  3    cannot connect / connection lost / server shutting down
  4    no such job (or not yours)
  5    permission denied by the server's policy
  6    request rejected (program not executable, limit above your cap, ...)
  7    quota: too many running jobs
  8    local configuration (certificates, policy file, data directory, platform)
  130  interrupted (Ctrl-C)
  tail and start -f exit with the job's exit code, or 128 + signal if it was killed
  (a job lost in a server crash: 1)."""

_BY_STATUS: Final = {
    StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    StatusCode.PERMISSION_DENIED: EXIT_DENIED,
    StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    StatusCode.INVALID_ARGUMENT: EXIT_INVALID,
    StatusCode.OUT_OF_RANGE: EXIT_INVALID,
    StatusCode.RESOURCE_EXHAUSTED: EXIT_QUOTA,
}


def exit_code_for(code: StatusCode) -> int:
    return _BY_STATUS.get(code, EXIT_ERROR)


class CliError(Exception):
    """A failure to report as one line and an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
