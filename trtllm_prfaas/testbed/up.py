"""``prfaas up``: the embedded two-datacenter testbed on loopback, from one YAML file.

Starts the workers (separate processes), the router (KServe gRPC, KServe v2 REST on
``--http-port`` (default 8000), the OpenAI-compatible API on ``--openai-port`` (default 9000)
+ /metrics) in this process,
prints where everything listens, and either serves until Ctrl-C / SIGTERM or, with ``--demo``,
sends a workload through tritonclient, prints a report and stops. Every child is stopped by PID
on the way out, whatever happened.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import tempfile
import threading
from pathlib import Path

from trtllm_prfaas.config import (
    MODEL_PRESETS,
    TestbedKeys,
    load_control_security,
    write_testbed_keyset,
)
from trtllm_prfaas.router.control import ControlConfig
from trtllm_prfaas.router.orchestrator import RouterConfig, WorkerSpec
from trtllm_prfaas.router.service import RouterService
from trtllm_prfaas.router.servicer import FrontDoorConfig
from trtllm_prfaas.testbed import demo
from trtllm_prfaas.testbed.processes import WorkerProcess, start_workers
from trtllm_prfaas.testbed.spec import TestbedConfig, load_testbed_config
from trtllm_prfaas.transport import RelaySecurity

__all__ = ["UP_HTTP_PORT", "UP_OPENAI_PORT", "Testbed", "add_arguments", "run"]

UP_HTTP_PORT = 8000  # Triton's HTTP port: prfaas up serves KServe v2 REST there by default
UP_OPENAI_PORT = 9000  # Triton's OpenAI frontend port: prfaas up serves the OpenAI API there


class Testbed:
    """Workers + router for one ``TestbedConfig``; a context manager.

    With ``config.curve`` (the default) fresh keys are written to a private temporary directory
    (``config.write_testbed_keyset``): the relay and the control plane are CurveZMQ; the local PD
    workers, whose role the router may convert, get the key file with both relay roles' keys,
    the PrfaaS prefill workers the sender's; every worker's control socket admits only the
    router's key (``control_security``). Without it, both planes run ``--plaintext``."""

    __test__ = False

    def __init__(self, config: TestbedConfig, log_level: str = "ERROR") -> None:
        self.config = config
        self.log_level = log_level
        self.workers: dict[str, WorkerProcess] = {}
        self.router: RouterService | None = None
        self._keys = tempfile.TemporaryDirectory(prefix="prfaas-keys-")
        self._keyset: TestbedKeys | None = None
        if config.curve:
            self._keyset = write_testbed_keyset(Path(self._keys.name))

    @property
    def control_security(self) -> RelaySecurity:
        """How a router (or a test's ``WorkerClient``) reaches these workers' control sockets."""
        if self._keyset is None:
            return RelaySecurity.insecure_plaintext()
        return load_control_security(self._keyset.router, False, "router")

    def start(self) -> None:
        try:
            self.workers = start_workers(
                self._worker_specs(),
                log_level=self.log_level,
                control_security=self.control_security,
            )
            self.router = RouterService(
                self._router_config(),
                FrontDoorConfig(host=self.config.host, port=self.config.grpc_port),
                self.config.metrics_port,
                http_port=self.config.http_port,
                openai_port=self.config.openai_port,
            )
            self.router.start()
        except BaseException:
            self.close()
            raise

    def _worker_specs(self) -> dict[str, list[str]]:
        specs = self.config.worker_args()
        keys = self._keyset
        if keys is None:
            return {name: [*args, "--plaintext"] for name, args in specs.items()}
        prfaas = f"{self.config.prfaas_cluster}-"
        return {
            name: [
                *args,
                "--curve-keys",
                str(keys.sender if name.startswith(prfaas) else keys.both),
            ]
            for name, args in specs.items()
        }

    def _router_config(self) -> RouterConfig:
        specs = tuple(
            WorkerSpec(name, proc.control, name.startswith(self.config.prfaas_cluster))
            for name, proc in self.workers.items()
        )
        # The emulated link's rate is known: the control loop measures utilisation against it
        # rather than against measured relay goodput (which reads low when prefill is slow).
        control = ControlConfig(link_gbps=self.config.link_gbps)
        return RouterConfig(
            specs,
            threshold_tokens=self.config.threshold_tokens,
            control=control,
            tokenizer_dir=self.config.tokenizer_dir,
            control_security=self.control_security,
            prefix_routing=self.config.prefix_routing,
        )

    def describe(self) -> str:
        assert self.router is not None
        lines = [f"router (KServe v2 gRPC): {self.router.address}   model: tensorrt_llm"]
        if self.router.http_url is not None:
            lines.append(f"KServe v2 REST (+ generate extension): {self.router.http_url}")
        if self.router.openai_url is not None:
            lines.append(f"OpenAI-compatible API: {self.router.openai_url}/v1")
        if self.router.metrics_server is not None:
            lines.append(f"metrics: {self.router.metrics_server.url}")
        for name, proc in self.workers.items():
            relay = f"  relay {proc.relay}" if proc.relay else ""
            lines.append(
                f"worker {name:24} pid {proc.process.pid:<7} control {proc.control}{relay}"
            )
        link = f"{self.config.link_gbps} Gbps (paced)" if self.config.link_gbps else "unpaced"
        lines.append(
            f"threshold t = {self.config.threshold_tokens} tokens; "
            f"{self.config.prfaas_cluster} -> {self.config.local_cluster} link: {link}; "
            f"relay and control {'Curve-encrypted' if self.config.curve else 'PLAINTEXT'}"
        )
        return "\n".join(lines)

    def close(self) -> dict[str, int]:
        """Stop the router, then every worker by PID; returns their exit codes."""
        if self.router is not None:
            self.router.close()
            self.router = None
        codes = {name: proc.stop() for name, proc in self.workers.items()}
        self.workers = {}
        self._keys.cleanup()
        return codes

    def __enter__(self) -> Testbed:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="testbed YAML file")
    parser.add_argument("--demo", action="store_true", help="send a demo workload, report, stop")
    parser.add_argument("--link-gbps", type=float, default=None, help="emulated inter-DC link")
    parser.add_argument("--grpc-port", type=int, default=None)
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help=f"KServe v2 REST port (default {UP_HTTP_PORT}; 0: a free port)",
    )
    parser.add_argument(
        "--openai-port",
        type=int,
        default=None,
        help=f"OpenAI-compatible API port (default {UP_OPENAI_PORT}; 0: a free port)",
    )
    parser.add_argument("--model-preset", choices=sorted(MODEL_PRESETS), default=None)
    parser.add_argument("--threshold-tokens", type=int, default=None)
    parser.add_argument(
        "--enable-block-reuse",
        action="store_const",
        const=True,
        default=None,
        help="workers keep prefix caches and publish KV cache events (cache-aware routing)",
    )
    parser.add_argument(
        "--prefix-routing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the router routes by the prefixes workers hold (default); --no-prefix-routing: "
        "cache-blind",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="a Hugging Face model directory (tokenizer.json): the router tokenizes with it and "
        "the reference model takes its vocabulary; default: the reference byte tokenizer",
    )


