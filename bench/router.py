"""Router overhead: added latency per request and the front door's max request rate, echo engines.

    python bench/router.py --json

Prints one JSON line. Two paths (and their HTTP doors, below) serve the same zero-cost echo
model (``max_tokens`` copies of one token, answered at once), each in its own processes,
measured in one run by the same stock ``tritonclient.grpc.aio`` client (this process) with unary
``ModelInfer``:

- **direct**: client -> KServe front door (``FrontDoor``) over ``EchoOrchestrator``, one process.
- **routed**: client -> ``RouterService`` (front door, ``DisaggregatedOrchestrator``: validation,
  ``policy.route``, a decode-slot reservation, Prometheus metrics, the default control loop; no
  HTTP ``/metrics`` endpoint) -> ZeroMQ ``Submit`` to an echo
  decode worker and an echo prefill worker (two processes, real ``WorkerServer`` serve loops
  with ``EchoEngine``) -> their ``Tokens`` (and the prefill's ``TransferDone``) back -> response.
  Excluded: model compute, and the KV relay (no KV moves; the decode worker treats the relayed
  transfer as complete at once, see ``bench/_echo.py``). Included: everything else a short
  request pays on the local route.

**Added latency** (``p50_added_ms``, ``p99_added_ms``): both paths get the same offered load,
``--rate`` requests/s paced evenly (``--arrivals poisson`` for Poisson), ``--num-requests`` each,
in ``--rounds`` alternating blocks (direct then routed) after a warm-up, so slow drifts of the
shared machine hit both. Latency is client-side, from the call to the response. The added
latency is the difference of the quantiles: ``p99(routed) - p99(direct)`` (and p50); the client's
own cost and the front door's cost cancel out, what is left is the router's.

**Max rate** (``max_rps``): closed loop, ``--concurrency`` requests always in flight from one
client, for ``--rps-seconds`` after a warm-up; completions per second. The direct path's figure
(``direct_max_rps``, same run, same client) bounds what the client and one front door reach on
this machine; everything shares its cores, so the figures are for the whole set of processes.
During each closed loop the CPU time of every process is read from ``/proc`` and divided by the
requests completed: ``cpu_ms_per_request`` per process, ``added_cpu_ms_per_request`` (routed
minus direct, all processes) and ``cpu_bound_rps`` (the cores divided by the routed path's CPU per
request). These hold on a shared, loaded machine, where latencies and rates do not: compare
``load_average_1m`` with ``cpu_count`` before trusting the latencies.

**The HTTP doors** (``http_p99_added_ms``, ``http_max_rps``, ``http_rps_ratio_to_grpc``, per
door, details under ``http``): the same two servers also serve the KServe v2 REST door
(``infer`` with the same inputs, stock ``tritonclient.http.aio``) and the OpenAI door
(``POST /v1/completions``, aiohttp), so four more paths join the same interleaved rounds and
closed loops: ``<door>_direct`` (the door over the direct server's ``EchoOrchestrator``) and
``<door>`` (the router's door, on the router's loop beside its gRPC door).
``http_p99_added_ms`` is ``p99(<door>) - p99(direct)``: against the direct gRPC call of the same
echo engine, so it counts the router *and* HTTP (server and client) over gRPC; the two parts are
reported as ``door_p99_added_ms`` and ``router_p99_added_ms``. ``http_max_rps`` is the router's
HTTP door's closed-loop rate, and ``http_rps_ratio_to_grpc`` its ratio to the router's gRPC
door's (``max_rps``), same client concurrency, same run; ``cpu_bound_rps_ratio_to_grpc`` is the
same ratio from CPU per request (all processes), which holds on a loaded machine where rates do
not. Targets: ``http_p99_added_ms`` <= 3 ms, ratio >= 0.5 (``http_meets_targets``).

Every process is stopped in ``finally`` (asked, then SIGTERM, then SIGKILL, by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
import tritonclient.http.aio as httpaio

BENCH_DIR = str(Path(__file__).resolve().parent)  # bench/ is not a package: _echo is top-level
MODEL = "tensorrt_llm"
ECHO_CHAR = "x"  # the echo engines answer ``max_tokens`` of it (``_echo.ECHO_TOKEN``)
TARGET_P99_ADDED_MS = 2.0
TARGET_MAX_RPS = 1000.0
TARGET_HTTP_P99_ADDED_MS = 3.0  # each HTTP door, against the direct gRPC call of the echo engine
TARGET_HTTP_RPS_RATIO = 0.5  # each HTTP door's max rate over the gRPC door's, same router
LOG_LEVEL = "WARNING"  # the CLI's default: no per-request log lines, as deployed
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Settings:
    rate_rps: float = 200.0
    num_requests: int = 2000  # per path
    rounds: int = 10  # alternating direct/routed blocks (1 s each at the defaults)
    warmup_requests: int = 100  # per path, before measuring
    max_tokens: int = 4
    poisson: bool = False
    concurrency: int = 64
    rps_seconds: float = 3.0
    rps_warmup_s: float = 0.5
    seed: int = 0


# ---- processes -------------------------------------------------------------------------------


def _serve(entry: str, args: tuple[Any, ...], conn: Connection) -> None:
    """A child's main: configure logging *before* importing the project (its modules bind their
    loggers at import), then run ``_echo.<entry>(*args, conn)``."""
    from trtllm_prfaas.telemetry.logging import configure_logging

    configure_logging(LOG_LEVEL)
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)
    import _echo

    getattr(_echo, entry)(*args, conn)


class Child:
    """A spawned server process (``_echo.<entry>``) that sends one ready message; ``stop()``
    ends it by PID."""

    def __init__(self, entry: str, *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve, args=(entry, args, child_conn), name=f"echo-{entry}", daemon=True
        )
        self.process.start()
        child_conn.close()

    def ready(self, timeout_s: float = START_TIMEOUT_S) -> Any:
        """The child's ready message; raises RuntimeError if it dies or is silent."""
        if not self._conn.poll(timeout_s):
            raise RuntimeError(f"{self.process.name} not ready within {timeout_s}s")
        try:
            return self._conn.recv()
        except EOFError as exc:
            raise RuntimeError(f"{self.process.name} exited ({self.process.exitcode})") from exc

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def ask_to_stop(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Ask it to stop; SIGTERM then SIGKILL its PID if it does not. Returns the exit code."""
        self.ask_to_stop()
        self.process.join(timeout_s)
        for signum in (signal.SIGTERM, signal.SIGKILL):
            if self.process.exitcode is not None or self.process.pid is None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signum)
            self.process.join(timeout_s)
        self._conn.close()
        return self.process.exitcode


@dataclass(frozen=True)
class Target:
    """One door to measure: ``protocol`` ("grpc", "rest" or "openai") at ``address``
    (``host:port`` for gRPC, ``http://host:port`` for the HTTP doors)."""

    protocol: str
    address: str


PROTOCOLS = ("grpc", "rest", "openai")
HTTP_DOORS = ("rest", "openai")


@dataclass(frozen=True)
class Stack:
    """Where each path listens, and the PIDs of the processes serving it.

    Paths: ``direct`` and ``routed`` (gRPC), and per HTTP door ``<door>_direct`` (the door over
    the direct server's ``EchoOrchestrator``) and ``<door>`` (the router's door)."""

    paths: dict[str, Target]
    pids: dict[str, dict[str, int]]


def stack_of(
    direct: dict[str, str],
    routed: dict[str, str],
    direct_pids: dict[str, int],
    routed_pids: dict[str, int],
) -> Stack:
    """A ``Stack`` from the two servers' ready messages (``{protocol: address}``)."""
    paths = {"direct": Target("grpc", direct["grpc"]), "routed": Target("grpc", routed["grpc"])}
    pids = {"direct": direct_pids, "routed": routed_pids}
    for door in HTTP_DOORS:
        paths[f"{door}_direct"] = Target(door, direct[door])
        paths[door] = Target(door, routed[door])
        pids[f"{door}_direct"], pids[door] = direct_pids, routed_pids
    return Stack(paths, pids)


@contextlib.contextmanager
def servers() -> Iterator[Stack]:
    """Start the direct server and the routed stack (router, decode and prefill echo workers)."""
    children: list[Child] = []
    try:
        children.append(direct := Child("serve_direct"))
        children.append(decode := Child("serve_worker", "decode"))
        children.append(prefill := Child("serve_worker", "prefill"))
        workers = [("decode", decode.ready(), False), ("prefill", prefill.ready(), False)]
        children.append(router := Child("serve_router", workers))
        direct_addresses, routed_addresses = direct.ready(), router.ready()
        routed_pids = {"router": router.pid, "decode": decode.pid, "prefill": prefill.pid}
        yield stack_of(direct_addresses, routed_addresses, {"server": direct.pid}, routed_pids)
    finally:
        for child in reversed(children):  # the router first: it would miss its workers
            child.ask_to_stop()
        for child in reversed(children):
            child.stop()


# ---- client ----------------------------------------------------------------------------------


def llm_inputs(max_tokens: int, text: str = "ping", client: Any = grpcclient) -> list[Any]:
    """A Triton + TensorRT-LLM client's inputs: ``text_input``, ``sampling_param_max_tokens``
    (``client``: ``tritonclient.grpc`` or ``tritonclient.http``)."""
    text_input = client.InferInput("text_input", [1], "BYTES")
    text_input.set_data_from_numpy(np.array([text.encode()], dtype=object))
    max_tokens_input = client.InferInput("sampling_param_max_tokens", [1], "INT32")
    max_tokens_input.set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    return [text_input, max_tokens_input]


class Caller:
    """One client for one door: ``await call()`` sends one unary request (``max_tokens`` echo
    tokens for "ping") and returns its seconds, or None if it failed or answered the wrong text.

    gRPC and KServe v2 REST: the stock ``tritonclient`` aio clients (``grpc.aio``, ``http.aio``)
    with the same inputs (``infer``). OpenAI: ``POST /v1/completions`` with aiohttp (what
    ``tritonclient.http.aio`` also runs on), so the HTTP doors share one client stack; the
    ``openai`` client would add its own pydantic parsing to every figure."""

    def __init__(self, target: Target, max_tokens: int) -> None:
        self.target, self.expected = target, ECHO_CHAR * max_tokens
        self._session: aiohttp.ClientSession | None = None
        if target.protocol == "grpc":
            self._client: Any = grpcaio.InferenceServerClient(target.address)
            self._inputs = llm_inputs(max_tokens)
        elif target.protocol == "rest":
            self._client = httpaio.InferenceServerClient(target.address.removeprefix("http://"),
                                                         conn_limit=1024)  # fmt: skip
            self._inputs = llm_inputs(max_tokens, client=httpclient)
        elif target.protocol == "openai":
            self._url = f"{target.address}/v1/completions"
            self._body = {"model": MODEL, "prompt": "ping", "max_tokens": max_tokens}
        else:
            raise ValueError(f"unknown protocol {target.protocol!r}; expected one of {PROTOCOLS}")

    async def call(self) -> float | None:
        start = time.perf_counter()
        try:
            text = await self._text()
        except Exception:
            return None
        elapsed = time.perf_counter() - start
        return elapsed if text == self.expected else None

    async def _text(self) -> str:
        if self.target.protocol != "openai":
            result = await self._client.infer(MODEL, self._inputs)
            return bytes(result.as_numpy("text_output")[0]).decode()
        if self._session is None:  # created on the loop that uses it
            connector = aiohttp.TCPConnector(limit=0)
            self._session = aiohttp.ClientSession(connector=connector)
        async with self._session.post(self._url, json=self._body) as response:
            response.raise_for_status()
            return str((await response.json())["choices"][0]["text"])

    async def close(self) -> None:
        if self.target.protocol != "openai":
            await self._client.close()
        elif self._session is not None:
            await self._session.close()


@dataclass
class OpenLoop:
    """Latencies (seconds) of requests sent at a fixed offered rate."""

    latencies_s: list[float]
    num_errors: int
    max_lateness_s: float  # how far behind schedule the client sent any request


async def open_loop(
    target: Target,
    num_requests: int,
    rate_rps: float,
    max_tokens: int,
    poisson: bool,
    seed: int,
    caller: Caller | None = None,
) -> OpenLoop:
    """Send ``num_requests`` at ``rate_rps`` (evenly paced or Poisson), each on its own task,
    with ``caller`` (kept open) or a client of its own (closed at the end)."""
    owned = caller is None
    caller = caller or Caller(target, max_tokens)
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[float | None]] = []
    lateness, due = 0.0, loop.time() + 0.01
    try:
        for _ in range(num_requests):
            if (delay := due - loop.time()) > 0:
                await asyncio.sleep(delay)
            lateness = max(lateness, loop.time() - due)
            tasks.append(asyncio.create_task(caller.call()))
            due += rng.expovariate(rate_rps) if poisson else 1.0 / rate_rps
        results = await asyncio.gather(*tasks)
    finally:
        if owned:
            await caller.close()
    latencies = [r for r in results if r is not None]
    return OpenLoop(latencies, len(results) - len(latencies), lateness)


@dataclass
class ClosedLoop:
    num_completed: int  # in the measured window
    num_errors: int
    elapsed_s: float

    @property
    def rps(self) -> float:
        return self.num_completed / self.elapsed_s if self.elapsed_s > 0 else 0.0


async def closed_loop(
    target: Target,
    concurrency: int,
    duration_s: float,
    max_tokens: int,
    warmup_s: float = 0.5,
    total: ClosedLoop | None = None,
    caller: Caller | None = None,
) -> ClosedLoop:
    """``concurrency`` requests always in flight; completions counted after ``warmup_s``
    (``total``, if given, also counts the warm-up's). ``caller`` as for ``open_loop``."""
    owned = caller is None
    caller = caller or Caller(target, max_tokens)
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + duration_s
    counts = [0, 0]  # completed in the window, errors

    async def one_slot() -> None:
        while (now := time.perf_counter()) < end:
            ok = await caller.call() is not None
            if now >= measure_from:
                counts[0 if ok else 1] += 1
            if total is not None:
                total.num_completed += ok
                total.num_errors += not ok

    try:
        await asyncio.gather(*(one_slot() for _ in range(concurrency)))
    finally:
        if owned:
            await caller.close()
    return ClosedLoop(counts[0], counts[1], duration_s)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux ``/proc``); NaN where unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    fields = stat.rpartition(")")[2].split()  # fields[11], fields[12]: utime, stime (ticks)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop_cpu(
    target: Target, pids: dict[str, int], s: Settings, caller: Caller | None = None
) -> tuple[ClosedLoop, dict[str, float]]:
    """``closed_loop``, and the CPU milliseconds per completed request of each process in
    ``pids`` and of this client (whole run, warm-up included, over every completion)."""
    pids = {**pids, "client": os.getpid()}
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    counting = ClosedLoop(0, 0, 0.0)
    result = await closed_loop(
        target, s.concurrency, s.rps_seconds, s.max_tokens, s.rps_warmup_s, counting, caller
    )
    after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    done = max(1, counting.num_completed + counting.num_errors)
    return result, {name: round((after[name] - before[name]) / done * 1e3, 4) for name in pids}


