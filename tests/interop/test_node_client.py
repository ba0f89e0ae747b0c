"""A stranger's client: the official Node.js gRPC library (@grpc/grpc-js) drives the server.

grpc-js is an independent HTTP/2 and gRPC implementation (pure JavaScript), so this checks
the wire contract of proto/ and the development PKI from outside Python: ALPN, mutual TLS
1.3, every JobService RPC, status codes and messages, binary output, Health/Check. The
packages are installed with npm into a cache outside the repository on first use; the test
is skipped, with the reason, where node or npm or the registry is not available.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:
    from e2e.conftest import Host

pytestmark = pytest.mark.slow

ROOT: Final = Path(__file__).resolve().parents[2]
SCRIPT: Final = Path(__file__).with_name("node_client.js")
PACKAGES: Final = ("@grpc/grpc-js@1", "@grpc/proto-loader@0")


def _node_modules() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: the Node.js gRPC interop check needs them")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "trio-jobs" / "node"
    modules = cache / "node_modules"
    if not (modules / "@grpc" / "grpc-js").is_dir() or not (modules / "@grpc" / "proto-loader").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        if not (cache / "package.json").exists():
            (cache / "package.json").write_text('{"private": true}\n')
        try:
            subprocess.run(
                ["npm", "install", "--no-audit", "--no-fund", "--silent", *PACKAGES],
                cwd=cache,
                check=True,
                capture_output=True,
                timeout=180,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"could not install {' '.join(PACKAGES)} with npm: {exc}")
    return modules


def _run_node(modules: Path, host: Host, identity: str) -> dict[str, Any]:
    port = host.address.rsplit(":", 1)[1]
    result = subprocess.run(
        ["node", str(SCRIPT), str(modules), str(ROOT / "proto"), str(host.home / "pki"), identity, f"localhost:{port}"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    seen: dict[str, Any] = json.loads(result.stdout)
    return seen


def test_grpc_js_drives_every_rpc(served: Host) -> None:
    seen = _run_node(_node_modules(), served, "alice")

    assert seen["health"] == {"response": {"status": "SERVING"}}
    started = seen["start"]["response"]
    assert started["status"]["state"] == "JOB_STATE_RUNNING"
    assert started["status"]["owner"] == "alice"
    assert started["status"]["limits"]["memory_bytes"] == "268435456"

    stream = seen["stream"]
    assert stream["code"] == 0, stream
    output = b"".join(base64.b64decode(c["data"]) for c in stream["chunks"])
    assert output == b"hello from node\n\x00\xff"  # binary output survives byte for byte

    status = seen["status"]["response"]
    assert (status["state"], status["exit_code"]) == ("JOB_STATE_EXITED", 3)
    assert [j["job_id"] for j in seen["list"]["response"]["jobs"]] == [started["job_id"]]

    stopped = seen["stop"]["response"]
    assert stopped["force_ended"] is True
    assert stopped["status"]["state"] == "JOB_STATE_KILLED"
    assert stopped["status"]["stopped_by_user"] is True

    assert seen["not_found"]["code"] == 5  # NOT_FOUND
    assert seen["bad_program"]["code"] == 3  # INVALID_ARGUMENT, not a job
    assert "/nonexistent/program" in seen["bad_program"]["details"]
    assert seen["bad_stream"]["code"] == 5
    assert seen["bad_stream"]["chunks"] == []


def test_grpc_js_identity_outside_policy_is_denied(served: Host) -> None:
    modules = _node_modules()
    served.run("certs", "issue", "mallory", "--dir", str(served.home / "pki"))
    port = served.address.rsplit(":", 1)[1]
    script = (
        "const [m, p, k, a] = process.argv.slice(1);"
        "const path = require('path'), fs = require('fs');"
        "const grpc = require(path.join(m, '@grpc/grpc-js'));"
        "const loader = require(path.join(m, '@grpc/proto-loader'));"
        "const def = loader.loadSync('trio_jobs/v1/jobs.proto', {includeDirs: [p]});"
        "const S = grpc.loadPackageDefinition(def).trio_jobs.v1.JobService;"
        "const r = (n) => fs.readFileSync(path.join(k, n));"
        "const c = new S(a, grpc.credentials.createSsl(r('ca.crt'), r('mallory.key'), r('mallory.crt')));"
        "c.ListJobs({}, (err) => { console.log(JSON.stringify({code: err ? err.code : 0,"
        " details: err ? err.details : ''})); c.close(); });"
    )
    result = subprocess.run(
        ["node", "-e", script, str(modules), str(ROOT / "proto"), str(served.home / "pki"), f"localhost:{port}"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    answer = json.loads(result.stdout)
    assert answer["code"] == 7, answer  # PERMISSION_DENIED
    assert "mallory" in answer["details"]
