"""``prfaas netns``: the two datacenters as network namespaces on this machine (needs root).

    prfaas netns up [--config testbed.yaml] [--wan-rate 1gbit] [--wan-burst 128kb]
                    [--routers 1] [--membership static|etcd] [--demo]
    prfaas netns wan RUN --rate 100mbit [--burst 64kb]   # change the WAN live
    prfaas netns status                                  # runs, WAN shape and counters
    prfaas netns down RUN                                # clean up a run whose owner died

``up`` creates the namespaces and the shaped WAN (``testbed/netns.py``), starts etcd, the workers
and the router replicas as processes in them (``testbed/hosts.py``), prints where each listens
and serves until Ctrl-C / SIGTERM (or, with ``--demo``, sends the ``prfaas up --demo`` workload
from the root namespace, checks it against a single engine, reports the WAN's byte counter next
to the relayed KV bytes, and stops). Whatever happens, every process is stopped by PID and the
namespaces are deleted on the way out. The testbed YAML file is ``prfaas up``'s.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from pathlib import Path

from trtllm_prfaas.config import MODEL_PRESETS
from trtllm_prfaas.errors import ConfigError, PrfaasError
from trtllm_prfaas.testbed import demo
from trtllm_prfaas.testbed.hosts import MEMBERSHIPS, HostsConfig, NetnsTestbed
from trtllm_prfaas.testbed.netns import (
    DATACENTERS,
    Network,
    WanShape,
    delete_run,
    list_runs,
    missing_requirements,
    wan_stats,
)
from trtllm_prfaas.testbed.spec import load_testbed_config

__all__ = ["add_arguments", "run"]


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="create the namespaces, start everything, serve")
    up.add_argument("--config", type=Path, default=None, help="testbed YAML (prfaas up's)")
    up.add_argument("--run-id", default="", help="namespace suffix (default: random)")
    up.add_argument("--wan-rate", default=WanShape.rate, help="tc tbf rate, e.g. 100mbit, 1gbit")
    up.add_argument("--wan-burst", default=WanShape.burst, help="tc tbf burst, e.g. 128kb")
    up.add_argument("--wan-latency", default=WanShape.latency, help="tc tbf latency, e.g. 50ms")
    up.add_argument("--routers", type=int, default=1, help="router replicas (processes)")
    up.add_argument(
        "--membership",
        choices=MEMBERSHIPS,
        default="etcd",
        help="etcd (default): workers register in etcd in dc-local, routers watch it; "
        "static: routers get a --worker list",
    )
    up.add_argument("--threshold-tokens", type=int, default=None)
    up.add_argument("--model-preset", choices=sorted(MODEL_PRESETS), default=None)
    up.add_argument("--grpc-port", type=int, default=None, help="router 0's (default 8001)")
    up.add_argument("--metrics-port", type=int, default=None, help="router 0's (default 8002)")
    up.add_argument("--fixed-threshold", action="store_true", help="no control loop")
    up.add_argument("--demo", action="store_true", help="send a demo workload, report, stop")
    wan = sub.add_parser("wan", help="change a run's WAN rate live (tc qdisc change)")
    wan.add_argument("run_id", metavar="RUN")
    wan.add_argument("--rate", required=True, help="e.g. 100mbit")
    wan.add_argument("--burst", default=WanShape.burst)
    wan.add_argument("--latency", default=WanShape.latency)
    sub.add_parser("status", help="list runs with their WAN shape and counters")
    down = sub.add_parser("down", help="stop a run's processes by PID, delete its namespaces")
    down.add_argument("run_id", metavar="RUN")


def run(command: str, args: argparse.Namespace) -> int:
    why = missing_requirements()
    if why:
        raise PrfaasError(f"the namespace testbed {why}")
    action = {"up": _up, "wan": _wan, "status": _status, "down": _down}[args.action]
    return action(args)


def _up(args: argparse.Namespace) -> int:
    testbed = load_testbed_config(
        args.config,
        threshold_tokens=args.threshold_tokens,
        model_preset=args.model_preset,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
    )
    config = HostsConfig(
        testbed=testbed,
        wan=WanShape(rate=args.wan_rate, burst=args.wan_burst, latency=args.wan_latency),
        num_routers=args.routers,
        membership=args.membership,
        fixed_threshold=args.fixed_threshold,
        run_id=args.run_id,
    )
    print("starting the namespace testbed ...", flush=True)
    # SIGTERM while starting unwinds like Ctrl-C, so start() still undoes what it did.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    hosts = NetnsTestbed(config, log_level="ERROR")
    try:
        hosts.start()
    except KeyboardInterrupt:
        print("interrupted while starting: every process stopped, namespaces deleted", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        print(hosts.describe(), flush=True)
        if args.demo:
            return _demo(hosts)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print("serving; Ctrl-C stops every process and deletes the namespaces", flush=True)
        stop.wait()
    finally:
        hosts.close()
    print("namespace testbed stopped", flush=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _demo(hosts: NetnsTestbed) -> int:
    """The ``prfaas up --demo`` workload from the root namespace through router 0."""
    router = hosts.routers[0]
    before = hosts.wan_stats("dc-remote").num_bytes
    results = demo.demo_prompts(hosts.config.testbed.threshold_tokens)
    demo.run_demo(router.address, results)
    want = demo.reference_tokens(hosts.config.testbed, results)
    num_same = sum(r.token_ids == w and not r.error for r, w in zip(results, want, strict=True))
    wan_bytes = hosts.wan_stats("dc-remote").num_bytes - before
    relayed = _remote_relay_bytes(hosts)
    print(f"identical to a single-engine run: {num_same}/{len(results)}")
    print(
        f"KV relayed from dc-remote: {relayed:.0f} bytes; WAN dc-remote egress: {wan_bytes} bytes"
    )
    codes = hosts.close()
    print(f"processes stopped: {codes}")
    ok = num_same == len(results) and wan_bytes >= relayed and all(c == 0 for c in codes.values())
    print("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _remote_relay_bytes(hosts: NetnsTestbed, settle_s: float = 5.0) -> float:
    """``prfaas_relay_bytes_total`` summed over the PrfaaS cluster's links (router 0), once it
    stops moving: workers report it every 0.1 s, so it lags the last token a little."""
    url = hosts.routers[0].metrics_url
    if url is None:
        return 0.0
    prefix = f'prfaas_relay_bytes_total|link="{hosts.config.testbed.prfaas_cluster}-'

    def total() -> float:
        return sum(v for k, v in demo.scrape(url).items() if k.startswith(prefix))

    last, deadline = total(), time.monotonic() + settle_s
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = total()
        if now == last:
            break
        last = now
    return last


def _wan(args: argparse.Namespace) -> int:
    shape = WanShape(rate=args.rate, burst=args.burst, latency=args.latency)
    namespaces = list_runs().get(args.run_id)
    if not namespaces:
        raise ConfigError(f"no namespace testbed run {args.run_id!r} (see prfaas netns status)")
    network = Network(shape, args.run_id)
    network.set_wan_rate(shape.rate, shape.burst)  # the run's namespaces, by name
    print(f"run {args.run_id}: WAN now tbf rate {shape.rate} burst {shape.burst}")
    return 0


def _status(args: argparse.Namespace) -> int:
    runs = list_runs()
    if not runs:
        print("no namespace testbed runs")
    for run_id, namespaces in sorted(runs.items()):
        print(f"run {run_id}: {' '.join(sorted(namespaces))}")
        for datacenter in DATACENTERS:
            namespace = f"prfaas-{run_id}-{datacenter}"
            if namespace in namespaces:
                s = wan_stats(namespace)
                print(f"  {datacenter} WAN egress: tbf {s.rate_bytes_per_s * 8 / 1e6:.0f} Mbit/s "
                      f"burst {s.burst_bytes} B; sent {s.num_bytes} B, {s.num_packets} packets, "
                      f"{s.num_drops} dropped")  # fmt: skip
    return 0


def _down(args: argparse.Namespace) -> int:
    deleted = delete_run(args.run_id)
    if not deleted:
        raise ConfigError(f"no namespace testbed run {args.run_id!r} (see prfaas netns status)")
    print(f"deleted {' '.join(deleted)}")
    return 0
