"""What the benchmark processes share: the workload, proto generation, PKI, results."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from trio_jobs.security import tls
from trio_jobs.security.pki import init_dev_pki

if TYPE_CHECKING:
    import ssl

HERE: Final = Path(__file__).resolve().parent
PROTO: Final = HERE / "bench.proto"
SERVICE: Final = "bench.v1.Bench"
UNARY_PATH: Final = f"/{SERVICE}/Unary"
STREAM_PATH: Final = f"/{SERVICE}/Stream"
HOST: Final = "127.0.0.1"
SERVER_NAME: Final = "localhost"
IMPLS: Final = ("ours", "grpcio", "grpclib", "tls")


@dataclass(frozen=True, kw_only=True)
class Workload:
    """How much each client does; the same for every peer."""

    unary_size: int = 64  # bytes of data in each unary request and response
    unary_warmup: int = 300
    unary_calls: int = 5000  # sequential calls (c=1) timed one by one
    concurrency: int = 64
    c64_calls: int = 12_800  # calls in total across the concurrent tasks, one connection
    stream_size: int = 65536  # bytes of data per streamed message
    stream_count: int = 3200  # messages per streaming call (200 MiB)
    stream_rounds: int = 3  # streaming calls; the median rate is reported
    status_warmup: int = 300  # the status phase (benchmarks/rpc/status.py): per server call
    status_calls: int = 3000  # timed calls of each of the three
    status_block: int = 50  # calls of one kind in a row before the next kind

    @classmethod
    def quick(cls) -> Workload:
        return cls(
            unary_warmup=20,
            unary_calls=200,
            c64_calls=640,
            stream_count=64,
            stream_rounds=1,
            status_warmup=20,
            status_calls=200,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        return cls(**json.loads(text))


@dataclass(frozen=True, kw_only=True)
class Result:
    """One peer's figures (latency in microseconds, rate in 10^6 bytes per second)."""

    unary_p50_us: float
    unary_p99_us: float
    c64_qps: float
    stream_mbps: float

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Result:
        return cls(**json.loads(text))


@dataclass(frozen=True, kw_only=True)
class StatusResult:
    """The status phase's figures (microseconds), all measured with the grpcio client."""

    status_p50_us: float  # our GetJobStatus of an ended job
    status_p99_us: float
    check_p50_us: float  # our grpc.health.v1.Health/Check
    grpcio_p50_us: float  # grpcio's server, grpc.health.v1.Health/Check
    grpcio_p99_us: float

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StatusResult:
        return cls(**json.loads(text))


def median_status(runs: list[StatusResult]) -> StatusResult:
    """Each figure's median over the rounds."""
    return StatusResult(**{
        f.name: statistics.median(getattr(r, f.name) for r in runs) for f in dataclasses.fields(StatusResult)
    })


