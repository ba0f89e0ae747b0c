"""Authorization policy: which identities exist, what each may run, as whom, and its caps.

The format (TOML, read with :mod:`tomllib`; documented in docs/security.md and
docs/policy.example.toml)::

    [defaults]                 # applies to every identity listed below, unless it overrides
    # run_as = "build"         # Unix user for jobs when the server runs as root; "" = the
                               # server's user; unset = a dynamic user of the identity's own
                               # (admins: the server's user)
    max_running_jobs = 32      # RUNNING jobs at once per identity (RESOURCE_EXHAUSTED above)
    programs = ["*"]           # "*" = anything; else names (looked up on the job PATH) / abs paths
    [defaults.max_limits]      # caps on each job limit (INVALID_ARGUMENT above)
    cpu_millis = 8000
    [defaults.max_total]       # what all running jobs of one identity may use together,
    pids_max = 8192            # enforced by the kernel on the identity's cgroup
    [identities.admin]
    admin = true               # sees and stops everyone's jobs (only settable per identity)
    run_as = ""

Identities not listed are refused. Unknown keys or wrong types are a :class:`PolicyError`
naming the key. The built-in default (:data:`DEFAULT_POLICY_TOML`) makes ``admin`` an admin
whose jobs run as the server's user, and ``alice`` and ``bob`` users who may run anything (each
as a dynamic user of its own when the server runs as root: :mod:`dynamic_users`).

Program rule (:meth:`Policy.check_program`): entries name files, not strings. An absolute-path
entry names that file; a bare name names the file it resolves to on the job search PATH (never
the user's choice of directory). A command is allowed when its resolved executable *is* one of
those files (same device and inode after following symlinks). So ``sh`` allows ``/bin/sh`` and
``/usr/bin/dash`` (the same file), but not a user's own ``/tmp/x/sh``; and ``sh -c '...'`` is
exactly as allowed as ``sh``. Arguments are not inspected: allowing an interpreter, ``env``, a
multi-call binary such as busybox, or anything that runs other programs allows everything.

What runs is the file that was checked: the job's user opens the program and the policy
compares *that open file* (``file_id``), and the job then executes the policy's own path for
it, never the request's path again (a swapped symlink, ``/proc/self/cwd/...`` or
``/dev/fd/N`` cannot make it run something else; only someone who can write the directories
of the policy's own path could, and that is the operator's choice of path). And an identity
restricted to some programs may not set the variables that make the dynamic loader or the C
library load other code into them (:data:`LOADER_VARIABLES`, any ``LD_*``).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tomllib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from trio_jobs.security.errors import PermissionDenied, PolicyError, SecurityError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path

    from trio_jobs.security.dynamic_users import DynamicUsers

# The limit names, in the order of worker.Limits: security/ may not import the worker
# (DESIGN §1), so it keeps its own copy; tests/service/test_shared_names.py holds it equal to
# the service's (derived from Limits).
LIMIT_FIELDS: Final = (
    "cpu_millis",
    "memory_bytes",
    "io_read_bps",
    "io_write_bps",
    "io_read_iops",
    "io_write_iops",
    "pids_max",
)
# The limits that also apply to an identity's running jobs together (its cgroup).
TOTAL_FIELDS: Final = ("cpu_millis", "memory_bytes", "pids_max")
# Variables with which the dynamic loader or glibc load code or files of the caller's choice
# into a program (glibc's "unsecure" list for setuid programs, less TMPDIR); with any LD_*
# they are refused to identities that may run only some programs.
LOADER_VARIABLES: Final = frozenset({
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH",
    "MALLOC_TRACE", "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TZDIR",
})
# The job's search PATH (a job gets a fixed PATH, never the server's): bare program names in
# the policy resolve on this.
DEFAULT_SEARCH_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEFAULT_POLICY_TOML: Final = """\
[defaults]
max_running_jobs = 32
programs = ["*"]

[defaults.max_limits]
cpu_millis = 8000
memory_bytes = 8589934592
pids_max = 8192

[defaults.max_total]
cpu_millis = 8000
memory_bytes = 17179869184
pids_max = 8192