# ---- figures ---------------------------------------------------------------------------------


def quantile_ms(latencies_s: Sequence[float], q: float) -> float:
    """The ``q`` quantile in milliseconds (linear interpolation); NaN when empty."""
    if not latencies_s:
        return float("nan")
    return float(np.quantile(np.asarray(latencies_s), q)) * 1e3


@dataclass
class PathFigures:
    num_requests: int
    num_ok: int
    num_errors: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_lateness_ms: float
    max_rps: float
    rps_completed: int
    rps_errors: int
    cpu_ms_per_request: dict[str, float]  # per process, closed loop (client included)


def path_figures(
    runs: Sequence[OpenLoop], rps: ClosedLoop, cpu_ms: dict[str, float]
) -> PathFigures:
    latencies = [t for run in runs for t in run.latencies_s]
    num_errors = sum(run.num_errors for run in runs)
    mean = sum(latencies) / len(latencies) * 1e3 if latencies else float("nan")
    return PathFigures(
        num_requests=len(latencies) + num_errors,
        num_ok=len(latencies),
        num_errors=num_errors,
        p50_ms=round(quantile_ms(latencies, 0.50), 4),
        p99_ms=round(quantile_ms(latencies, 0.99), 4),
        mean_ms=round(mean, 4),
        max_lateness_ms=round(max((run.max_lateness_s for run in runs), default=0.0) * 1e3, 3),
        max_rps=round(rps.rps, 1),
        rps_completed=rps.num_completed,
        rps_errors=rps.num_errors,
        cpu_ms_per_request=cpu_ms,
    )