def median_result(runs: list[Result]) -> Result:
    """Each figure's median over interleaved rounds (a p99 too: the median round's p99)."""
    return Result(
        unary_p50_us=statistics.median(r.unary_p50_us for r in runs),
        unary_p99_us=statistics.median(r.unary_p99_us for r in runs),
        c64_qps=statistics.median(r.c64_qps for r in runs),
        stream_mbps=statistics.median(r.stream_mbps for r in runs),
    )


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) by the inclusive method; needs at least two samples."""
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[round(q) - 1]


def stream_rate(bytes_moved: int, seconds: float) -> float:
    return bytes_moved / seconds / 1e6


def generate_code(out: Path) -> None:
    """Compile bench.proto for protobuf, grpcio and grpclib into ``out`` (grpc_tools)."""
    from grpc_tools import protoc  # a dev dependency; only the benchmark needs it

    plugin = Path(sys.executable).parent / "protoc-gen-grpclib_python"
    if not plugin.exists():
        raise SystemExit(f"benchmark: {plugin} is missing (pip install grpclib[protobuf])")
    out.mkdir(parents=True, exist_ok=True)
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{HERE}",
            f"-I{include}",
            f"--plugin=protoc-gen-grpclib_python={plugin}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--grpclib_python_out={out}",
            str(PROTO),
        ]
    )
    if code != 0:
        raise SystemExit(f"benchmark: protoc failed with {code} on {PROTO}")


def load_generated(gen: Path, name: str) -> Any:
    """Import one generated module (``bench_pb2``, ``bench_pb2_grpc``, ``bench_grpc``)."""
    if str(gen) not in sys.path:
        sys.path.insert(0, str(gen))
    return importlib.import_module(name)


def make_pki(pki: Path) -> None:
    init_dev_pki(pki)


def server_context(pki: Path) -> ssl.SSLContext:
    return tls.server_ssl_context(
        cert=pki / "server.crt", key=pki / "server.key", ca=pki / "ca.crt"
    )


def client_context(pki: Path) -> ssl.SSLContext:
    return tls.client_ssl_context(cert=pki / "admin.crt", key=pki / "admin.key", ca=pki / "ca.crt")


def pem(pki: Path, name: str) -> bytes:
    return (pki / name).read_bytes()


def announce_port(port: int) -> None:
    """Tell the runner the server is ready (one line on stdout)."""
    os.write(1, f"READY {port}\n".encode())


Call = Callable[[], Awaitable[None]]


async def measure_c1(unary: Call, work: Workload) -> tuple[float, float]:
    """Sequential calls timed one by one: (p50, p99) in microseconds."""
    for _ in range(work.unary_warmup):
        await unary()
    latencies: list[float] = []
    for _ in range(work.unary_calls):
        start = time.perf_counter()
        await unary()
        latencies.append((time.perf_counter() - start) * 1e6)
    return percentile(latencies, 50), percentile(latencies, 99)


async def measure_concurrent(
    unary: Call, gather: Callable[[list[Call]], Awaitable[None]], work: Workload
) -> float:
    """``work.concurrency`` tasks sharing one connection: calls per second."""
    per_task = work.c64_calls // work.concurrency

    async def task() -> None:
        for _ in range(per_task):
            await unary()

    start = time.perf_counter()
    await gather([task] * work.concurrency)
    return per_task * work.concurrency / (time.perf_counter() - start)


async def measure_stream(stream: Callable[[], Awaitable[int]], work: Workload) -> float:
    """Streaming calls of ``stream_count`` messages: the median rate in MB/s (10^6 B/s).

    ``stream`` makes one call and returns the payload bytes it received.
    """
    rates: list[float] = []
    want = work.stream_count * work.stream_size
    for _ in range(work.stream_rounds):
        start = time.perf_counter()
        got = await stream()
        elapsed = time.perf_counter() - start
        if got != want:
            raise RuntimeError(f"streaming call delivered {got} bytes, expected {want}")
        rates.append(stream_rate(got, elapsed))
    return statistics.median(rates)


async def measure(
    *,
    unary: Call,
    stream: Callable[[], Awaitable[int]],
    gather: Callable[[list[Call]], Awaitable[None]],
    work: Workload,
) -> Result:
    """All three figures with one peer's client functions (any async framework)."""
    p50, p99 = await measure_c1(unary, work)
    qps = await measure_concurrent(unary, gather, work)
    mbps = await measure_stream(stream, work)
    return Result(unary_p50_us=p50, unary_p99_us=p99, c64_qps=qps, stream_mbps=mbps)


SERVER_START_TIMEOUT: Final = 60.0  # seconds for a server to print READY (imports, key loading)


def start_ready_server(argv: list[str], cwd: Path, what: str) -> tuple[subprocess.Popen[bytes], int]:
    """Run a benchmark server process and wait for its ``READY <port>`` line."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=cwd)
    # A server that hangs before READY is killed, which ends the readline below.
    watchdog = threading.Timer(SERVER_START_TIMEOUT, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
    finally:
        watchdog.cancel()
    if not line.startswith("READY "):
        stop_server(proc)
        raise RuntimeError(f"{what} server did not start (exit {proc.returncode}): {line!r}")
    return proc, int(line.split()[1])


def stop_server(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; close its stdout."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
