"""``trio-jobs``: argument parsing, dispatch, and the one-line error reporting.

No traceback reaches the user: a :class:`CliError` becomes ``trio-jobs: error: MESSAGE`` and
its exit code, Ctrl-C becomes ``trio-jobs: interrupted`` and 130, and anything unexpected is
reported in one line as an internal error (set ``TRIO_JOBS_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import os
import sys
from typing import TYPE_CHECKING, Any, Final, NoReturn, cast

from . import units
from .errors import (
    EXIT_BROKEN_PIPE,
    EXIT_CODES_HELP,
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CliError,
)
from .escape import terminal_safe

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

PROG = "trio-jobs"

DESCRIPTION = """\
Run Linux processes ("jobs") on a trio-jobs server over gRPC with mutual TLS.

environment:
  TRIO_JOBS_HOME      state directory: pki/, jobs.sqlite3, output files
                      (default $XDG_STATE_HOME/trio-jobs, else ~/.local/state/trio-jobs)
  TRIO_JOBS_SERVER    server address for client commands (default {default:server})
  TRIO_JOBS_IDENTITY  which certificate of TRIO_JOBS_HOME/pki to use (default {default:identity})
"""


def _with_defaults(text: str, *, help_text: bool = False) -> str:
    """``{default:NAME}`` in ``text`` replaced by the library's default (defaults.py), which
    is imported only here, when help is shown. A help text is %-formatted afterwards."""
    if "{default:" not in text:
        return text
    from . import defaults

    return defaults.fill(text, percent=help_text)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """argparse's, with the terminal width read without importing shutil (argparse makes
    a formatter for every add_argument; each import counts in a one-shot command), and
    ``{default:NAME}`` in texts filled in when they are shown."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            try:
                columns = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size().columns
            except (ValueError, OSError):
                columns = 80
            width = max(columns - 2, 20)
        super().__init__(prog, indent_increment, max_help_position, width)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        return None if text is None else _with_defaults(text, help_text=True)

    def _format_text(self, text: str) -> str:
        return super()._format_text(_with_defaults(text))


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line: ``trio-jobs: error: ...`` and exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        # argparse quotes the user's words raw ("unrecognized arguments: ...")
        sys.stderr.write(f"{PROG}: error: {terminal_safe(message)} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_")
    return convert


def _offset(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"invalid offset {text!r}: use a byte offset, 0 or more")
    return int(text)


def _positive_duration(text: str) -> float:
    seconds = units.parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be greater than zero")
    return seconds


def _positive_count(text: str) -> int:
    count = units.parse_count(text)
    if count < 1:
        raise ValueError(f"invalid count {text!r}: must be at least 1")
    return count


def _retention_age(text: str) -> float:
    """``--retain-for``: the syntax of ``--grace`` plus whole days (``30d``), > 0."""
    stripped = text.strip()
    if stripped[-1:] in ("d", "D") and stripped[:-1].strip().replace(".", "", 1).isdigit():
        seconds = float(stripped[:-1]) * 86400
        if seconds > 10**9:
            raise ValueError(f"duration {text!r} is too large")
    else:
        try:
            seconds = units.parse_duration(text)
        except ValueError:
            raise ValueError(f"invalid duration {text!r}: use e.g. 30d, 12h, 90m (greater than zero)") from None
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be greater than zero")
    return seconds


