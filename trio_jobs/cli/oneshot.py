"""The one-shot commands -- ``start`` (without ``-f``), ``stop``, ``status``, ``list`` -- on
the blocking client: one connection, one call (or one per ``list`` page), no event loop.

Importing trio and the rpc layer's trio half costs more than a whole call to a local
server, so these commands never import them (tests/cli/test_oneshot_imports.py checks);
``tail`` and ``start -f`` follow output on trio (:mod:`.commands`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..blocking import BlockingJobsClient
from ..calls import JobsError
from .common import (
    client_context,
    job_id_of,
    limits_of,
    print_line,
    server_of,
    start_request_of,
)
from .errors import EXIT_OK, CliError, exit_code_for
from .escape import terminal_safe

if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterator


@contextmanager
def open_blocking_client(args: argparse.Namespace) -> Iterator[BlockingJobsClient]:
    """A connected client; every failure becomes a one-line CliError."""
    server = server_of(args)
    ctx = client_context(args)
    try:
        with BlockingJobsClient.connect(server, ssl_context=ctx, timeout=None) as client:
            yield client
    except JobsError as exc:
        raise CliError(exc.message, exit_code_for(exc.code)) from None


def cmd_start(args: argparse.Namespace) -> int:
    argv, env = start_request_of(args)
    with open_blocking_client(args) as client:
        job = client.start(argv[0], argv[1:], env=env, working_dir=args.cwd or "", limits=limits_of(args))
    print_line(terminal_safe(job.job_id))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    job_id = job_id_of(args)
    with open_blocking_client(args) as client:
        outcome = client.stop(job_id, grace=args.grace)
    if args.json:  # the whole StopJobResponse (DESIGN §6): status and force_ended
        from ..v1 import jobs_pb2 as pb
        from .output import to_json

        print_line(to_json(pb.StopJobResponse(status=outcome.job.proto, force_ended=outcome.force_ended)))
    else:
        from .output import describe_state

        how = "stopped" if outcome.force_ended else "had already ended"
        sys.stderr.write(f"job {terminal_safe(job_id)} {how}: {terminal_safe(describe_state(outcome.job))}\n")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    job_id = job_id_of(args)
    with open_blocking_client(args) as client:
        job = client.status(job_id)
    if args.json:
        from .output import to_json

        print_line(to_json(job.proto))
    else:
        from .output import status_table

        print_line(status_table(job))
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    with open_blocking_client(args) as client:
        response = client.list_proto(all_users=args.all)
    if args.json:
        from .output import to_json

        print_line(to_json(response))
    else:
        from ..calls import JobInfo
        from .output import list_table

        print_line(list_table([JobInfo.from_proto(j) for j in response.jobs], show_owner=args.all))
    return EXIT_OK
