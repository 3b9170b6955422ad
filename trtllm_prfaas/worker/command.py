"""``prfaas worker``: one engine + connector process with a control endpoint for routers.

On start it prints one JSON line (``{"event": "ready", "worker_id", "control", "relay"}``) and
writes the same to ``--ready-file`` if given, then serves until SIGINT/SIGTERM.

``--engine reference`` runs the reference engine and the PrfaaS connector runtime in this process.
``--engine triton --triton-url HOST:PORT`` drives a remote Triton server's ``--triton-model`` over
gRPC instead; the connector runs inside that Triton, so the relay flags (``--relay``,
``--curve-keys``, ``--plaintext``, ``--num-streams``, ``--link-gbps``, ``--fallback``, the
timeouts) and the reference model flags do not apply, and a decode worker must name its Triton's
relay receiver with ``--advertise-relay`` (what prefill nodes connect to). The ``--triton-*``
sizes are what the worker advertises to routers; give the served ``model.yaml``'s values.
Triton's ``llmapi`` model speaks text, so ``--tokenizer DIR`` (the served model's Hugging Face
directory, ``model.yaml``'s ``model``) is required. Plans reach the connector inside Triton through
its plan server: ``--triton-plan-endpoint`` (rank 0, ``TRTLLM_PRFAAS_PLAN_BIND`` as this worker
reaches it; rank r at port + r, ``--triton-tp-size`` ranks), signed with ``--triton-plan-keys DIR``
(``docker/gen_curve_keys.py``'s directory: ``worker.public``/``worker.secret`` and the Triton
role's ``<role>.public``) or, explicitly, ``--plaintext``. Without a plan endpoint a relayed
request runs without its plan (counted and logged as ``plans_unconfigured``).

The control endpoint (routers' ``Submit``/``SetRole``/``Ping``) is secured with the same flags
as the relay: ``--curve-keys FILE``'s ``control`` section (this worker's control key pair and the
routers' public keys, ``config.write_testbed_keyset``) makes it a CurveZMQ server that admits
only those routers; ``--plaintext`` leaves both planes plaintext (warned). A worker whose role
may change needs a file with both relay roles' keys (``relay-both.json``). Over Triton without
``--curve-keys`` the control endpoint stays plaintext (warned): no relay keys are needed there.

Membership: ``--discovery etcd://HOST:PORT[,HOST:PORT] --namespace NS`` registers the worker's
record (``/NS/workers/CLUSTER/WORKER_ID``: its role, cluster and control endpoint as
``--advertise-control`` or the bound address names it) under a lease of ``--lease-ttl-s``
seconds (default 5), kept alive in the background, updated on a role change and put again after
etcd comes back; SIGTERM deletes it before the engine stops (``worker/registration.py``). The
ready line then adds ``key``, ``registered`` and ``advertised``. Routers started with the same
``--discovery``/``--namespace`` find the worker within a second and drop it within the lease TTL
of its death.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trtllm_prfaas.config import (
    MODEL_PRESETS,
    load_control_security,
    load_relay_security,
    model_preset,
)
from trtllm_prfaas.connector.prfaas_runtime import rank_endpoint
from trtllm_prfaas.discovery import open_membership
from trtllm_prfaas.discovery.membership import (
    DEFAULT_LEASE_TTL_S,
    DEFAULT_NAMESPACE,
    DiscoveryConfig,
    check_name,
    parse_discovery,
)
from trtllm_prfaas.discovery.records import WorkerRecord
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.engines.tokenizer import model_vocabulary
from trtllm_prfaas.engines.triton import TritonEngineConfig
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.transport import RelayConfig, RelaySecurity
from trtllm_prfaas.transport.config import CurveKeys
from trtllm_prfaas.transport.pinning import parse_cpus
from trtllm_prfaas.worker.registration import WorkerRegistration, advertised_control
from trtllm_prfaas.worker.server import WorkerConfig, WorkerRole, WorkerServer

DEFAULT_PRFAAS_CLUSTERS = ("dc-remote",)  # as prfaas router's --prfaas-cluster

__all__ = ["add_arguments", "build_config", "run"]


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=[r.value for r in WorkerRole], required=True)
    parser.add_argument("--cluster", required=True, help="cluster name, e.g. dc-remote")
    parser.add_argument("--engine", choices=["reference", "triton"], default="reference")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--control", default="tcp://127.0.0.1:0", help="control bind endpoint")
    parser.add_argument("--relay", default="tcp://127.0.0.1:0", help="decode: relay bind endpoint")
    parser.add_argument(
        "--curve-keys", type=Path, default=None, help="Curve key file: relay and control plane"
    )
    parser.add_argument(
        "--plaintext", action="store_true", help="relay and control plane without encryption"
    )
    parser.add_argument("--num-streams", type=int, default=4)
    parser.add_argument("--link-gbps", type=float, default=None, help="pace relay sends")
    parser.add_argument(
        "--chunk-bytes", type=int, default=RelayConfig.chunk_bytes, help="relay message payload"
    )
    parser.add_argument(
        "--relay-cpus",
        default=None,
        help="pin the relay's I/O threads to these CPUs, e.g. 3 or 2,3",
    )
    parser.add_argument("--model-preset", choices=sorted(MODEL_PRESETS), default="default")
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--num-blocks", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument(
        "--enable-block-reuse",
        action="store_true",
        help="keep a prefix cache (TensorRT-LLM's enable_block_reuse) and publish its KV cache "
        "events to routers for cache-aware routing",
    )
    parser.add_argument(
        "--max-cached-blocks",
        type=int,
        default=None,
        help="with --enable-block-reuse: unreferenced cached blocks kept (LRU; default the pool)",
    )
    parser.add_argument(
        "--accept-cache-moves",
        action="store_true",
        help="prefill role: also bind a relay receiver (at --relay, with receiver keys as a "
        "decode worker's) and take cached prefixes the router moves here under abundant "
        "bandwidth (issue 15 item 5)",
    )
    parser.add_argument("--num-threads", type=int, default=2, help="torch threads of the engine")
    parser.add_argument("--fallback", choices=["recompute", "fail"], default="recompute")
    parser.add_argument("--transfer-timeout-s", type=float, default=120.0)
    parser.add_argument("--load-timeout-s", type=float, default=120.0)
    parser.add_argument("--ready-file", type=Path, default=None)
    _add_discovery_arguments(parser)
    triton = parser.add_argument_group("--engine triton (the connector runs inside Triton)")
    triton.add_argument("--triton-url", default=None, help="Triton gRPC HOST:PORT")
    triton.add_argument("--triton-model", default="tensorrt_llm", help="served model name")
    triton.add_argument(
        "--advertise-relay",
        default="",
        help="decode: the relay receiver as prefill nodes reach it: this Triton's connector's, "
        "e.g. tcp://triton-decode:7100, or a reference worker's that binds --relay "
        "tcp://0.0.0.0:7100 (default: the bound address)",
    )
    defaults = TritonEngineConfig("-")
    triton.add_argument("--triton-connect-timeout-s", type=float, default=600.0,
                        help="wait this long at start for the model to be ready")  # fmt: skip
    triton.add_argument("--triton-request-timeout-s", type=float,
                        default=defaults.request_timeout_s)  # fmt: skip
    triton.add_argument("--triton-max-batch-size", type=int, default=defaults.max_batch_size)
    triton.add_argument("--triton-max-seq-len", type=int, default=defaults.max_seq_len)
    triton.add_argument("--triton-tokens-per-block", type=int,
                        default=defaults.tokens_per_block)  # fmt: skip
    triton.add_argument("--triton-num-blocks", type=int, default=defaults.num_blocks_hint,
                        help="KV pool blocks to advertise (0: unknown)")  # fmt: skip
    triton.add_argument("--triton-kv-bytes-per-token", type=int, default=0)
    triton.add_argument("--triton-kv-state-bytes", type=int, default=0)
    triton.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="the served model's Hugging Face directory (model.yaml model); with --engine "
        "reference, the reference model takes its vocabulary (size and EOS id)",
    )
    triton.add_argument(
        "--triton-plan-endpoint",
        default=None,
        help="rank 0's plan server, e.g. tcp://triton-prefill:7200",
    )
    triton.add_argument(
        "--triton-tp-size",
        type=int,
        default=1,
        help="tensor-parallel ranks of the Triton model (plan servers)",
    )
    triton.add_argument(
        "--triton-plan-keys",
        type=Path,
        default=None,
        help="Curve key directory (worker.public/.secret, <role>.public)",
    )


def _add_discovery_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("membership (routers find this worker in etcd)")
    group.add_argument(
        "--discovery",
        type=_discovery_url,
        default=None,
        metavar="etcd://HOST:PORT[,HOST:PORT]",
        help="register this worker in etcd under a lease (default: none; routers list it)",
    )
    group.add_argument(
        "--namespace",
        type=_namespace,
        default=DEFAULT_NAMESPACE,
        help=f"membership namespace: keys /NS/workers/CLUSTER/ID (default {DEFAULT_NAMESPACE})",
    )
    group.add_argument(
        "--lease-ttl-s",
        type=float,
        default=DEFAULT_LEASE_TTL_S,
        help=f"a killed worker leaves routing within this (>= 2, default {DEFAULT_LEASE_TTL_S:g})",
    )
    group.add_argument(
        "--advertise-control",
        default="",
        metavar="tcp://HOST:PORT",
        help="control endpoint as routers reach it (default: --control, a wildcard host "
        "replaced by this host's address)",
    )
    group.add_argument(
        "--prfaas-cluster",
        action="append",
        default=None,
        metavar="CLUSTER",
        help="clusters whose workers are PrfaaS (remote prefill) workers; repeatable "
        "(default: dc-remote, as prfaas router)",
    )


def _discovery_url(text: str) -> DiscoveryConfig:
    try:
        return parse_discovery(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _namespace(text: str) -> str:
    try:
        return check_name(text, "--namespace")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_config(args: argparse.Namespace) -> WorkerConfig:
    """The worker's frozen config from parsed arguments (files are read here, at the edge)."""
    vocabulary = model_vocabulary(str(args.tokenizer or "")) if args.engine == "reference" else {}
    model = model_preset(args.model_preset, seed=args.model_seed, dtype=args.dtype, **vocabulary)
    chunk = max(
        model.tokens_per_block, args.chunk_size // model.tokens_per_block * model.tokens_per_block
    )
    engine = EngineConfig(
        model=model,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        chunk_size=chunk,
        max_num_tokens=max(chunk, 4096),
        num_threads=args.num_threads,
        enable_block_reuse=args.enable_block_reuse,
        max_cached_blocks=args.max_cached_blocks,
    )
    if args.engine == "triton" and args.curve_keys is None:
        # Never used: this process opens no relay socket (Triton's connector does the relay,
        # secured by its TRTLLM_PRFAAS_CURVE_* variables).
        security = RelaySecurity.insecure_plaintext()
        control = RelaySecurity.insecure_plaintext()  # warned when the control socket binds
    else:
        security = load_relay_security(args.curve_keys, args.plaintext)
        control = load_control_security(args.curve_keys, args.plaintext, "worker")
    relay = RelayConfig(
        security=security,
        num_streams=args.num_streams,
        link_gbps=args.link_gbps,
        chunk_bytes=args.chunk_bytes,
        cpu_affinity=parse_cpus(args.relay_cpus, "--relay-cpus"),
    )
    worker_id = args.worker_id or f"{args.cluster}-{args.role}-{os.getpid()}"
    triton = None
    if args.engine == "triton":
        if not args.triton_url:
            raise ConfigError("--engine triton needs --triton-url HOST:PORT")
        if args.enable_block_reuse or args.max_cached_blocks is not None:
            raise ConfigError(
                "--enable-block-reuse/--max-cached-blocks configure the reference engine; a "
                "Triton worker's block reuse is TensorRT-LLM's (model.yaml kv_cache_config), "
                "and routers follow it approximately"
            )
        if args.accept_cache_moves:
            # The move's receiving leg needs the reference engine's prefix cache to keep what
            # it claims; inside Triton the connector is configured by model.yaml, which does
            # not ask for a receiver on a prefill model.
            raise ConfigError(
                "--accept-cache-moves needs --engine reference: a Triton prefill worker's "
                "connector binds no relay receiver, so no prefix could be moved to it"
            )
        if args.tokenizer is None:
            raise ConfigError(
                "--engine triton needs --tokenizer DIR: the served model's Hugging Face "
                "directory (Triton's llmapi model takes and returns text)"
            )
        endpoints, plan_security = _plan_carrier(args)
        triton = TritonEngineConfig(
            args.triton_url,
            tokenizer_dir=str(args.tokenizer),
            plan_endpoints=endpoints,
            plan_security=plan_security,
            model_name=args.triton_model,
            connect_timeout_s=args.triton_connect_timeout_s,
            request_timeout_s=args.triton_request_timeout_s,
            max_batch_size=args.triton_max_batch_size,
            num_blocks_hint=args.triton_num_blocks,
            tokens_per_block=args.triton_tokens_per_block,
            max_seq_len=args.triton_max_seq_len,
            kv_bytes_per_token=args.triton_kv_bytes_per_token,
            kv_state_bytes=args.triton_kv_state_bytes,
        )
    elif args.triton_url or args.triton_plan_endpoint:
        raise ConfigError("--triton-url / --triton-plan-endpoint need --engine triton")
    return WorkerConfig(
        worker_id,
        WorkerRole(args.role),
        args.cluster,
        relay,
        engine,
        args.control,
        args.relay,
        args.transfer_timeout_s,
        args.load_timeout_s,
        args.fallback,
        triton=triton,
        advertise_relay=args.advertise_relay,
        control_security=control,
        accept_cache_moves=args.accept_cache_moves,
    )