async def measure(stack: Stack, s: Settings) -> dict[str, Any]:
    """Every path, interleaved: warm-up, ``rounds`` open-loop blocks each, then closed loops.

    One client per path for the whole run, so the connections the warm-up opens (HTTP/1.1 needs
    one per request in flight; gRPC multiplexes one) serve the measured rounds too."""
    callers = {name: Caller(target, s.max_tokens) for name, target in stack.paths.items()}
    try:
        return await _measure(stack, s, callers)
    finally:
        for caller in callers.values():
            await caller.close()


async def _measure(stack: Stack, s: Settings, callers: dict[str, Caller]) -> dict[str, Any]:
    for name, target in stack.paths.items():
        await open_loop(target, s.warmup_requests, s.rate_rps, s.max_tokens, s.poisson, s.seed,
                        callers[name])  # fmt: skip
    runs: dict[str, list[OpenLoop]] = {name: [] for name in stack.paths}
    per_round = [s.num_requests // s.rounds + (i < s.num_requests % s.rounds)
                 for i in range(s.rounds)]  # fmt: skip
    for i, count in enumerate(per_round):
        for name, target in stack.paths.items():
            seed = s.seed + i + 1
            run = await open_loop(target, count, s.rate_rps, s.max_tokens, s.poisson, seed,
                                  callers[name])  # fmt: skip
            runs[name].append(run)
    figures = {}
    for name, target in stack.paths.items():
        rps, cpu_ms = await closed_loop_cpu(target, stack.pids[name], s, callers[name])
        figures[name] = path_figures(runs[name], rps, cpu_ms)
    return report(figures, s)


