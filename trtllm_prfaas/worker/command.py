"""``prfaas worker``: one engine + connector process with a control endpoint for routers.

On start it prints one JSON line (``{"event": "ready", "worker_id", "control", "relay"}``) and
writes the same to ``--ready-file`` if given, then serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from trtllm_prfaas.config import MODEL_PRESETS, load_relay_security, model_preset
from trtllm_prfaas.engines.engine import EngineConfig
from trtllm_prfaas.transport import RelayConfig
from trtllm_prfaas.worker.server import WorkerConfig, WorkerRole, WorkerServer

__all__ = ["add_arguments", "build_config", "run"]


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=[r.value for r in WorkerRole], required=True)
    parser.add_argument("--cluster", required=True, help="cluster name, e.g. dc-remote")
    parser.add_argument("--engine", choices=["reference"], default="reference")
    parser.add_argument("--worker-id", default=None)
    parser.add_argument("--control", default="tcp://127.0.0.1:0", help="control bind endpoint")
    parser.add_argument("--relay", default="tcp://127.0.0.1:0", help="decode: relay bind endpoint")
    parser.add_argument("--curve-keys", type=Path, default=None, help="relay Curve key file")
    parser.add_argument("--plaintext", action="store_true", help="relay without encryption")
    parser.add_argument("--num-streams", type=int, default=4)
    parser.add_argument("--link-gbps", type=float, default=None, help="pace relay sends")
    parser.add_argument("--model-preset", choices=sorted(MODEL_PRESETS), default="default")
    parser.add_argument("--model-seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--num-blocks", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--fallback", choices=["recompute", "fail"], default="recompute")
    parser.add_argument("--transfer-timeout-s", type=float, default=120.0)
    parser.add_argument("--load-timeout-s", type=float, default=120.0)
    parser.add_argument("--ready-file", type=Path, default=None)


def build_config(args: argparse.Namespace) -> WorkerConfig:
    """The worker's frozen config from parsed arguments (files are read here, at the edge)."""
    model = model_preset(args.model_preset, seed=args.model_seed, dtype=args.dtype)
    chunk = max(
        model.tokens_per_block, args.chunk_size // model.tokens_per_block * model.tokens_per_block
    )
    engine = EngineConfig(
        model=model,
        num_blocks=args.num_blocks,
        max_num_seqs=args.max_num_seqs,
        chunk_size=chunk,
        max_num_tokens=max(chunk, 4096),
    )
    security = load_relay_security(args.curve_keys, args.plaintext)
    relay = RelayConfig(security=security, num_streams=args.num_streams, link_gbps=args.link_gbps)
    worker_id = args.worker_id or f"{args.cluster}-{args.role}-{os.getpid()}"
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
    )


def run(command: str, args: argparse.Namespace) -> int:
    config = build_config(args)
    with WorkerServer(config) as server:
        ready: dict[str, Any] = {
            "event": "ready",
            "worker_id": config.worker_id,
            "control": server.endpoint,
            "relay": server.relay_endpoint,
        }
        line = json.dumps(ready)
        print(line, flush=True)
        if args.ready_file is not None:
            args.ready_file.write_text(line + "\n")
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: server.stop())
        server.serve()
    print(json.dumps({"event": "stopped", "worker_id": config.worker_id}), file=sys.stderr)
    return 0
