"""The h2 version guard (``rpc/_h2/guard.py``) and the mode switches (``rpc/_mode.py``).

An h2 without one of the internals the fast session uses must give the pure session, with
one warning line, and the mode must say so; the installed h2 (the pinned one) passes.
A bad environment value is refused by name, by the library and by the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

from trio_jobs.rpc._client_protocol import ClientProtocol
from trio_jobs.rpc._h2 import guard
from trio_jobs.rpc._mode import RpcMode

pytestmark = pytest.mark.one_rpc_mode  # sets the modes it checks itself

# Run in a fresh interpreter: the guard decides once, at its first import.
PROBE = """
import logging, sys
logging.basicConfig(stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
import importlib
import h2.connection  # (h2 loaded whole first: its modules keep their own references)
module, name = sys.argv[1].split(":")
delattr(importlib.import_module(module), name)  # what a newer h2 might have renamed
from trio_jobs.rpc._client_protocol import ClientProtocol
from trio_jobs.rpc._mode import RpcMode
proto = ClientProtocol(max_receive_message=1024, max_concurrent_streams=10,
    max_header_list_size=8192, stream_window=65535, connection_window=65535,
    max_frame_size=16384, clock=lambda: 0.0, fast_paths=True)
proto.initiate()
sid = proto.start_request("/p.S/M", authority="h:1")
assert proto.data_to_send()
ClientProtocol(max_receive_message=1024, max_concurrent_streams=10,
    max_header_list_size=8192, stream_window=65535, connection_window=65535,
    max_frame_size=16384, clock=lambda: 0.0, fast_paths=True)
print(proto.fast_paths, RpcMode().describe())
"""


def _probe(missing: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIO_JOBS_RPC_")}
    return subprocess.run(
        [sys.executable, "-c", PROBE, missing], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("missing", ["h2.utilities:extract_method_header", "h2.utilities:authority_from_headers"])
def test_an_h2_without_an_internal_gets_the_pure_session_and_one_warning(missing: str) -> None:
    """(h2 itself keeps working without these: its modules hold their own references;
    only the fast session's import of them fails, as with an h2 that renamed them.)"""
    done = _probe(missing)
    assert done.returncode == 0, done.stderr
    fast, mode = done.stdout.split(" ", 1)
    assert fast == "False"  # asked for the fast paths, got the pure session (it works)
    assert f"fast-paths=off (h2 {guard._version()}: " in mode
    assert missing.split(":")[1] in mode
    assert mode.startswith("transport=lean ")
    warnings = [line for line in done.stderr.splitlines() if "fast paths off" in line]
    assert len(warnings) == 1, done.stderr  # one line, however many connections
    assert warnings[0].startswith("WARNING trio_jobs.rpc: ")


def test_the_installed_h2_passes_the_guard() -> None:
    assert guard.UNAVAILABLE_REASON is None
    assert guard.FAST_PATHS_AVAILABLE
    version = ".".join(guard._version().split(".")[:2])
    assert version in guard.TESTED_H2  # pyproject pins h2 to the tested minors
    common: dict[str, Any] = {
        "max_receive_message": 1024, "max_concurrent_streams": 10, "max_header_list_size": 8192,
        "stream_window": 65535, "connection_window": 65535, "max_frame_size": 16384,
        "clock": lambda: 0.0,
    }  # fmt: skip
    assert ClientProtocol(**common, fast_paths=True).fast_paths
    assert not ClientProtocol(**common, fast_paths=False).fast_paths
    assert RpcMode().describe() == "transport=lean fast-paths=on"
    assert RpcMode(transport="ssl-stream", fast_paths=False).describe() == "transport=ssl-stream fast-paths=off"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"TRIO_JOBS_RPC_TRANSPORT": "tls"}, "TRIO_JOBS_RPC_TRANSPORT must be lean or ssl-stream, not 'tls'"),
        ({"TRIO_JOBS_RPC_FAST_PATHS": "yes"}, "TRIO_JOBS_RPC_FAST_PATHS must be 1 or 0, not 'yes'"),
    ],
)
def test_a_bad_mode_value_is_refused_by_name(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        RpcMode.from_environ(env)
    # ... and by the CLI, before it connects anywhere: exit 8 (configuration), no traceback
    cli_env = {**os.environ, **env, "TRIO_JOBS_SERVER": "127.0.0.1:1"}
    for argv in (["status", "0" * 32], ["serve", "--port", "0"]):
        done = subprocess.run(
            [sys.executable, "-m", "trio_jobs.cli", *argv], env=cli_env, capture_output=True, text=True,
            timeout=60,
        )
        assert done.returncode == 8, (argv, done.stderr)
        assert done.stderr == f"trio-jobs: error: {named}\n", argv


def test_unset_or_empty_is_the_default() -> None:
    assert RpcMode.from_environ({}) == RpcMode(transport="lean", fast_paths=True)
    assert RpcMode.from_environ({"TRIO_JOBS_RPC_TRANSPORT": "", "TRIO_JOBS_RPC_FAST_PATHS": ""}) == RpcMode()
    assert RpcMode.from_environ({"TRIO_JOBS_RPC_TRANSPORT": "ssl-stream", "TRIO_JOBS_RPC_FAST_PATHS": "0"}) == (
        RpcMode(transport="ssl-stream", fast_paths=False)
    )