def http_figures(figures: dict[str, PathFigures], door: str) -> dict[str, Any]:
    """One HTTP door's figures against its anchors, all measured in this run.

    ``p99_added_ms``: the router's door (client -> HTTP -> router -> echo workers) minus the
    direct gRPC call of the echo engine, the anchor of ``p99_added_ms``: everything the HTTP
    route adds, the protocol's own cost (and its client's) included. It splits into
    ``door_p99_added_ms`` (the same door over the direct ``EchoOrchestrator``, minus direct gRPC:
    the HTTP stack and client) and ``router_p99_added_ms`` (the router's door minus that door
    over the direct echo: the router behind HTTP). ``rps_ratio_to_grpc``: the router's HTTP
    door's closed-loop rate over its gRPC door's, same client concurrency; on a loaded machine
    trust ``cpu_bound_rps_ratio_to_grpc`` (CPU per request, all processes) more."""
    direct, routed = figures["direct"], figures["routed"]
    via_direct, via_router = figures[f"{door}_direct"], figures[door]
    cpu_grpc = sum(routed.cpu_ms_per_request.values())
    cpu_http = sum(via_router.cpu_ms_per_request.values())
    return {
        "p50_added_ms": round(via_router.p50_ms - direct.p50_ms, 4),
        "p99_added_ms": round(via_router.p99_ms - direct.p99_ms, 4),
        "door_p99_added_ms": round(via_direct.p99_ms - direct.p99_ms, 4),
        "router_p99_added_ms": round(via_router.p99_ms - via_direct.p99_ms, 4),
        "max_rps": via_router.max_rps,
        "direct_max_rps": via_direct.max_rps,
        "rps_ratio_to_grpc": round(via_router.max_rps / routed.max_rps, 3) if routed.max_rps else 0,
        # load-robust: CPU (all processes) per request beyond the router's gRPC door, and the
        # ratio of the rates the cores would sustain at each door's CPU per request
        "added_cpu_ms_per_request": round(cpu_http - cpu_grpc, 4),
        "cpu_bound_rps_ratio_to_grpc": round(cpu_grpc / cpu_http, 3) if cpu_http else 0,
        "direct": asdict(via_direct),
        "routed": asdict(via_router),
    }


