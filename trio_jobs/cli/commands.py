"""The client commands: start, stop, status, tail, list. Each returns the exit code."""

from __future__ import annotations

import errno
import os
import re
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from ..client import JobLimits, JobsClient, JobsError, parse_server
from ..rpc import RpcError
from ..security.errors import SecurityError
from ..security.paths import state_home
from .errors import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
    exit_code_for,
)
from .escape import terminal_safe
from .output import list_table, status_table, to_json
from .sink import StdoutWriter

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator

    from ..client import JobInfo

DEFAULT_SERVER: Final = "localhost:4567"
DEFAULT_IDENTITY: Final = "admin"
_IDENTITY_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
EXIT_BROKEN_PIPE: Final = 141  # 128 + SIGPIPE, what a shell reports for `tail | head`


def _credentials(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    identity = args.identity or os.environ.get("TRIO_JOBS_IDENTITY") or DEFAULT_IDENTITY
    if not _IDENTITY_RE.fullmatch(identity):
        raise CliError(f"invalid identity {identity!r}: use a name like admin, alice or bob", EXIT_USAGE)
    pki = state_home() / "pki"
    cert = Path(args.cert) if args.cert else pki / f"{identity}.crt"
    key = Path(args.key) if args.key else pki / f"{identity}.key"
    ca = Path(args.ca) if args.ca else pki / "ca.crt"
    for what, path in (("client certificate", cert), ("client key", key), ("CA certificate", ca)):
        if not path.is_file():
            raise CliError(
                f"no {what} at {path}: run 'trio-jobs serve' once (it creates the development PKI "
                "in TRIO_JOBS_HOME), set TRIO_JOBS_HOME/--identity, or pass --cert/--key/--ca",
                EXIT_CONFIG,
            )
    return cert, key, ca


@asynccontextmanager
async def open_client(args: argparse.Namespace) -> AsyncIterator[JobsClient]:
    server = args.server or os.environ.get("TRIO_JOBS_SERVER") or DEFAULT_SERVER
    try:
        parse_server(server)
    except ValueError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    cert, key, ca = _credentials(args)
    try:
        from ..security.tls import client_ssl_context

        ctx = client_ssl_context(cert=cert, key=key, ca=ca)
    except (SecurityError, OSError) as exc:
        raise CliError(f"cannot use the client certificate {cert}: {exc}", EXIT_CONFIG) from None
    try:
        async with JobsClient.connect(server, ssl_context=ctx) as client:
            yield client
    except JobsError as exc:
        raise CliError(exc.message, exit_code_for(exc.code)) from None
    except RpcError as exc:
        raise CliError(f"{server}: {exc.message or exc.code.name}", exit_code_for(exc.code)) from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise CliError(f"cannot talk to {server}: {exc}; is 'trio-jobs serve' running there?", EXIT_UNAVAILABLE) from None


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


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


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


async def cmd_start(args: argparse.Namespace) -> int:
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
    async with open_client(args) as client:
        job = await client.start(argv[0], argv[1:], env=env, working_dir=args.cwd or "", limits=limits_of(args))
        if not args.follow:
            _print(terminal_safe(job.job_id))
            return EXIT_OK
        # With -f stdout carries only the job's bytes (like tail, so `start -f -- cat f > copy`
        # is byte-exact); the id still reaches the user, on stderr.
        print(f"trio-jobs: job {terminal_safe(job.job_id)}", file=sys.stderr, flush=True)
        return await _follow(client, job.job_id, offset=0, follow=True)


async def cmd_stop(args: argparse.Namespace) -> int:
    job_id = job_id_of(args)
    async with open_client(args) as client:
        outcome = await client.stop(job_id, grace=args.grace)
    if args.json:  # the whole StopJobResponse (DESIGN §6): status and force_ended
        from ..v1 import jobs_pb2 as pb

        _print(to_json(pb.StopJobResponse(status=outcome.job.proto, force_ended=outcome.force_ended)))
    else:
        from .output import describe_state

        how = "stopped" if outcome.force_ended else "had already ended"
        sys.stderr.write(f"job {terminal_safe(job_id)} {how}: {terminal_safe(describe_state(outcome.job))}\n")
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    job_id = job_id_of(args)
    async with open_client(args) as client:
        job = await client.status(job_id)
    _print(to_json(job.proto) if args.json else status_table(job))
    return EXIT_OK


async def cmd_list(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        response = await client.list_proto(all_users=args.all)
    if args.json:
        _print(to_json(response))
    else:
        from ..client import JobInfo

        _print(list_table([JobInfo.from_proto(j) for j in response.jobs], show_owner=args.all))
    return EXIT_OK


async def cmd_tail(args: argparse.Namespace) -> int:
    job_id = job_id_of(args)
    if args.offset < 0:
        raise CliError("--offset must be 0 or more", EXIT_USAGE)
    async with open_client(args) as client:
        return await _follow(client, job_id, offset=args.offset, follow=not args.no_follow)


async def _follow(client: JobsClient, job_id: str, *, offset: int, follow: bool) -> int:
    writer = StdoutWriter(sys.stdout.fileno())
    try:
        final = await client.tail(job_id, writer.write, offset=offset, follow=follow)
    except BrokenPipeError:
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            return EXIT_BROKEN_PIPE
        raise CliError(f"cannot write the output: {exc.strerror}", EXIT_ERROR) from None
    if not follow:
        return EXIT_OK
    return _job_exit(final)


def _job_exit(job: JobInfo) -> int:
    status = job.exit_status
    if status is None:
        shown = terminal_safe(job.job_id)
        sys.stderr.write(f"trio-jobs: job {shown} is {job.state}: its exit status is unknown\n")
        return EXIT_ERROR
    return status
