"""``prfaas triton-repo``: write a PrfaaS prefill or decode Triton model repository.

    prfaas triton-repo --role prefill|decode --model PATH --out DIR [--relay-bind tcp://...]
        [--relay-advertise tcp://...] [--plan-bind tcp://...]

writes ``DIR/<model-name>/config.pbtxt``, ``DIR/<model-name>/1/model.yaml`` and
``DIR/<model-name>/prfaas.env`` (see ``trtllm_prfaas.deploy.triton_repo``) and prints their paths.
The presets are those of ``engines/`` (8xH200 prefill, 8xH20 decode); flags override them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trtllm_prfaas.deploy.env import DeployRole
from trtllm_prfaas.deploy.triton_repo import (
    DEFAULT_KEY_DIR,
    DEFAULT_PLAN_BIND,
    RelayEnvConfig,
    triton_repo_config,
    write_repository,
)

__all__ = ["add_arguments", "run"]

_LLM_FLAGS = (
    "tensor_parallel_size",
    "max_batch_size",
    "max_num_tokens",
    "max_seq_len",
    "max_input_len",
    "tokens_per_block",
)


def add_arguments(command_name: str, parser: argparse.ArgumentParser) -> None:
    """Register the ``triton-repo`` flags on ``parser``."""
    parser.add_argument("--role", required=True, choices=[r.value for r in DeployRole])
    parser.add_argument("--model", required=True, help="HF model id or path inside the container")
    parser.add_argument("--out", required=True, type=Path, help="model repository directory")
    parser.add_argument("--model-name", default="tensorrt_llm", help="Triton model name")
    parser.add_argument(
        "--relay-bind", default=None, help="decode: relay bind (default tcp://0.0.0.0:7100)"
    )
    parser.add_argument(
        "--relay-advertise", default=None, help="decode: relay address prefill ranks reach"
    )
    parser.add_argument(
        "--plan-bind", default=DEFAULT_PLAN_BIND, help="the connector's plan server (rank r: +r)"
    )
    parser.add_argument(
        "--recv-buffer-bytes",
        type=int,
        default=None,
        help="decode: host bytes per rank's relay receiver (>= one rank's KV shard of the "
        "longest relayed prompt x decodes waiting at once; unset: the connector's default)",
    )
    parser.add_argument("--num-streams", type=int, default=4, help="TCP streams per link")
    parser.add_argument("--link-gbps", type=float, default=None, help="prefill: pacing, Gbit/s")
    parser.add_argument("--transfer-timeout-s", type=float, default=30.0)
    parser.add_argument(
        "--key-dir", default=DEFAULT_KEY_DIR, help="Curve key directory inside the container"
    )
    parser.add_argument("--kv-cache-dtype", default=None, help="e.g. fp8 (default auto)")
    parser.add_argument("--trust-remote-code", action="store_true")
    for name in _LLM_FLAGS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=None, help="override the role's preset")


def run(command_name: str, args: argparse.Namespace) -> int:
    """Render and write the repository; returns 0 (a ConfigError reaches the CLI edge)."""
    role = DeployRole(args.role)
    bind = args.relay_bind
    if bind is None and role is DeployRole.DECODE:
        bind = "tcp://0.0.0.0:7100"
    relay = RelayEnvConfig.with_key_dir(
        role,
        args.key_dir,
        relay_bind=bind,
        relay_advertise=args.relay_advertise,
        plan_bind=args.plan_bind,
        recv_buffer_bytes=args.recv_buffer_bytes,
        num_streams=args.num_streams,
        link_gbps=args.link_gbps,
        transfer_timeout_s=args.transfer_timeout_s,
    )
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _LLM_FLAGS if getattr(args, name) is not None
    }
    if args.kv_cache_dtype is not None:
        overrides["kv_cache_dtype"] = args.kv_cache_dtype
    if args.trust_remote_code:
        overrides["trust_remote_code"] = True
    config = triton_repo_config(
        role, args.model, relay=relay, model_name=args.model_name, **overrides
    )
    for path in write_repository(config, args.out):
        print(path)
    return 0