def _plan_carrier(args: argparse.Namespace) -> tuple[tuple[str, ...], RelaySecurity | None]:
    """The connector ranks' plan servers and how to reach them (files are read here)."""
    if not args.triton_plan_endpoint:
        return (), None
    if args.triton_tp_size < 1:
        raise ConfigError(f"--triton-tp-size must be >= 1, got {args.triton_tp_size}")
    endpoints = tuple(
        rank_endpoint(args.triton_plan_endpoint, rank) for rank in range(args.triton_tp_size)
    )
    if args.triton_plan_keys is not None and args.plaintext:
        raise ConfigError("--triton-plan-keys and --plaintext are mutually exclusive")
    if args.plaintext:
        return endpoints, RelaySecurity.insecure_plaintext()
    if args.triton_plan_keys is None:
        raise ConfigError("--triton-plan-endpoint needs --triton-plan-keys DIR (or --plaintext)")
    keys = args.triton_plan_keys
    try:
        curve = CurveKeys(
            server_public_key=(keys / f"{args.role}.public").read_bytes().strip(),
            client_public_key=(keys / "worker.public").read_bytes().strip(),
            client_secret_key=(keys / "worker.secret").read_bytes().strip(),
        )
    except OSError as exc:
        raise ConfigError(f"--triton-plan-keys {keys}: {exc}") from exc
    return endpoints, RelaySecurity(curve=curve)


