"""SIGHUP: re-read the policy and the server's certificates, reopen the audit log.

Theory of operation. A reload is all or nothing. First every new file is loaded and
validated off the event loop (:func:`load`): the policy parsed and its ``run_as`` users
resolved, the certificate, key and CA built into a fresh server ``SSLContext`` (which checks
that the key matches the certificate). Then the audit log is reopened (logrotate moved it).
Only when all of that worked are the new policy and context put in place, each by a single
assignment on the event loop, so no call ever sees half of a reload. Any failure keeps
*all* of the old configuration and logs one line saying why; success logs one line saying
what was reloaded.

What changes for whom:

- the policy is looked up afresh on every call (``JobService._caller``), so an identity the
  new policy removes is refused on its next call, on connections opened before the reload
  too; its running jobs keep running (an admin still sees and stops them), and a call
  already in progress (a ``tail -f``) finishes;
- the ``SSLContext`` is read once per connection, at accept: new handshakes use the new
  certificate and CA, connections already open keep the session they negotiated;
- jobs are not touched at all.

With the built-in policy (no ``--policy``) there is no file to re-read: it stays.

A server embedded on the caller's own TLS listeners (``ServerConfig.listeners`` from
``trio.open_ssl_over_tcp_listeners``, ``ssl_context=None``) has no context of ours to
replace: the certificates are the listeners' ``SSLContext``, which only the program that
made them can change. A reload then neither reads nor applies the certificate files (one log
line says so) and reloads the rest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, final

import trio
from cryptography import x509

from .security.dynamic_users import DynamicUsers
from .security.errors import SecurityError
from .security.policy import Policy
from .security.tls import server_ssl_context

if TYPE_CHECKING:
    import ssl
    from pathlib import Path

    from .audit import AuditLog
    from .rpc import Server
    from .service import JobService

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ReloadSources:
    """The files a reload reads again: the same ones ``serve`` read at start."""

    policy: Path | None  # None: the built-in policy, which stays as it is
    cert: Path
    key: Path
    ca: Path


@final
@dataclass(frozen=True, kw_only=True)
class Loaded:
    """New configuration, validated, not yet in use."""

    policy: Policy | None
    # The new server context, and its certificate's serial for the log line; None: not
    # loaded (the server has no context of ours).
    tls: tuple[ssl.SSLContext, int] | None


class ReloadError(Exception):
    """A new file is unusable; the message is one line saying which and why."""


def load(sources: ReloadSources, *, certificates: bool = True) -> Loaded:
    """Load and check every file of ``sources`` (blocking file I/O and user lookups: run it
    in a thread); ``certificates=False``: all but the certificate, key and CA. Raises
    :class:`ReloadError`; changes nothing."""
    policy: Policy | None = None
    try:
        if sources.policy is not None:
            policy = Policy.load(sources.policy)
            # A run_as user that does not exist fails now, not at StartJob. Dynamic users are
            # only tried out here (in memory): the service allocates and saves a new
            # identity's user at its first start, so a reload that fails saves nothing.
            policy.check_users(dynamic=DynamicUsers(None))
    except (SecurityError, OSError) as exc:
        why = str(exc) if str(sources.policy) in str(exc) else f"{sources.policy}: {exc}"
        raise ReloadError(f"policy {why}") from None
    if not certificates:
        return Loaded(policy=policy, tls=None)
    try:
        ctx = server_ssl_context(cert=sources.cert, key=sources.key, ca=sources.ca)
        serial = x509.load_pem_x509_certificate(sources.cert.read_bytes()).serial_number
    except (SecurityError, OSError, ValueError) as exc:
        raise ReloadError(f"server certificate: {exc}") from None
    return Loaded(policy=policy, tls=(ctx, serial))


async def reload(
    sources: ReloadSources | None, *, service: JobService, server: Server, audit: AuditLog | None
) -> bool:
    """One reload (see the module docstring). Returns True if it was applied; never raises
    for a bad file (it logs one line instead). ``sources`` None: only the audit log."""
    what: list[str] = []
    loaded: Loaded | None = None
    # The caller's TLS listeners (see the module docstring): their certificates are not ours.
    ours = server.ssl_context is not None
    try:
        if sources is not None:
            loaded = await trio.to_thread.run_sync(partial(load, sources, certificates=ours))
        if audit is not None:
            # Last of the fallible steps: a failed reopen keeps the old file open (AuditLog),
            # and the policy and certificates stay old with it.
            await trio.to_thread.run_sync(audit.reopen)
            what.append(f"audit log {audit.path} reopened")
    except ReloadError as exc:
        log.warning("reload failed, keeping the old configuration: %s", exc)
        return False
    except OSError as exc:  # AuditLogError: the old file stays in use
        log.warning("reload failed, keeping the old configuration: audit log: %s", exc)
        return False
    if loaded is not None:
        assert sources is not None
        if loaded.policy is not None:
            service.set_policy(loaded.policy)
            what.insert(0, f"policy {sources.policy} ({len(loaded.policy.identities)} identities)")
            for user, names in loaded.policy.shared_users():  # as serve warns at start
                log.warning("identities %s all run as user %r: their jobs can signal and trace "
                            "each other (leave run_as unset for a user of each's own)", ", ".join(names), user)
        else:
            what.insert(0, "built-in policy unchanged")
        if loaded.tls is not None:
            ctx, serial = loaded.tls
            server.set_ssl_context(ctx)
            what.insert(1, f"server certificate {sources.cert} (serial {serial:#x}) and CA {sources.ca}")
        else:
            log.warning("server certificate not reloaded: the server runs on its caller's TLS listeners, "
                        "whose SSLContext only that program can change")
    log.info("reloaded: %s", "; ".join(what) or "nothing to reload")
    return True