class _Discard:
    """Takes the arguments of a command that is not the one being run: only its name and
    help are needed (in the command list), not its options."""

    def add_argument(self, *args: object, **kwargs: object) -> None:
        pass

    def add_argument_group(self, *args: object, **kwargs: object) -> _Discard:
        return self

    def set_defaults(self, **kwargs: object) -> None:
        pass


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``command``, only that command's options are added (the
    others are listed by name: enough for ``--help`` and for a mistyped command)."""
    fmt = _Formatter
    parser = _Parser(prog=PROG, description=DESCRIPTION, epilog=EXIT_CODES_HELP, formatter_class=fmt)
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    conn = _Parser(add_help=False)
    g = conn.add_argument_group("connection")
    g.add_argument("--server", metavar="HOST:PORT", help="server address (default $TRIO_JOBS_SERVER or {default:server})")
    g.add_argument("--identity", metavar="NAME", help="use TRIO_JOBS_HOME/pki/NAME.{crt,key} (default $TRIO_JOBS_IDENTITY or {default:identity})")
    g.add_argument("--cert", metavar="FILE", help="client certificate (overrides --identity)")
    g.add_argument("--key", metavar="FILE", help="client private key")
    g.add_argument("--ca", metavar="FILE", help="CA certificate to verify the server (default TRIO_JOBS_HOME/pki/ca.crt)")

    job = _Parser(add_help=False)
    job.add_argument("job_pos", nargs="?", metavar="JOB", help="job id (as printed by start)")
    job.add_argument("--job", metavar="JOB", help="job id (same as the positional JOB)")

    def add(name: str, help_text: str, parents: Sequence[_Parser] = ()) -> argparse.ArgumentParser:
        if command is not None and name != command:
            sub.add_parser(name, help=help_text, add_help=False)
            return cast("argparse.ArgumentParser", _Discard())
        p: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text, parents=list(parents), epilog=EXIT_CODES_HELP, formatter_class=fmt
        )
        return p

    # serve's options that have a library default are None here; cmd_serve fills them in
    # (defaults.fill_serve_defaults), and their help quotes them ({default:DEST}).
    p = add("serve", "run the server (first run creates the development PKI and state)")
    p.add_argument("--host", help="address to listen on (default {default:host})")
    p.add_argument("--port", type=int, help="port (default {default:port}; 0 = any free port)")
    p.add_argument("--data-dir", metavar="D", help="job records and output (default TRIO_JOBS_HOME)")
    p.add_argument("--policy", metavar="F", help="authorization policy, TOML (default: built-in)")
    p.add_argument("--pki", metavar="D", help="PKI directory with ca/server certs (default TRIO_JOBS_HOME/pki)")
    p.add_argument("--cert", metavar="FILE", help="server certificate (with --key and --ca, instead of --pki)")
    p.add_argument("--key", metavar="FILE", help="server private key")
    p.add_argument("--ca", metavar="FILE", help="CA that signs client certificates")
    p.add_argument("--cgroup-parent", metavar="P", help="cgroup to create job cgroups under: relative to the server's own cgroup, or absolute "
        "(default: trio-jobs-<hash of the data directory> under the server's own cgroup)")
    p.add_argument("--require-limits", action="store_true", help="refuse to start without usable cgroups")
    p.add_argument("--audit-log", metavar="F", help="append a JSON line per call here: who did what "
        "(default TRIO_JOBS_HOME/audit.jsonl; reopened on SIGHUP; docs/operations.md)")
    p.add_argument("--audit-reads", action="store_true",
        help="also log successful status and list calls (refused ones always are)")
    g = p.add_argument_group("history retention (docs/operations.md): ended jobs beyond any limit are deleted, oldest first")
    g.add_argument("--retain-jobs", type=_typed(_positive_count), metavar="N",
        help="keep at most N ended jobs (records and output; default {default:retain_jobs})")
    g.add_argument("--retain-output", type=_typed(units.parse_size), metavar="SIZE",
        help="keep at most SIZE of ended jobs' output in total, e.g. 500M, 20G (default {default:retain_output})")
    g.add_argument("--retain-for", type=_typed(_retention_age), metavar="DURATION",
        help="delete ended jobs this long after they ended, e.g. 7d, 12h (default {default:retain_for})")
    g = p.add_argument_group("connection caps (advanced; docs/reliability.md)")
    g.add_argument("--handshake-timeout", type=_typed(_positive_duration), metavar="T",
        help="drop a connection that has not finished TLS, or sent the HTTP/2 preface, within T "
             "(default {default:handshake_timeout})")
    g.add_argument("--max-connections", type=_typed(_positive_count), metavar="N",
        help="close connections beyond N right after accept (default {default:max_connections})")
    g.add_argument("--max-connections-per-source", type=_typed(_positive_count), metavar="N",
        help="close connections beyond N from one source address (IPv6: per /64) right after accept "
             "(default {default:max_connections_per_source})")
    g.add_argument("--max-handshakes-per-source", type=_typed(_positive_count), metavar="N",
        help="close a connection when its source address has N TLS handshakes in progress "
             "(default {default:max_handshakes_per_source})")
    g.add_argument("--idle-timeout", type=_typed(_positive_duration), metavar="T",
        help="GOAWAY and close a connection that has had no call running for T (default {default:idle_timeout})")
    g.add_argument("--max-streams-per-identity", type=_typed(_positive_count), metavar="N",
        help="concurrent output streams (tail) one identity may hold open (default {default:max_streams_per_identity})")
    p.set_defaults(func=None)

    p = add("start", "start a job; prints its id", [conn])
    p.add_argument("--cpus", type=_typed(units.parse_cpus), help="CPUs, e.g. 1.5 or 500m (default {default:cpus})")
    p.add_argument("--memory", type=_typed(units.parse_size), help="memory, e.g. 512M, 1G (default {default:memory})")
    p.add_argument("--pids", type=_typed(units.parse_count), help="max processes (default {default:pids})")
    p.add_argument("--io-read-bps", type=_typed(units.parse_size), metavar="RATE", help="disk read bytes/s, e.g. 10M")
    p.add_argument("--io-write-bps", type=_typed(units.parse_size), metavar="RATE", help="disk write bytes/s, e.g. 10M")
    p.add_argument("--io-read-iops", type=_typed(units.parse_count), metavar="N", help="disk read operations/s")
    p.add_argument("--io-write-iops", type=_typed(units.parse_count), metavar="N", help="disk write operations/s")
    p.add_argument("-e", "--env", action="append", metavar="K=V", help="set an environment variable (repeatable)")
    p.add_argument("--cwd", metavar="D", help="working directory, absolute (default /)")
    p.add_argument("-f", "--follow", action="store_true", help="then follow the output and exit like tail")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]", help="the program and its arguments")

    p = add("stop", "stop a job: SIGTERM, grace period, SIGKILL", [job, conn])
    p.add_argument("--grace", type=_typed(units.parse_duration), help="grace period, e.g. 5s, 500ms, 0 (default 5s)")
    p.add_argument("--json", action="store_true", help="print the final status as JSON")

    p = add("status", "show a job's status", [job, conn])
    p.add_argument("--json", action="store_true", help="proto3 JSON with the proto's field names")

    p = add("tail", "write a job's output to stdout; exits with the job's status", [job, conn])
    p.add_argument("--no-follow", action="store_true", help="print what exists and exit 0")
    p.add_argument("--offset", type=_typed(_offset), default=0, help="start at this byte offset (default 0)")

    p = add("list", "list your jobs (oldest first)", [conn])
    p.add_argument("--all", action="store_true", help="every user's jobs (admins only)")
    p.add_argument("--json", action="store_true", help="ListJobsResponse as proto3 JSON")

    add("certs", "manage certificates (init, issue ...): see 'trio-jobs certs --help'")
    return parser


def command_of(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    """The function that runs ``args.command``, its modules imported."""
    if args.command == "serve":
        from .serve import cmd_serve

        return cmd_serve
    if args.command == "tail" or (args.command == "start" and args.follow):
        import trio

        from . import commands

        follow = commands.cmd_tail if args.command == "tail" else commands.cmd_start_follow
        return lambda args: trio.run(follow, args)
    # One request and its answer: no event loop (see oneshot.py).
    from . import oneshot

    handlers = {
        "start": oneshot.cmd_start,
        "stop": oneshot.cmd_stop,
        "status": oneshot.cmd_status,
        "list": oneshot.cmd_list,
    }
    return handlers[args.command]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while a command starts: its imports allocate tens of
    thousands of objects that all live on, so the ~20 collections they trigger free nothing
    and cost a one-shot command ~4% of its time (``benchmarks/cli.py``)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


_COMMANDS: Final = frozenset({"serve", "start", "stop", "status", "tail", "list"})

# Options whose value may look negative ("--grace -1s"): argparse would take "-1s" for an
# option and say "expected one argument"; joined as "--grace=-1s", the value's own check
# gives the clear message.
_SIGNED_VALUE_OPTIONS: Final = frozenset({"--grace", "--offset", "--retain-for", "--idle-timeout",
                                          "--handshake-timeout"})


def _join_signed_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--":
            return out + argv[i:]  # the job's own argv: untouched
        if argv[i] in _SIGNED_VALUE_OPTIONS and i + 1 < len(argv) and argv[i + 1][:1] == "-" \
                and argv[i + 1][1:2].isdigit():
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _check_rpc_mode() -> None:
    """TRIO_JOBS_RPC_TRANSPORT / TRIO_JOBS_RPC_FAST_PATHS, refused before anything is done."""
    from ..rpc._mode import RpcMode

    try:
        RpcMode.from_environ()
    except ValueError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = _join_signed_values(list(sys.argv[1:] if argv is None else argv))
    try:
        if argv[:1] == ["certs"]:
            from ..security.certs_cli import main as certs_main

            return certs_main(argv[1:], prog=f"{PROG} certs")
        with _collector_paused():
            args = build_parser(argv[0] if argv[:1] and argv[0] in _COMMANDS else None).parse_args(argv)
            _check_rpc_mode()
            command = command_of(args)
        return command(args)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        leaves = _leaves(exc)
        if any(isinstance(e, BrokenPipeError) for e in leaves):
            # stdout's reader went away (`trio-jobs list | head -1`): what a shell reports
            # for SIGPIPE, and no second error when Python flushes stdout at exit.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_BROKEN_PIPE
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            sys.stderr.write(f"{PROG}: interrupted\n")
            return EXIT_INTERRUPTED
        for leaf in leaves:
            if isinstance(leaf, CliError):
                # a server's message quotes what users sent: escaped (DESIGN §3)
                sys.stderr.write(f"{PROG}: error: {terminal_safe(leaf.message)}\n")
                return leaf.exit_code
        if os.environ.get("TRIO_JOBS_DEBUG"):
            import traceback

            traceback.print_exception(exc)
        leaf = leaves[0]
        sys.stderr.write(
            f"{PROG}: error: internal error ({terminal_safe(f'{type(leaf).__name__}: {leaf}')}); "
            "set TRIO_JOBS_DEBUG=1 for details and report it\n"
        )
        return EXIT_ERROR


def run() -> NoReturn:
    """The ``trio-jobs`` console script: :func:`main`, then the process exits.

    A command other than ``serve`` skips the interpreter's teardown of its ~220 modules
    (~10 ms, a tenth of a one-shot command: ``benchmarks/cli.py``): what an exit must do
    is done here instead -- the exit handlers registered with :mod:`atexit` run (coverage's
    among them, under the tests) and stdout and stderr are flushed -- and then
    :func:`os._exit`. The sockets and files a command opened are closed by then (each is
    used in a ``with``); the kernel releases anything else. ``serve`` exits the usual way.
    """
    argv = sys.argv[1:]
    try:
        code = main(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse's exit
        code = _exit_status(exc.code)
    if argv[:1] == ["serve"]:
        sys.exit(code)
    atexit._run_exitfuncs()
    os._exit(_flushed(code))


def _exit_status(code: object) -> int:
    """What ``sys.exit(code)`` makes the process's status: None is 0, a non-int is printed
    and gives 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    if sys.stderr is not None:
        sys.stderr.write(f"{code}\n")
    return 1


def _flushed(code: int) -> int:
    """``code`` once stdout and stderr are written out; a reader of stdout that went away
    (``trio-jobs list | head -1``) gives the status :func:`main` gives it."""
    if sys.stdout is not None:  # None: started with stdout closed (`trio-jobs ... >&-`)
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            code = EXIT_BROKEN_PIPE
        except (OSError, ValueError):  # a stdout closed or failing on its own: as Python does
            code = code or 120
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
    return code
