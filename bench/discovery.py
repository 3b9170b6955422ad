"""Membership, failover and lost-worker times, and what discovery + Curve add to a routed request.

    python bench/discovery.py --json          # about 2 minutes
    python bench/discovery.py --quick --json  # one sample of each, fewer requests (a test)

Prints one JSON line. Real processes on loopback: one etcd (Debian's ``etcd-server``),
``prfaas worker`` processes (tiny model preset) and ``prfaas router`` processes, each stopped by
PID when the run ends or fails (``bench/_discovery_procs.py``). Two stacks serve side by side:

- **static**: a router with a static ``--worker`` list and a ``--plaintext`` control plane, in
  front of a decode and a prefill worker (``dc-local``, plaintext);
- **discovered**: two router replicas on etcd (``--discovery``, Curve keys from
  ``config.write_testbed_keyset``) in front of a decode and a prefill worker that register under
  a lease of ``--lease-ttl-s`` and serve a Curve control plane (and relay).

Figures (each measured several times; the top-level figure is the worst sample, the median and
every sample are under ``samples``):

- ``join_to_routable_s``: a worker's registration (its put, as the bench's own etcd watch sees
  it) to ``prfaas_worker_up{worker} == 1`` on *every* replica (the router connected, pinged it and
  routes to it). Target <= 1 s.
- ``death_to_unroutable_s``: SIGKILL of the decode worker to its gauge leaving 1 on every
  replica (lost when its connection closes: the kernel closes a killed process's sockets, the
  router sees it at once; or gone with its lease, whichever first).
  Target <= lease TTL + 1 s. ``death_to_deregistered_s``: to the gauge gone (the lease expired
  and every replica dropped the worker from its membership); same target.
- ``worker_lost_to_client_error_s``: the same SIGKILL, the decode worker streaming a request
  (first token received) through a replica, to the client's error (UNAVAILABLE). Target <=
  ``--worker-lost-s`` + 1 s.
- ``frozen_to_client_error_s``, ``frozen_to_unroutable_s``, ``frozen_to_deregistered_s``: the
  same with SIGSTOP instead (``--freezes``): a frozen host, whose connections stay open and
  silent, found by the routers' ZMTP heartbeats within ``worker_lost_s`` or by its lease
  running out, whichever first; then it is SIGKILLed and restarted. Targets <= ``worker_lost_s``
  + 1, min(lease TTL, ``worker_lost_s``) + 1 and lease TTL + 1 s.
- ``leader_failover_s``: SIGKILL of the leading replica to ``prfaas_router_is_leader == 1`` on
  the follower (then a fresh replica joins as follower for the next sample). Target <= the
  leader lease TTL (``discovery.leader.DEFAULT_TTL_S``) + 1 s.
- ``p99_ratio``: routed p99 latency (client to response, stock ``tritonclient`` unary
  ``ModelInfer``, a short prompt on the local route, one request at a time) through a
  discovered replica with a Curve control plane over the same through the static, plaintext
  router; ``p99_added_ms`` is the difference. ``--num-requests`` per stack, alternating request
  by request (who goes first swapped each pair), so the shared machine's drifts hit both. The
  two stacks run the same engines (same preset, seed and flags, one torch thread each), so what
  differs is membership and Curve. Target ratio <= 1.1. Scraping is paused meanwhile. Compare
  ``load_average_1m`` with ``cpu_count`` before trusting any timing.

Gauges are scraped every ``--poll-ms`` (each figure carries up to that much, plus a scrape).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from _discovery_procs import Router, Scraper, Testbed
from _discovery_stacks import (
    DECODE_ID,
    MODEL,
    NAMESPACE,
    PREFILL_ID,
    QUICK,
    Settings,
    Stacks,
    is_up,
    leads,
    llm_inputs,
    prompt,
)
from tritonclient.utils import InferenceServerException

from trtllm_prfaas.config import write_testbed_keyset
from trtllm_prfaas.discovery import open_membership, parse_discovery, worker_prefix
from trtllm_prfaas.discovery.leader import DEFAULT_TTL_S as LEADER_TTL_S
from trtllm_prfaas.telemetry.logging import configure_logging

STREAM_PROMPT_TOKENS, STREAM_MAX_TOKENS = 40, 400  # long enough to be mid-stream at the kill
TARGET_JOIN_S = 1.0
# What stop_decode_mid_stream measures, named by the signal that stopped the worker.
SIGNAL_FIGURES = {
    signal.SIGKILL: {"to_client_error_s": "worker_lost_to_client_error_s",
                     "to_unroutable_s": "death_to_unroutable_s",
                     "to_deregistered_s": "death_to_deregistered_s"},
    signal.SIGSTOP: {"to_client_error_s": "frozen_to_client_error_s",
                     "to_unroutable_s": "frozen_to_unroutable_s",
                     "to_deregistered_s": "frozen_to_deregistered_s"},
}  # fmt: skip
TARGET_P99_RATIO = 1.1


# ---- figures ----------------------------------------------------------------------------------


def stop_decode_mid_stream(st: Stacks, signum: int) -> dict[str, float]:
    """Signal the discovered decode worker while it streams a request through a replica:
    SIGKILL (the kernel closes its connections: the router sees them close) or SIGSTOP (a frozen
    host: its sockets stay open and silent, its lease is no longer renewed; it is SIGKILLed once
    measured). Seconds from the signal to the client's error, to unroutable and to deregistered
    on every replica."""
    assert st.decode is not None
    router, _ = st.live_replicas()[0]
    client = grpcclient.InferenceServerClient(router.address)
    received: queue.Queue[tuple[float, Any]] = queue.Queue()
    client.start_stream(lambda result, error: received.put((time.monotonic(), error or result)))
    try:
        inputs = llm_inputs(prompt(STREAM_PROMPT_TOKENS), STREAM_MAX_TOKENS, True)
        client.async_stream_infer(MODEL, inputs, request_id="mid-stream")
        first = received.get(timeout=60.0)[1]
        if isinstance(first, InferenceServerException):
            raise RuntimeError(f"the stream failed before the signal: {first}")
        st.decode.process.send_signal(signum)
        signalled_at = time.monotonic()
        while True:
            at, item = received.get(timeout=st.s.worker_lost_s + 30.0)
            if isinstance(item, InferenceServerException):
                break
            if item.get_response().parameters["triton_final_response"].bool_param:
                raise RuntimeError("the stream finished before the signal: raise its max_tokens")
    finally:
        client.stop_stream()
        client.close()
    # A stream's error carries the router's message, not its gRPC status: it names the worker.
    if f"worker {DECODE_ID} lost" not in str(item):
        raise RuntimeError(f"expected the decode worker lost, got {item}")
    limit_s = st.s.lease_ttl_s + 10.0
    scrapers = [sc for _, sc in st.live_replicas()]
    unroutable = [sc.first(lambda s: not is_up(s, DECODE_ID), signalled_at, limit_s)
                  for sc in scrapers]  # fmt: skip
    gone = [sc.first(lambda s: ("prfaas_worker_up", DECODE_ID) not in s, signalled_at, limit_s)
            for sc in scrapers]  # fmt: skip
    st.decode.process.kill()  # SIGSTOP: end the frozen process now that it is measured
    st.decode.process.wait(10.0)
    return {
        "to_client_error_s": at - signalled_at,
        "to_unroutable_s": max(unroutable) - signalled_at,
        "to_deregistered_s": max(gone) - signalled_at,
    }


def fail_over(st: Stacks) -> float:
    """SIGKILL the leading replica; seconds until another leads. A fresh replica then joins."""
    replicas = st.live_replicas()
    now = time.monotonic()
    for _, scraper in replicas:  # every replica has both workers before the kill
        for worker in (DECODE_ID, PREFILL_ID):
            scraper.first(lambda s, w=worker: is_up(s, w), now, 30.0)  # type: ignore[misc]
    leader = _one_leader(replicas)
    leader[0].process.kill()
    killed_at = time.monotonic()
    leader[0].process.wait(10.0)
    followers = [pair for pair in replicas if pair is not leader]
    led = [sc.first(leads, killed_at, LEADER_TTL_S + 10.0) for _, sc in followers]
    failover_s = min(led) - killed_at
    survivor = followers[led.index(min(led))][0]
    _timed_once(survivor.address, st.s)  # the new leader serves (it never stopped to)
    assert st.replicas is not None
    st.replicas.remove(leader)
    leader[1].pause()
    st.replicas.append(st.start_replica())
    return failover_s


def _one_leader(replicas: list[tuple[Router, Scraper]]) -> tuple[Router, Scraper]:
    deadline = time.monotonic() + LEADER_TTL_S + 10.0
    while time.monotonic() < deadline:
        leaders = [pair for pair in replicas if leads(pair[1].latest() or {})]
        if len(leaders) == 1:
            return leaders[0]
        time.sleep(0.05)
    raise RuntimeError("no single leader among the replicas")


def alternating_latencies(
    static: Router, discovered: Router, s: Settings
) -> dict[str, list[float]]:
    """Sequential unary requests, alternating between the stacks request by request (who goes
    first swapped each pair), so both see the same machine; latencies in seconds."""
    paths = {"static": static.address, "discovered": discovered.address}
    clients = {name: grpcclient.InferenceServerClient(address) for name, address in paths.items()}
    inputs = llm_inputs(prompt(s.prompt_tokens), s.max_tokens, False)
    latencies: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for name in paths:
            for _ in range(s.warmup_requests):
                _timed(clients[name], inputs)
        for i in range(s.num_requests):
            for name in list(paths) if i % 2 == 0 else list(reversed(paths)):
                latencies[name].append(_timed(clients[name], inputs))
    finally:
        for client in clients.values():
            client.close()
    return latencies


def _timed_once(address: str, s: Settings) -> float:
    client = grpcclient.InferenceServerClient(address)
    try:
        return _timed(client, llm_inputs(prompt(s.prompt_tokens), s.max_tokens, False))
    finally:
        client.close()


def _timed(client: Any, inputs: list[grpcclient.InferInput]) -> float:
    started = time.perf_counter()
    result = client.infer(MODEL, inputs, client_timeout=30.0)
    latency_s = time.perf_counter() - started
    if len(result.as_numpy("output_ids")) == 0:
        raise RuntimeError("a routed request answered no tokens")
    return latency_s


# ---- the run ----------------------------------------------------------------------------------


def measure(bed: Testbed, s: Settings) -> dict[str, Any]:
    st = Stacks(bed, write_testbed_keyset(bed.directory / "keys"), s, puts=queue.Queue())
    bed.start_etcd()
    store = open_membership(parse_discovery(bed.etcd_url))
    puts = st.puts
    assert puts is not None
    watch = store.watch_prefix(worker_prefix(NAMESPACE), lambda e: puts.put((time.monotonic(), e)))
    samples: dict[str, list[float]] = {"join_to_routable_s": [], "leader_failover_s": []}
    samples |= {name: [] for figures in SIGNAL_FIGURES.values() for name in figures.values()}
    phases: dict[str, float] = {}
    try:
        mark = time.monotonic()
        st.start_stacks()
        samples["join_to_routable_s"].append(st.start_decode())
        phases["start"], mark = time.monotonic() - mark, time.monotonic()
        assert st.static is not None and st.replicas is not None
        for _, scraper in st.replicas:
            scraper.pause()
        latencies = alternating_latencies(st.static, st.replicas[0][0], s)
        for _, scraper in st.replicas:
            scraper.resume()
        phases["latency"], mark = time.monotonic() - mark, time.monotonic()
        for signum in [signal.SIGKILL] * s.num_worker_kills + [signal.SIGSTOP] * s.num_freezes:
            for name, value in stop_decode_mid_stream(st, signum).items():
                samples[SIGNAL_FIGURES[signum][name]].append(value)
            samples["join_to_routable_s"].append(st.start_decode())
        phases["worker_kills"], mark = time.monotonic() - mark, time.monotonic()
        for _ in range(s.num_failovers):
            samples["leader_failover_s"].append(fail_over(st))
        phases["failovers"] = time.monotonic() - mark
    finally:
        watch.close()
        store.close()
    result = report(samples, latencies, s)
    result["phase_s"] = {name: round(value, 2) for name, value in phases.items()}
    return result


def _summary(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 4), "max": round(max(values), 4),
            "samples": [round(v, 4) for v in values]}  # fmt: skip


def _quantile_ms(values: list[float], q: float) -> float:
    return round(float(np.quantile(np.asarray(values), q)) * 1e3, 3)


def report(samples: dict[str, list[float]], latencies: dict[str, list[float]],
           s: Settings) -> dict[str, Any]:  # fmt: skip
    worst = {name: round(max(values), 4) for name, values in samples.items()}
    p99 = {name: _quantile_ms(v, 0.99) for name, v in latencies.items()}
    p50 = {name: _quantile_ms(v, 0.5) for name, v in latencies.items()}
    ratio = round(p99["discovered"] / p99["static"], 3)
    targets = {
        "join_to_routable_s": TARGET_JOIN_S,
        "death_to_unroutable_s": s.lease_ttl_s + 1.0,
        "death_to_deregistered_s": s.lease_ttl_s + 1.0,
        "leader_failover_s": LEADER_TTL_S + 1.0,
        "worker_lost_to_client_error_s": s.worker_lost_s + 1.0,
        "frozen_to_client_error_s": s.worker_lost_s + 1.0,
        "frozen_to_unroutable_s": min(s.lease_ttl_s, s.worker_lost_s) + 1.0,
        "frozen_to_deregistered_s": s.lease_ttl_s + 1.0,
        "p99_ratio": TARGET_P99_RATIO,
    }
    figures = {**worst, "p99_ratio": ratio}
    return {
        **worst,
        "p99_ratio": ratio,
        "p99_added_ms": round(p99["discovered"] - p99["static"], 3),
        "static_p99_ms": p99["static"],
        "discovered_p99_ms": p99["discovered"],
        "static_p50_ms": p50["static"],
        "discovered_p50_ms": p50["discovered"],
        "num_requests": {name: len(v) for name, v in latencies.items()},
        "meets_targets": {name: figures[name] <= limit for name, limit in targets.items()},
        "targets": targets,
        "samples": {name: _summary(values) for name, values in samples.items()},
        "lease_ttl_s": s.lease_ttl_s,
        "leader_ttl_s": LEADER_TTL_S,
        "worker_lost_s": s.worker_lost_s,
        "settings": asdict(s),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def run(s: Settings) -> dict[str, Any]:
    configure_logging("WARNING")  # the bench's own etcd watch logs at INFO otherwise
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="bench-discovery-") as directory,
        Testbed(Path(directory), s.poll_ms / 1e3) as bed,
    ):
        result = measure(bed, s)
    result["wall_s"] = round(time.perf_counter() - started, 2)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    d = Settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--quick", action="store_true", help="one sample of each, few requests")
    parser.add_argument("--lease-ttl-s", type=int, default=d.lease_ttl_s)
    parser.add_argument("--worker-lost-s", type=float, default=d.worker_lost_s)
    parser.add_argument("--worker-kills", type=int, default=None, help=f"({d.num_worker_kills})")
    parser.add_argument("--freezes", type=int, default=None, help=f"({d.num_freezes})")
    parser.add_argument("--failovers", type=int, default=None, help=f"({d.num_failovers})")
    parser.add_argument("--num-requests", type=int, default=None, help=f"({d.num_requests})")
    parser.add_argument("--poll-ms", type=float, default=d.poll_ms)
    args = parser.parse_args(argv)
    base = QUICK if args.quick else d
    overrides = {"num_worker_kills": args.worker_kills, "num_freezes": args.freezes,
                 "num_failovers": args.failovers,
                 "num_requests": args.num_requests}  # fmt: skip
    s = Settings(**{**asdict(base), "lease_ttl_s": args.lease_ttl_s,
                    "worker_lost_s": args.worker_lost_s, "poll_ms": args.poll_ms,
                    **{k: v for k, v in overrides.items() if v is not None}})  # fmt: skip
    if s.lease_ttl_s < 2 or s.worker_lost_s <= 0 or s.poll_ms <= 0:
        parser.error("need --lease-ttl-s >= 2, --worker-lost-s > 0 and --poll-ms > 0")
    if min(s.num_worker_kills, s.num_freezes, s.num_failovers, s.num_requests) < 1:
        parser.error("--worker-kills, --freezes, --failovers and --num-requests must be >= 1")
    # SIGTERM ends the run as an error would: every process started is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = run(s)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
