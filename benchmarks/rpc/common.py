"""What the benchmark processes share: the workload, proto generation, PKI, results."""

from __future__ import annotations

import ctypes
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
    """One peer's figures (latency in microseconds, rate in 10^6 bytes per second).

    ``stream_server_cpu_s_per_gib``: CPU time (user + sys, all threads) of the server process
    over the streaming calls, in seconds per GiB (2^30 bytes) of payload it sent: what the
    server's copies and encryption cost per byte, whatever the client's speed.
    """

    unary_p50_us: float
    unary_p99_us: float
    c64_qps: float
    stream_mbps: float
    stream_server_cpu_s_per_gib: float


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
    return Result(**{
        f.name: statistics.median(getattr(r, f.name) for r in runs) for f in dataclasses.fields(Result)
    })


@dataclass(frozen=True, kw_only=True)
class RanAs:
    """What one of our processes says it ran, so that no row is labelled with a wish.

    ``mode``: the ``RpcMode.describe()`` its server or channel resolved (``transport=lean
    fast-paths=on``), None where there is none (another peer, or a checkout from before
    ``RpcMode``). ``code``: the directory of the ``trio_jobs`` package it imported (the
    ``--ab`` checkout or this one), None for the other peers.
    """

    mode: str | None = None
    code: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RanAs:
        return cls(**json.loads(text)) if text.strip() else cls()


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


def announce_port(port: int, ran: RanAs | None = None) -> None:
    """Tell the runner the server is ready: one line on stdout, ``READY <port>`` and, for our
    servers, what they run (:class:`RanAs` as JSON)."""
    os.write(1, f"READY {port}{'' if ran is None else ' ' + ran.to_json()}\n".encode())


def process_cpu_clock(pid: int) -> Callable[[], float]:
    """A function that reads the CPU time (seconds, user + sys, all threads) of process ``pid``.

    It is the process's own CPU-time clock (``clock_getcpuclockid``: the clock behind
    ``time.process_time()`` in that process, in ns), read from outside: the client reads its
    server's at the exact start and end of each streaming call, with no side channel, and
    for every peer alike (grpcio's threads included). ``/proc/<pid>/stat`` would count in
    10 ms ticks, too coarse for a smoke run's few milliseconds.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    clock = ctypes.c_int()
    err = libc.clock_getcpuclockid(pid, ctypes.byref(clock))
    if err != 0:
        raise OSError(err, f"clock_getcpuclockid({pid}): {os.strerror(err)}")
    clock_id = clock.value

    def read() -> float:
        return time.clock_gettime(clock_id)

    read()  # fails now (EINVAL) rather than mid-measurement if the process is gone
    return read


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


GIB: Final = 1 << 30


async def measure_stream(
    stream: Callable[[], Awaitable[int]], work: Workload, server_cpu: Callable[[], float]
) -> tuple[float, float]:
    """Streaming calls of ``stream_count`` messages: the median rate in MB/s (10^6 B/s), and
    the server's CPU seconds per GiB of payload over all the calls.

    ``stream`` makes one call and returns the payload bytes it received; ``server_cpu``
    reads the server process's CPU time (:func:`process_cpu_clock`).
    """
    rates: list[float] = []
    cpu = 0.0
    want = work.stream_count * work.stream_size
    for _ in range(work.stream_rounds):
        cpu_start, start = server_cpu(), time.perf_counter()
        got = await stream()
        elapsed, cpu_end = time.perf_counter() - start, server_cpu()
        if got != want:
            raise RuntimeError(f"streaming call delivered {got} bytes, expected {want}")
        rates.append(stream_rate(got, elapsed))
        cpu += cpu_end - cpu_start
    return statistics.median(rates), cpu / (want * work.stream_rounds / GIB)


async def measure(
    *,
    unary: Call,
    stream: Callable[[], Awaitable[int]],
    gather: Callable[[list[Call]], Awaitable[None]],
    work: Workload,
    server_cpu: Callable[[], float],
) -> Result:
    """All the figures with one peer's client functions (any async framework)."""
    p50, p99 = await measure_c1(unary, work)
    qps = await measure_concurrent(unary, gather, work)
    mbps, cpu = await measure_stream(stream, work, server_cpu)
    return Result(
        unary_p50_us=p50, unary_p99_us=p99, c64_qps=qps, stream_mbps=mbps, stream_server_cpu_s_per_gib=cpu
    )


SERVER_START_TIMEOUT: Final = 60.0  # seconds for a server to print READY (imports, key loading)


def start_ready_server(
    argv: list[str], cwd: Path, what: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int, str]:
    """Run a benchmark server process and wait for its ``READY <port> [what it runs]`` line:
    the process, the port and the rest of the line (JSON :class:`RanAs` from our servers)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=cwd, env=env)
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
    _, port, *rest = line.split(maxsplit=2)
    return proc, int(port), " ".join(rest)


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
