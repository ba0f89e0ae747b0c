"""``certs-gen`` / ``trio-jobs certs``: create the development PKI and issue certificates.

    certs-gen init [--dir D] [--san NAME]... [--force]
    certs-gen issue NAME [--dir D] [--force]
    certs-gen issue --server [--san NAME]... [--dir D] [--force]

The default directory is ``$TRIO_JOBS_HOME/pki`` (see :mod:`trio_jobs.security.paths`).
Errors are one line on stderr: exit status 2 for bad usage, 1 for a failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from trio_jobs.security.errors import SecurityError
from trio_jobs.security.paths import pki_dir
from trio_jobs.security.pki import DEV_IDENTITIES, init_dev_pki, issue_client, issue_server

if TYPE_CHECKING:
    from collections.abc import Sequence


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and calling ``sys.exit``."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def build_parser(prog: str = "certs-gen") -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Create the trio-jobs development PKI.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    default_dir = f"default: {pki_dir()}"

    init = sub.add_parser("init", help=f"create ca, server, {', '.join(DEV_IDENTITIES)}")
    init.add_argument("--dir", type=Path, help=f"PKI directory ({default_dir})")
    init.add_argument("--san", action="append", default=[], help="extra server name or IP")
    init.add_argument("--force", action="store_true", help="replace existing files")

    issue = sub.add_parser("issue", help="issue a client certificate (or --server) from the CA")
    issue.add_argument("name", nargs="?", help="client identity (the certificate's CN)")
    issue.add_argument("--server", action="store_true", help="issue server.crt instead")
    issue.add_argument("--san", action="append", default=[], help="extra server name or IP")
    issue.add_argument("--dir", type=Path, help=f"PKI directory ({default_dir})")
    issue.add_argument("--force", action="store_true", help="replace existing files")
    return parser


def run(args: argparse.Namespace) -> str:
    """Do what ``args`` say; return the message for stdout."""
    directory: Path = args.dir if args.dir is not None else pki_dir()
    if args.command == "init":
        init_dev_pki(directory, force=args.force, sans=args.san)
        names = ", ".join(("ca", "server", *DEV_IDENTITIES))
        return f"created {names} (.crt/.key) in {directory}"
    if args.server:
        if args.name is not None:
            raise _UsageError("issue --server takes no NAME")
        crt, key = issue_server(directory, sans=args.san, force=args.force)
    else:
        if args.name is None:
            raise _UsageError("issue needs a NAME (or --server)")
        if args.san:
            raise _UsageError("--san applies to server certificates only (issue --server)")
        crt, key = issue_client(directory, args.name, force=args.force)
    return f"wrote {crt} and {key}"


def main(argv: Sequence[str] | None = None, *, prog: str = "certs-gen") -> int:
    """Entry point; returns the exit status (0 ok, 1 failure, 2 usage)."""
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
        print(run(args))
    except _UsageError as exc:
        print(f"{prog}: error: {exc} (see {prog} --help)", file=sys.stderr)
        return 2
    except SecurityError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