def _warm_up(server: WorkerServer) -> None:
    """One tiny generation before reporting ready, so the first real request does not pay
    the engine's one-time start-up costs (BLAS and allocator initialisation)."""
    engine = server.engine
    if isinstance(engine, ReferenceEngine):
        engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, ignore_eos=True), timeout_s=60)


def _record_of(server: WorkerServer, args: argparse.Namespace) -> Callable[[], WorkerRecord]:
    """What this worker registers, read afresh each time (the role and relay may change)."""
    config = server.config
    control = advertised_control(server.endpoint, args.advertise_control)
    is_prfaas = config.cluster in (args.prfaas_cluster or DEFAULT_PRFAAS_CLUSTERS)
    model_id = server.info().model_id

    def record() -> WorkerRecord:
        return WorkerRecord(
            name=config.worker_id,
            cluster=config.cluster,
            role=server.role,
            is_prfaas=is_prfaas,
            control_endpoint=control,
            relay_endpoint=server.relay_endpoint,
            model_id=model_id,
        )

    return record


def _register(server: WorkerServer, args: argparse.Namespace) -> WorkerRegistration | None:
    """With ``--discovery``: the worker's record under a lease (see worker/registration.py)."""
    if args.discovery is None:
        return None
    if not args.lease_ttl_s >= 2:
        raise ConfigError(f"--lease-ttl-s must be >= 2 (etcd's shortest lease), got "
                          f"{args.lease_ttl_s:g}")  # fmt: skip
    check_name(server.config.worker_id, "--worker-id")
    check_name(server.config.cluster, "--cluster")
    membership = open_membership(args.discovery)
    try:
        return WorkerRegistration(
            membership, args.namespace, _record_of(server, args), ttl_s=args.lease_ttl_s
        ).start()
    except BaseException:
        membership.close()
        raise


def run(command: str, args: argparse.Namespace) -> int:
    config = build_config(args)
    with WorkerServer(config) as server:
        _warm_up(server)
        registration = _register(server, args)
        try:
            ready: dict[str, Any] = {
                "event": "ready",
                "worker_id": config.worker_id,
                "control": server.endpoint,
                "relay": server.relay_endpoint,
            }
            if registration is not None:
                ready |= {"key": registration.key, "registered": registration.is_registered,
                          "advertised": registration.record.control_endpoint}  # fmt: skip
            line = json.dumps(ready)
            print(line, flush=True)
            if args.ready_file is not None:
                args.ready_file.write_text(line + "\n")
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: server.stop())
            server.serve()
        finally:
            if registration is not None:  # deregister before the engine stops
                registration.close()
                registration.membership.close()
    print(json.dumps({"event": "stopped", "worker_id": config.worker_id}), file=sys.stderr)
    return 0