def run(command: str, args: argparse.Namespace) -> int:
    config = load_testbed_config(
        args.config,
        link_gbps=args.link_gbps,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        http_port=args.http_port,
        openai_port=args.openai_port,
        model_preset=args.model_preset,
        threshold_tokens=args.threshold_tokens,
        enable_block_reuse=args.enable_block_reuse,
        prefix_routing=args.prefix_routing,
        tokenizer_dir=str(args.tokenizer) if args.tokenizer is not None else None,
    )
    if config.http_port is None:
        config = dataclasses.replace(config, http_port=UP_HTTP_PORT)
    if config.openai_port is None:
        config = dataclasses.replace(config, openai_port=UP_OPENAI_PORT)
    print(
        f"starting testbed: {config.num_prfaas_prefill} PrfaaS prefill, "
        f"{config.num_pd_prefill} PD-P, {config.num_pd_decode} PD-D workers ...",
        flush=True,
    )
    with Testbed(config) as testbed:
        print(testbed.describe(), flush=True)
        if args.demo:
            return _demo(testbed)
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print("serving; Ctrl-C stops every process", flush=True)
        stop.wait()
    print("testbed stopped", flush=True)
    return 0


def _demo(testbed: Testbed) -> int:
    assert testbed.router is not None
    results = demo.demo_prompts(
        testbed.config.threshold_tokens, testbed.router.orchestrator.tokenizer
    )
    print(f"demo: {len(results)} concurrent streaming requests through tritonclient ...")
    demo.run_demo(testbed.router.address, results)
    want = demo.reference_tokens(testbed.config, results)
    metrics_url = testbed.router.metrics_server.url if testbed.router.metrics_server else None
    figures = demo.scrape(metrics_url) if metrics_url else {}
    # The front door names requests itself; demo prompts have distinct lengths, so match on that.
    decisions = {d.incremental_tokens: d for d in testbed.router.orchestrator.decisions}
    encode = testbed.router.orchestrator.encode
    print(f"{'request':10} {'prompt':>7} {'route':>7} {'TTFT s':>7} {'tokens':>6}  identical")
    ok = True
    for result, expected in zip(results, want, strict=True):
        num_prompt_tokens = len(encode(result.prompt))
        decision = decisions.get(num_prompt_tokens)
        route = "remote" if decision and decision.is_remote else "local"
        same = not result.error and result.token_ids == expected
        ok = ok and same
        ttft = f"{result.ttft_s:.3f}" if result.ttft_s is not None else "-"
        print(
            f"{result.name:10} {num_prompt_tokens:>7} {route:>7} {ttft:>7} "
            f"{len(result.token_ids):>6}  {same}{'  ' + result.error if result.error else ''}"
        )
    relayed = figures.get("prfaas_relay_bytes_total", 0.0)
    remote = sum(1 for d in decisions.values() if d.is_remote)
    num_same = sum(r.token_ids == w for r, w in zip(results, want, strict=True))
    recomputed = testbed.router.orchestrator.counters["relay_recomputed"]
    print(
        f"routed remote: {remote}/{len(results)}; KV relayed: {relayed / 2**20:.2f} MiB; "
        f"decoded from the relayed KV: {remote - recomputed}/{remote}; "
        f"identical to a single-engine run: {num_same}/{len(results)}"
    )
    ok = ok and recomputed == 0
    codes = testbed.close()
    print(f"workers stopped: {codes}")
    ok = ok and all(code == 0 for code in codes.values())
    print("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1