def report(figures: dict[str, PathFigures], s: Settings) -> dict[str, Any]:
    direct, routed = figures["direct"], figures["routed"]
    p50_added = round(routed.p50_ms - direct.p50_ms, 4)
    p99_added = round(routed.p99_ms - direct.p99_ms, 4)
    cpu_direct = sum(direct.cpu_ms_per_request.values())
    cpu_routed = sum(routed.cpu_ms_per_request.values())
    http = {door: http_figures(figures, door) for door in HTTP_DOORS}
    http_meets = all(
        f["p99_added_ms"] <= TARGET_HTTP_P99_ADDED_MS
        and f["rps_ratio_to_grpc"] >= TARGET_HTTP_RPS_RATIO
        for f in http.values()
    )
    return {
        "p50_added_ms": p50_added,
        "p99_added_ms": p99_added,
        "max_rps": routed.max_rps,
        "direct_max_rps": direct.max_rps,
        "meets_targets": p99_added <= TARGET_P99_ADDED_MS and routed.max_rps >= TARGET_MAX_RPS,
        "targets": {"p99_added_ms": TARGET_P99_ADDED_MS, "max_rps": TARGET_MAX_RPS},
        # the HTTP doors (KServe v2 REST, OpenAI) of the same router, per door
        "http_p99_added_ms": {door: f["p99_added_ms"] for door, f in http.items()},
        "http_max_rps": {door: f["max_rps"] for door, f in http.items()},
        "http_rps_ratio_to_grpc": {door: f["rps_ratio_to_grpc"] for door, f in http.items()},
        "http_meets_targets": http_meets,
        "http_targets": {
            "p99_added_ms": TARGET_HTTP_P99_ADDED_MS,
            "rps_ratio_to_grpc": TARGET_HTTP_RPS_RATIO,
        },
        # CPU the routed path spends per request beyond the direct one (all processes), and
        # the rate the machine's cores would sustain at the routed path's CPU per request
        "added_cpu_ms_per_request": round(cpu_routed - cpu_direct, 4),
        "cpu_bound_rps": round((os.cpu_count() or 1) * 1e3 / cpu_routed, 1) if cpu_routed else 0,
        "direct": asdict(direct),
        "routed": asdict(routed),
        "http": http,
        "settings": asdict(s),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work on the machine, if any
    }


def run(settings: Settings) -> dict[str, Any]:
    """Start every server, measure, stop every server; the report with its wall time."""
    start = time.perf_counter()
    with servers() as stack:
        started = time.perf_counter()
        result = asyncio.run(measure(stack, settings))
        measured = time.perf_counter()
    result["startup_s"] = round(started - start, 2)
    result["measure_s"] = round(measured - started, 2)
    result["wall_s"] = round(time.perf_counter() - start, 2)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--rate", type=float, default=defaults.rate_rps, help="requests/s")
    parser.add_argument("--num-requests", type=int, default=defaults.num_requests)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--warmup-requests", type=int, default=defaults.warmup_requests)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--arrivals", choices=["paced", "poisson"], default="paced")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--rps-seconds", type=float, default=defaults.rps_seconds)
    args = parser.parse_args(argv)
    settings = Settings(
        rate_rps=args.rate,
        num_requests=args.num_requests,
        rounds=max(1, min(args.rounds, args.num_requests)),
        warmup_requests=args.warmup_requests,
        max_tokens=args.max_tokens,
        poisson=args.arrivals == "poisson",
        concurrency=args.concurrency,
        rps_seconds=args.rps_seconds,
    )
    result = run(settings)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
