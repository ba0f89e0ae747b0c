"""The commands that follow output on trio: ``tail`` and ``start -f``. Each returns the exit code.

The one-shot commands are in :mod:`.oneshot` (no trio).
"""

from __future__ import annotations

import errno
import sys
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from ..client import JobsClient, JobsError
from ..rpc import RpcError
from .common import client_context, job_id_of, limits_of, server_of, start_request_of, stdout
from .errors import (
    EXIT_BROKEN_PIPE,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
    exit_code_for,
)
from .escape import terminal_safe
from .sink import StdoutWriter

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator

    from ..client import JobInfo

@asynccontextmanager
async def open_client(args: argparse.Namespace) -> AsyncIterator[JobsClient]:
    server = server_of(args)
    ctx = client_context(args)
    try:
        async with JobsClient.connect(server, ssl_context=ctx) as client:
            yield client
    except JobsError as exc:
        raise CliError(exc.message, exit_code_for(exc.code)) from None
    except RpcError as exc:
        raise CliError(f"{server}: {exc.message or exc.code.name}", exit_code_for(exc.code)) from None
    except (OSError, trio.BrokenResourceError) as exc:
        raise CliError(f"cannot talk to {server}: {exc}; is 'trio-jobs serve' running there?", EXIT_UNAVAILABLE) from None


async def cmd_start_follow(args: argparse.Namespace) -> int:
    """``start -f``: start, then follow the output like ``tail`` (the one-shot ``start`` is
    in :mod:`.oneshot`)."""
    argv, env = start_request_of(args)
    async with open_client(args) as client:
        job = await client.start(argv[0], argv[1:], env=env, working_dir=args.cwd or "", limits=limits_of(args))
        # With -f stdout carries only the job's bytes (like tail, so `start -f -- cat f > copy`
        # is byte-exact); the id still reaches the user, on stderr.
        print(f"trio-jobs: job {terminal_safe(job.job_id)}", file=sys.stderr, flush=True)
        return await _follow(client, job.job_id, offset=0, follow=True)


async def cmd_tail(args: argparse.Namespace) -> int:
    job_id = job_id_of(args)
    if args.offset < 0:
        raise CliError("--offset must be 0 or more", EXIT_USAGE)
    async with open_client(args) as client:
        return await _follow(client, job_id, offset=args.offset, follow=not args.no_follow)


async def _follow(client: JobsClient, job_id: str, *, offset: int, follow: bool) -> int:
    writer = StdoutWriter(stdout().fileno())
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
