"""What every client command needs before its call: the server, the credentials, the job
id, and checked request fields. No trio here: the one-shot commands (:mod:`.oneshot`) must
stay cheap to import."""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING, Final, TextIO

from ..calls import DEFAULT_SERVER, JobLimits, parse_server
from ..security.paths import state_home_name
from .errors import EXIT_CONFIG, EXIT_ERROR, EXIT_USAGE, CliError

if TYPE_CHECKING:
    import argparse
    import ssl

DEFAULT_IDENTITY: Final = "admin"
_IDENTITY_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


def server_of(args: argparse.Namespace) -> str:
    """``--server``, else ``$TRIO_JOBS_SERVER``, else the default; checked."""
    server: str = args.server or os.environ.get("TRIO_JOBS_SERVER") or DEFAULT_SERVER
    try:
        parse_server(server)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    return server


def credentials(args: argparse.Namespace) -> tuple[str, str, str]:
    """The paths of the client certificate, its key and the CA certificate (strings: the
    one-shot commands do not import pathlib)."""
    identity = args.identity or os.environ.get("TRIO_JOBS_IDENTITY") or DEFAULT_IDENTITY
    if not _IDENTITY_RE.fullmatch(identity):
        raise CliError(f"invalid identity {identity!r}: use a name like admin, alice or bob", EXIT_USAGE)
    pki = os.path.join(state_home_name(), "pki")
    cert = args.cert or os.path.join(pki, f"{identity}.crt")
    key = args.key or os.path.join(pki, f"{identity}.key")
    ca = args.ca or os.path.join(pki, "ca.crt")
    for what, path in (("client certificate", cert), ("client key", key), ("CA certificate", ca)):
        if not os.path.isfile(path):
            raise CliError(
                f"no {what} at {path}: run 'trio-jobs serve' once (it creates the development PKI "
                "in TRIO_JOBS_HOME), set TRIO_JOBS_HOME/--identity, or pass --cert/--key/--ca",
                EXIT_CONFIG,
            )
    return cert, key, ca


def client_context(args: argparse.Namespace) -> ssl.SSLContext:
    """The client's TLS context from the command line's credentials."""
    cert, key, ca = credentials(args)
    from ..security.errors import SecurityError
    from ..security.tls import client_ssl_context

    try:
        return client_ssl_context(cert=cert, key=key, ca=ca)
    except (SecurityError, OSError) as exc:
        raise CliError(f"cannot use the client certificate {cert}: {exc}", EXIT_CONFIG) from None


def job_id_of(args: argparse.Namespace) -> str:
    positional, option = args.job_pos, args.job
    if positional and option and positional != option:
        raise CliError(f"two different jobs given ({positional} and --job {option}); give one", EXIT_USAGE)
    job = positional or option
    if not job:
        raise CliError("no job given: pass JOB or --job JOB (see 'trio-jobs list')", EXIT_USAGE)
    return utf8_text("the job id", str(job))


def utf8_text(what: str, value: str) -> str:
    """``value``, if it can travel as a protobuf string; else a usage error.

    A command-line word that is not UTF-8 reaches Python as lone surrogates
    (surrogateescape), which protobuf refuses to encode: say so instead of failing inside.
    """
    try:
        value.encode()
    except UnicodeEncodeError:
        raise CliError(
            f"{what} '{value}' is not valid UTF-8: the API carries text only "
            "(give the program binary data in a file or through a shell)",
            EXIT_USAGE,
        ) from None
    return value


def stdout() -> TextIO:
    """``sys.stdout``; a clear error when the command was started with it closed (``>&-``),
    where Python leaves it None."""
    if sys.stdout is None:
        raise CliError("standard output is closed: nowhere to print the answer", EXIT_ERROR)
    return sys.stdout


def print_line(text: str) -> None:
    out = stdout()
    out.write(text + "\n")
    out.flush()


def limits_of(args: argparse.Namespace) -> JobLimits:
    return JobLimits(
        cpu_millis=args.cpus,
        memory_bytes=args.memory,
        pids_max=args.pids,
        io_read_bps=args.io_read_bps,
        io_write_bps=args.io_write_bps,
        io_read_iops=args.io_read_iops,
        io_write_iops=args.io_write_iops,
    )


def env_of(pairs: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise CliError(f"invalid -e {pair!r}: use -e NAME=VALUE", EXIT_USAGE)
        env[name] = value
    return env


def start_request_of(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The job's argv and environment from ``start``'s command line, checked."""
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise CliError("no command given: trio-jobs start [OPTIONS] -- CMD [ARGS...]", EXIT_USAGE)
    env = env_of(args.env)
    for i, word in enumerate(argv):
        utf8_text("the command" if i == 0 else f"argument {i}", word)
    for pair in args.env or ():
        utf8_text("the environment variable", pair)
    utf8_text("the working directory", args.cwd or "")
    return argv, env
