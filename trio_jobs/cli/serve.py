"""``trio-jobs serve``: zero-config first run, banner, and the server's lifecycle.

The first line on stdout is always ``trio-jobs listening on HOST:PORT`` (with the real port
when ``--port 0`` was given), so scripts and tests can learn the address; the rest of the
banner is for people. SIGINT/SIGTERM shut down gracefully, a second one at once (see
:mod:`trio_jobs.server`); either way the exit code is 0. SIGHUP reloads the policy, the
certificates and the audit log (:mod:`trio_jobs.reload`). Logs go to stderr and a closed
stdout does not stop the server (:mod:`trio_jobs.cli.serve_io`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from ..security.errors import SecurityError
from ..security.paths import state_home
from .defaults import fill_serve_defaults
from .errors import EXIT_CONFIG, EXIT_OK, EXIT_USAGE, CliError
from .serve_io import announce, configure_logging, say

if TYPE_CHECKING:
    import argparse
    import ssl

    from ..audit import AuditLog
    from ..reload import ReloadSources
    from ..security.dynamic_users import DynamicUsers
    from ..security.policy import Policy
    from ..server import ServerConfig, ServerInfo
    from ..worker.cgroups.base import CgroupDriver


def _ssl_context(args: argparse.Namespace, home: Path) -> tuple[ssl.SSLContext, Path | None]:
    """The server context, creating the development PKI on first run. Returns (ctx, pki dir)."""
    from ..security.pki import init_dev_pki, is_complete_dev_pki
    from ..security.tls import server_ssl_context

    given = [args.cert, args.key, args.ca]
    if any(given):
        if not all(given):
            raise CliError("--cert, --key and --ca go together: give all three", EXIT_USAGE)
        if args.pki:
            raise CliError("give either --pki or --cert/--key/--ca, not both", EXIT_USAGE)
        cert, key, ca, pki = Path(args.cert), Path(args.key), Path(args.ca), None
    else:
        pki = Path(args.pki) if args.pki else home / "pki"
        try:
            if not is_complete_dev_pki(pki):
                if pki.exists() and any(pki.iterdir()):
                    raise CliError(
                        f"{pki} holds an incomplete PKI; remove it to have a new one made, or pass --cert/--key/--ca",
                        EXIT_CONFIG,
                    )
                init_dev_pki(pki)
                say(f"created the development PKI in {pki}")
        except SecurityError as exc:
            raise CliError(f"cannot create the development PKI in {pki}: {exc}", EXIT_CONFIG) from None
        cert, key, ca = pki / "server.crt", pki / "server.key", pki / "ca.crt"
    try:
        return server_ssl_context(cert=cert, key=key, ca=ca), pki
    except (SecurityError, OSError) as exc:
        raise CliError(f"cannot use the server certificate {cert}: {exc}", EXIT_CONFIG) from None


def _reload_sources(args: argparse.Namespace, home: Path) -> ReloadSources:
    """The files SIGHUP reads again: the ones :func:`_ssl_context` and ``--policy`` named."""
    from ..reload import ReloadSources

    if args.cert:
        cert, key, ca = Path(args.cert), Path(args.key), Path(args.ca)
    else:
        pki = Path(args.pki) if args.pki else home / "pki"
        cert, key, ca = pki / "server.crt", pki / "server.key", pki / "ca.crt"
    return ReloadSources(policy=Path(args.policy) if args.policy else None, cert=cert, key=key, ca=ca)


def _dynamic_users(data_dir: Path) -> DynamicUsers:
    """The identities' own users (security/dynamic_users.py), read once: the policy's check
    allocates with it, and the server keeps using it."""
    from ..security.dynamic_users import FILE_NAME, DynamicUsers

    try:
        return DynamicUsers(data_dir / FILE_NAME)
    except SecurityError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None


def _policy(args: argparse.Namespace, dynamic: DynamicUsers) -> Policy:
    from ..security.policy import Policy

    if not args.policy:
        policy = Policy.default()
        try:
            policy.check_users(dynamic=dynamic)
        except SecurityError as exc:
            raise CliError(f"the built-in policy does not fit this host: {exc}; pass --policy F", EXIT_CONFIG) from None
        return policy
    try:
        policy = Policy.load(Path(args.policy))
        # A run_as user that does not exist fails now, not at StartJob; dynamic users are
        # allocated now, so that their ids are known (and saved) before the first job.
        policy.check_users(dynamic=dynamic)
    except (SecurityError, OSError) as exc:
        raise CliError(f"cannot load the policy {args.policy}: {exc}", EXIT_CONFIG) from None
    for user, names in policy.shared_users():
        print(f"trio-jobs: WARNING: identities {', '.join(names)} all run as user {user!r}: their "
              "jobs can signal and trace each other (leave run_as unset for a user of each's own)",
              file=sys.stderr)
    return policy


def _check_launch_host() -> None:
    """A root server must be able to drop each job to its user (spawn.py, creds.py)."""
    from ..worker import creds, spawn

    if os.geteuid() != 0:
        if spawn.SETPRIV is None:
            print("trio-jobs: WARNING: util-linux setpriv is missing: jobs run without "
                  "no_new_privs (setuid programs keep working in them)", file=sys.stderr)
        return
    problem = None if spawn.SETPRIV is not None else "util-linux setpriv is not installed"
    problem = problem or creds.supported()
    if problem is not None:
        raise CliError(f"cannot run jobs as their users on this host: {problem}", EXIT_CONFIG)


def _banner(info: ServerInfo, home: Path, data_dir: Path, pki: Path | None, driver: str) -> str:
    host, port = info.addresses[0]
    shown_host = f"[{host}]" if ":" in host else host
    lines = [f"trio-jobs listening on {shown_host}:{port}"]
    lines += [f"  also on {h}:{p}" for h, p in info.addresses[1:]]
    lines.append(f"cgroups: {driver}")
    lines.append(f"rpc: {info.rpc_mode}")
    lines.append(f"data: {data_dir}" + (f"  pki: {pki}" if pki else ""))
    exports = []
    default_home = state_home({k: v for k, v in os.environ.items() if k != "TRIO_JOBS_HOME"})
    if pki is not None and home.resolve() != default_home.resolve():
        exports.append(f"TRIO_JOBS_HOME={shlex.quote(str(home))}")
    connect_host = "localhost" if host in ("127.0.0.1", "::1", "0.0.0.0", "::") else shown_host
    if (connect_host, port) != ("localhost", 4567):
        exports.append(f"TRIO_JOBS_SERVER={connect_host}:{port}")
    lines.append("connect from another terminal (identities: admin, alice, bob via TRIO_JOBS_IDENTITY):")
    bin_dir = os.path.dirname(sys.executable)  # the venv's bin, where `trio-jobs` is installed
    if shutil.which("trio-jobs") is None and os.path.exists(os.path.join(bin_dir, "trio-jobs")):
        exports.insert(0, f"PATH={shlex.quote(bin_dir)}:$PATH")  # e.g. started as ./dev serve
    if exports:
        lines.append("  export " + " ".join(exports))
    lines += [
        "  trio-jobs start -- echo hello        # prints the job id",
        "  trio-jobs tail JOB",
        "  trio-jobs list",
        "stop the server with Ctrl-C (twice: stop jobs at once)",
    ]
    return "\n".join(lines)


async def _serve_then_cancel(
    config: ServerConfig, nursery: trio.Nursery, *, task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED
) -> None:
    from ..server import serve

    await serve(config, task_status=task_status)
    nursery.cancel_scope.cancel()  # the announcer has nothing more to say


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def _announce_shutdown(info: ServerInfo) -> None:
    """Say what a signal did (on stdout, after the banner), so an operator knows a second
    Ctrl-C is an option. Cancelled when the server has stopped."""
    await info.handle.wait_for_request(1)
    announce("trio-jobs: shutting down: stopping running jobs (signal again to kill them at once)")
    await info.handle.wait_for_request(2)
    announce("trio-jobs: stopping at once: killing running jobs")


def cmd_serve(args: argparse.Namespace) -> int:
    if not sys.platform.startswith("linux"):
        raise CliError(f"trio-jobs serve needs Linux (processes in cgroups); this is {sys.platform}", EXIT_CONFIG)
    fill_serve_defaults(args)  # the options not given: the library's defaults (defaults.py)
    configure_logging()  # the package's own logs: journal-aware (serve_io.py)
    home = state_home()
    data_dir = Path(args.data_dir) if args.data_dir else home
    from ..security.statedir import StateDirError, prepare_state

    own_pki = not (args.cert or args.key or args.ca)  # else the operator's files, checked too
    try:  # before anything is created or read: no adoption of someone else's state (§3)
        for note in prepare_state(home=home, data_dir=data_dir, cert=args.cert, key=args.key, ca=args.ca,
                                  pki_dir=(args.pki or home / "pki") if own_pki else None):
            say(f"trio-jobs: {note}")
    except StateDirError as exc:
        raise CliError(str(exc), EXIT_CONFIG) from None
    ctx, pki = _ssl_context(args, home)
    dynamic = _dynamic_users(data_dir)
    policy = _policy(args, dynamic)
    _check_launch_host()
    from ..worker.cgroups.base import CgroupError
    from ..worker.cgroups.detect import NO_LIMITS_WARNING, detect_server_driver

    try:  # the detection serve() runs by default (cgroups=DETECT_CGROUPS), done here to say so
        driver = detect_server_driver(data_dir, parent=args.cgroup_parent, require=args.require_limits)
    except CgroupError as exc:
        raise CliError(f"cgroups: {exc}", EXIT_CONFIG) from None
    if driver.name == "none":
        say(f"trio-jobs: WARNING: no usable cgroups: {NO_LIMITS_WARNING} (use --require-limits to refuse instead)")
    trio.run(_serve, args, ctx, policy, dynamic, driver, home, data_dir, pki)
    return EXIT_OK


def _audit_log(args: argparse.Namespace, home: Path) -> AuditLog:
    """``--audit-log``, else ``TRIO_JOBS_HOME/audit.jsonl`` (``prepare_state`` has made and
    checked the home). Not opened yet."""
    from ..audit import AUDIT_FILE_NAME, AuditLog

    path = Path(args.audit_log) if args.audit_log else home / AUDIT_FILE_NAME
    return AuditLog(path, reads=args.audit_reads)


async def _serve(
    args: argparse.Namespace,
    ctx: ssl.SSLContext,
    policy: Policy,
    dynamic: DynamicUsers,
    driver: CgroupDriver,
    home: Path,
    data_dir: Path,
    pki: Path | None,
) -> None:
    from ..rpc import ServerLimits
    from ..server import ServerConfig
    from ..worker.retention import Retention

    config = ServerConfig(
        host=args.host,
        port=args.port,
        data_dir=data_dir,
        ssl_context=ctx,
        policy=policy,
        dynamic_users=dynamic,
        cgroups=driver,
        rpc_limits=ServerLimits(
            handshake_timeout=args.handshake_timeout,
            max_connections=args.max_connections,
            max_connections_per_source=args.max_connections_per_source,
            max_handshakes_per_source=args.max_handshakes_per_source,
            idle_timeout=args.idle_timeout,
        ),
        max_streams_per_identity=args.max_streams_per_identity,
        retention=Retention(
            max_jobs=args.retain_jobs, max_output_bytes=args.retain_output, max_age=args.retain_for
        ),
        reload_from=_reload_sources(args, home),  # SIGHUP
        notify_systemd=True,  # READY=1 etc. when systemd runs us (Type=notify)
        audit=_audit_log(args, home),
    )
    from ..audit import AuditLogError
    from ..worker.errors import WorkerError

    async with trio.open_nursery() as nursery:
        try:
            info: ServerInfo = await nursery.start(_serve_then_cancel, config, nursery)
        except* WorkerError as group:
            # Before the server runs, a worker error is the local setup (a damaged or locked
            # database, an unusable data directory): one line, no traceback.
            raise CliError(str(_first_leaf(group)), EXIT_CONFIG) from None
        except* AuditLogError as group:  # (an OSError: before that clause)
            raise CliError(str(_first_leaf(group)), EXIT_CONFIG) from None
        except* OSError as group:  # e.g. the port is taken
            raise CliError(f"cannot listen on {args.host}:{args.port}: {_first_leaf(group)}", EXIT_CONFIG) from None
        announce(_banner(info, home, data_dir, pki, driver.describe()))  # a closed stdout is no error
        nursery.start_soon(_announce_shutdown, info)
    say("trio-jobs: server stopped")