[identities.admin]
admin = true
run_as = ""
max_running_jobs = 256

[identities.alice]

[identities.bob]
"""

_COMMON_KEYS: Final = frozenset({"run_as", "max_running_jobs", "programs", "max_limits", "max_total"})
_IDENTITY_KEYS: Final = _COMMON_KEYS | {"admin"}


class LimitAboveCap(SecurityError):
    """A requested job limit exceeds the identity's cap (maps to INVALID_ARGUMENT)."""


class QuotaExceeded(SecurityError):
    """The identity already runs its maximum number of jobs (maps to RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True, kw_only=True)
class IdentityPolicy:
    """What one identity may do."""

    name: str
    admin: bool
    programs: frozenset[str] | None  # None = any program ("*")
    run_as: str | None  # Unix user name; "" = the server's own user; None = unset (dynamic)
    max_running_jobs: int
    max_limits: Mapping[str, int]  # field of LIMIT_FIELDS -> cap; absent = no cap
    max_total: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))  # TOTAL_FIELDS -> cap


@dataclass(frozen=True, kw_only=True)
class UnixUser:
    """A resolved Unix account to run jobs as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


# --- parsing -------------------------------------------------------------------------------


def _table(value: object, key: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise PolicyError(f"{key}: expected a table, got {value!r}")
    return value


def _check_keys(table: Mapping[str, object], allowed: frozenset[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise PolicyError(f"{where}.{key}: unknown key (known keys: {known})")


def _int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PolicyError(f"{key}: expected an integer >= 0, got {value!r}")
    return value


def _run_as(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f'{key}: expected a Unix user name or "", got {value!r}')
    return value


def _programs(value: object, key: str) -> frozenset[str] | None:
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise PolicyError(
            f'{key}: expected a list of strings (["*"] or names or paths), got {value!r}'
        )
    if "*" in value:
        return None
    for entry in value:
        if not entry or entry != entry.strip() or ("/" in entry and not entry.startswith("/")):
            raise PolicyError(f"{key}: {entry!r} is neither a program name nor an absolute path")
    return frozenset(value)


def _limits(value: object, key: str, names: tuple[str, ...] = LIMIT_FIELDS) -> dict[str, int]:
    table = _table(value, key)
    _check_keys(table, frozenset(names), key)
    return {name: _int(v, f"{key}.{name}") for name, v in table.items()}


@dataclass(frozen=True, kw_only=True)
class _Defaults:
    run_as: str | None
    max_running_jobs: int
    programs: frozenset[str] | None
    max_limits: Mapping[str, int]
    max_total: Mapping[str, int]


def _parse_identity(name: str, raw: object, defaults: _Defaults) -> IdentityPolicy:
    where = f"identities.{name}"
    if not name or not name.isprintable():
        raise PolicyError(f"{where}: identity names must be non-empty printable text")
    table = _table(raw, where)
    _check_keys(table, _IDENTITY_KEYS, where)
    admin = table.get("admin", False)
    if not isinstance(admin, bool):
        raise PolicyError(f"{where}.admin: expected true or false, got {admin!r}")
    caps = dict(defaults.max_limits)
    if "max_limits" in table:
        caps.update(_limits(table["max_limits"], f"{where}.max_limits"))
    totals = dict(defaults.max_total)
    if "max_total" in table:
        totals.update(_limits(table["max_total"], f"{where}.max_total", TOTAL_FIELDS))
    return IdentityPolicy(
        name=name,
        admin=admin,
        programs=_programs(table["programs"], f"{where}.programs")
        if "programs" in table
        else defaults.programs,
        run_as=_run_as(table["run_as"], f"{where}.run_as")
        if "run_as" in table
        else defaults.run_as,
        max_running_jobs=_int(table["max_running_jobs"], f"{where}.max_running_jobs")
        if "max_running_jobs" in table
        else defaults.max_running_jobs,
        max_limits=MappingProxyType(caps),
        max_total=MappingProxyType(totals),
    )


def _parse(data: Mapping[str, object]) -> dict[str, IdentityPolicy]:
    _check_keys(data, frozenset({"defaults", "identities"}), "<top level>")
    raw_defaults = _table(data.get("defaults", {}), "defaults")
    _check_keys(raw_defaults, _COMMON_KEYS, "defaults")
    defaults = _Defaults(
        run_as=_run_as(raw_defaults["run_as"], "defaults.run_as") if "run_as" in raw_defaults else None,
        max_running_jobs=_int(
            raw_defaults.get("max_running_jobs", 32), "defaults.max_running_jobs"
        ),
        programs=_programs(raw_defaults.get("programs", []), "defaults.programs"),
        max_limits=MappingProxyType(
            _limits(raw_defaults.get("max_limits", {}), "defaults.max_limits")
        ),
        max_total=MappingProxyType(
            _limits(raw_defaults.get("max_total", {}), "defaults.max_total", TOTAL_FIELDS)
        ),
    )
    identities = _table(data.get("identities", {}), "identities")
    return {name: _parse_identity(name, raw, defaults) for name, raw in identities.items()}


# --- the policy ----------------------------------------------------------------------------


class Policy:
    """An immutable authorization policy."""

    def __init__(self, identities: Mapping[str, IdentityPolicy], *, source: str) -> None:
        self._identities = dict(identities)
        self.source = source  # where it came from, for messages

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>") -> Policy:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{source}: invalid TOML: {exc}") from exc
        try:
            return cls(_parse(data), source=source)
        except PolicyError as exc:
            raise PolicyError(f"{source}: {exc}") from None

    @classmethod
    def default(cls) -> Policy:
        """The built-in policy: admin is an admin; alice and bob are users; nobody else."""
        return cls.from_toml(DEFAULT_POLICY_TOML, source="<built-in policy>")

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read the policy file {path}: {exc}") from exc
        return cls.from_toml(text, source=str(path))

    @property
    def identities(self) -> Mapping[str, IdentityPolicy]:
        return MappingProxyType(self._identities)

    def lookup(self, identity: str | None) -> IdentityPolicy:
        """The policy of ``identity``; :class:`PermissionDenied` if it has none."""
        if identity is None:
            raise PermissionDenied(
                "the client certificate has no single usable subject common name; "
                "use a certificate issued with `trio-jobs certs issue NAME`"
            )
        try:
            return self._identities[identity]
        except KeyError:
            raise PermissionDenied(
                f"identity {identity!r} is not allowed on this server; ask its operator to add "
                f"[identities.{_toml_key(identity)}] to the policy ({self.source})"
            ) from None

    def check_program(
        self, who: IdentityPolicy, resolved_path: str, *, file_id: tuple[int, int] | None = None,
        search_path: str = DEFAULT_SEARCH_PATH,
    ) -> str:
        """Allow or refuse (:class:`PermissionDenied`) running the executable at ``resolved_path``;
        return the path to execute.

        ``file_id`` is the (device, inode) of the file the job's user opened at
        ``resolved_path`` (without it, the path is looked at now, which only suits callers that
        execute nothing). See the module docstring for the rule. An identity that may run
        anything executes ``resolved_path``; a restricted one executes the policy's own path of
        the entry that matched.
        """
        if who.programs is None:
            return resolved_path
        if not os.path.isabs(resolved_path):
            raise PermissionDenied(f"cannot authorize {resolved_path!r}: not an absolute path")
        denied = PermissionDenied(
            f"identity {who.name!r} may not run {resolved_path!r} "
            f"(allowed: {', '.join(sorted(who.programs)) or 'nothing'})"
        )
        if file_id is None:
            try:
                target = os.stat(resolved_path)
            except OSError:
                raise denied from None
            file_id = (target.st_dev, target.st_ino)
        for entry in sorted(who.programs):
            allowed = entry if entry.startswith("/") else shutil.which(entry, path=search_path)
            if allowed is None:
                continue
            try:
                st = os.stat(allowed)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == file_id:
                return allowed
        raise denied

    def check_env(self, who: IdentityPolicy, names: Iterable[str]) -> None:
        """Refuse (:class:`PermissionDenied`) loader variables to a restricted identity (they
        would load other code into its allowed programs)."""
        if who.programs is None:
            return
        for name in names:
            if name.startswith("LD_") or name in LOADER_VARIABLES:
                raise PermissionDenied(
                    f"identity {who.name!r} may run only some programs, so it may not set "
                    f"{name} (it would make them load other code); drop it from the environment"
                )

    def check_limits(self, who: IdentityPolicy, limits: Mapping[str, int | None]) -> None:
        """Refuse (:class:`LimitAboveCap`) a job whose effective limits exceed the caps.

        ``limits`` maps LIMIT_FIELDS names to the job's effective value (after defaults);
        ``None`` means unlimited, which exceeds any cap.
        """
        for name, cap in who.max_limits.items():
            value = limits.get(name)
            if value is None or value > cap:
                shown = "unlimited" if value is None else str(value)
                raise LimitAboveCap(
                    f"{name}={shown} is above the cap of {cap} for identity {who.name!r}; "
                    "ask for less"
                )

    def check_running_jobs(self, who: IdentityPolicy, running: int) -> None:
        """Refuse (:class:`QuotaExceeded`) a new job when ``running`` jobs already run."""
        if running >= who.max_running_jobs:
            raise QuotaExceeded(
                f"identity {who.name!r} already has {running} running jobs (the maximum is "
                f"{who.max_running_jobs}); stop one or wait for one to end"
            )

    def resolve_run_as(
        self, who: IdentityPolicy, *, euid: int | None = None, dynamic: DynamicUsers | None = None
    ) -> UnixUser | None:
        """The Unix user ``who``'s jobs run as, or ``None`` for the server's own user.

        Only a root server (``euid`` 0) can switch users; otherwise jobs always run as the
        server's user and ``run_as`` is not used (the server should say so at start). A
        non-admin identity without ``run_as`` gets its dynamic user from ``dynamic``; without
        one (an embedder that passed none) it is refused (PolicyError): it would otherwise run
        as root.
        """
        if (os.geteuid() if euid is None else euid) != 0:
            return None
        if who.run_as is None:
            if who.admin:
                return None
            if dynamic is None:
                raise PolicyError(
                    f"identity {who.name!r} has no run_as user and no dynamic users are "
                    "available; set run_as in the policy"
                )
            user = dynamic.get(who.name)
            return UnixUser(name=user.name, uid=user.uid, gid=user.uid, groups=(user.uid,), home="/")
        if who.run_as == "":
            return None
        return lookup_unix_user(who.run_as)

    def check_users(self, *, euid: int | None = None, dynamic: DynamicUsers | None = None) -> None:
        """Resolve every ``run_as`` now (at server start), so a typo fails early."""
        for who in self._identities.values():
            self.resolve_run_as(who, euid=euid, dynamic=dynamic)

    def shared_users(self) -> list[tuple[str, list[str]]]:
        """(user, identities) for each named ``run_as`` user that several non-admin identities
        share: their jobs can signal and trace each other (the server warns)."""
        by_user: dict[str, list[str]] = {}
        for who in self._identities.values():
            if who.run_as and not who.admin:
                by_user.setdefault(who.run_as, []).append(who.name)
        return [(user, sorted(names)) for user, names in sorted(by_user.items()) if len(names) > 1]


def lookup_unix_user(name: str) -> UnixUser:
    """Resolve a Unix user name with pwd/grp; :class:`PolicyError` if it does not exist."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PolicyError(
            f"run_as user {name!r} does not exist on this host: create it or change the policy"
        ) from None
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        groups = (entry.pw_gid,)
    with_primary = (entry.pw_gid, *(g for g in groups if g != entry.pw_gid))
    return UnixUser(
        name=entry.pw_name,
        uid=entry.pw_uid,
        gid=entry.pw_gid,
        groups=with_primary,
        home=entry.pw_dir or "/",
    )


def _toml_key(name: str) -> str:
    bare = name.replace("-", "").replace("_", "")
    return name if bare.isalnum() and bare.isascii() else json.dumps(name)
