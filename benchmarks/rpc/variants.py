"""The rows of the rpc benchmark: the peers, our layer in each rpc mode, our layer from a checkout.

Our layer has two switches (DESIGN §5), read from the environment by our server and our
client alike: ``TRIO_JOBS_RPC_TRANSPORT=lean|ssl-stream`` and ``TRIO_JOBS_RPC_FAST_PATHS=1|0``.
Each of the four combinations is a row of its own whose two processes start with both
variables set (never inherited from the runner's shell). The default one (lean, fast paths)
keeps the name the docs and the targets use, ``trio_jobs.rpc``; the others are labelled with
the words of the server's banner, ``trio_jobs.rpc transport=ssl-stream fast-paths=off``.
Every process of our layer reports the mode it resolved and where its ``trio_jobs`` came from
(``common.RanAs``); a row whose processes did not run what its label says fails
(:func:`check_ran`) rather than print figures under the wrong name.

``--ab PATH`` adds a row of our layer run from another checkout: a before/after in one run,
alternating in the same rounds on the same machine. Only ``trio_jobs`` comes from PATH; the
benchmark's own code (the server's handlers, the client's loops, the measurement) is this
checkout's, so both rows measure alike. ``python -m`` puts the working directory first on
``sys.path``, ahead of ``PYTHONPATH``, and PATH has a ``benchmarks`` package of its own, so
that row's processes start in a directory of the run that holds nothing but a ``trio_jobs``
symlink to PATH's, with this checkout after it on ``PYTHONPATH`` (the editable install's
``.pth`` entry comes later still).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from benchmarks.rpc.common import RanAs

ROOT: Final = Path(__file__).resolve().parents[2]
TRANSPORT_ENV: Final = "TRIO_JOBS_RPC_TRANSPORT"
FAST_PATHS_ENV: Final = "TRIO_JOBS_RPC_FAST_PATHS"
# (transport, fast paths): the first is the default, the row named plain ``trio_jobs.rpc``.
MODES: Final[tuple[tuple[str, bool], ...]] = (
    ("lean", True),
    ("lean", False),
    ("ssl-stream", True),
    ("ssl-stream", False),
)
OURS: Final = "trio_jobs.rpc"
BASE_LABELS: Final = {
    "ours": OURS,
    "grpcio": "grpcio (aio)",
    "grpclib": "grpclib",
    "tls": "bare trio.SSLStream",
}
Role = Literal["server", "client"]


def mode_words(transport: str, fast_paths: bool) -> str:
    """What ``RpcMode.describe()`` says of a mode whose fast paths are really used."""
    return f"transport={transport} fast-paths={'on' if fast_paths else 'off'}"


DEFAULT_MODE: Final = mode_words(*MODES[0])


@dataclass(frozen=True, kw_only=True)
class Peer:
    """One row: which peer's code, its name in the tables, and for ours its mode and code."""

    key: str  # unique, stable across rounds: "ours" for the default row, "grpcio", ...
    impl: str  # one of common.IMPLS
    label: str
    mode: str | None = None  # ours: what both processes must report (mode_words)
    env: dict[str, str] = field(default_factory=dict)  # set for both processes
    server_tree: Path | None = None  # ours from another checkout: its server's trio_jobs ...
    client_tree: Path | None = None  # ... and its client's (None: this checkout's)
    shim: Path | None = None  # the directory holding only the trio_jobs symlink (module doc)

    @property
    def is_ours(self) -> bool:
        return self.impl == "ours"

    @property
    def is_default(self) -> bool:
        return self.key == "ours"

    @property
    def is_before(self) -> bool:
        return self.server_tree is not None

    def tree(self, role: Role) -> Path | None:
        return self.server_tree if role == "server" else self.client_tree

    def launch(self, role: Role) -> tuple[dict[str, str], Path]:
        """The environment and the working directory of this row's ``role`` process."""
        env = {k: v for k, v in os.environ.items() if k not in (TRANSPORT_ENV, FAST_PATHS_ENV)}
        env.update(self.env)
        if self.tree(role) is None:
            return env, ROOT
        assert self.shim is not None
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.shim), str(ROOT), env.get("PYTHONPATH")) if p)
        return env, self.shim


def check_ran(peer: Peer, role: Role, ran: RanAs) -> None:
    """Raise RuntimeError unless ``peer``'s ``role`` process ran the code and the mode its row
    says. A checkout from before ``RpcMode`` reports no mode: it has only the one."""
    if not peer.is_ours:
        return
    tree = peer.tree(role)
    want_code = os.path.realpath((tree or ROOT) / "trio_jobs")
    if ran.code != want_code:
        raise RuntimeError(f"{peer.label}: the {role} imported trio_jobs from {ran.code}, not {want_code}")
    if ran.mode != peer.mode and not (tree is not None and ran.mode is None):
        raise RuntimeError(f"{peer.label}: the {role} ran {ran.mode or 'without RpcMode'}, not {peer.mode}")


def short_commit(tree: Path) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def make_shim(tree: Path, run_dir: Path) -> Path:
    """A directory of the run holding only ``trio_jobs`` -> ``tree``'s (module docstring)."""
    shim = run_dir / "ab-code"
    shim.mkdir()
    (shim / "trio_jobs").symlink_to(tree.resolve() / "trio_jobs", target_is_directory=True)
    return shim


def build_peers(
    impls: list[str], *, all_modes: bool, ab: Path | None = None, ab_client: bool = True, shim: Path | None = None
) -> list[Peer]:
    """The rows in table order: ours (each mode, then the checkout's), then the others.

    ``ab_client``: the checkout's row runs its client from the checkout too (the whole layer
    then and now); False keeps this checkout's client, so only the server differs.
    """
    peers: list[Peer] = []
    if "ours" in impls:
        for n, (transport, fast) in enumerate(MODES if all_modes else MODES[:1]):
            words = mode_words(transport, fast)
            peers.append(Peer(
                key="ours" if n == 0 else f"ours {words}",
                impl="ours",
                label=OURS if n == 0 else f"{OURS} {words}",
                mode=words,
                env={TRANSPORT_ENV: transport, FAST_PATHS_ENV: "1" if fast else "0"},
            ))
        if ab is not None:
            # The default mode's variables: a checkout that has RpcMode runs its default, an
            # older one ignores them.
            peers.append(Peer(
                key="ours before",
                impl="ours",
                label=f"{OURS} at {short_commit(ab) or ab}",
                mode=DEFAULT_MODE,
                env=dict(peers[0].env),
                server_tree=ab,
                client_tree=ab if ab_client else None,
                shim=shim,
            ))
    peers += [Peer(key=i, impl=i, label=BASE_LABELS[i]) for i in BASE_LABELS if i in impls and i != "ours"]
    return peers


def round_order(peers: list[Peer], n: int) -> list[Peer]:
    """Round ``n``'s order: our rows rotated by one each round (none always runs first, as the
    machine drifts within a round), then the other peers as before."""
    ours = [p for p in peers if p.is_ours]
    k = n % len(ours) if ours else 0
    return ours[k:] + ours[:k] + [p for p in peers if not p.is_ours]
