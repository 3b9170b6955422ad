"""What the PrfaaS connector's scheduler half tells every rank, and how both halves find their
runtime (see ``connector/prfaas.py`` for the whole connector).

``PrfaasMeta`` is broadcast unchanged to every tensor-parallel rank (``mpi_broadcast``: pickle), so
it carries transfer uuids and claimed tokens, never a rank's transfer id: each rank derives its own
(``prfaas_runtime.transfer_id_for`` with its own ``CacheKey``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trtllm_prfaas.connector.prfaas_runtime import (
    PrfaasRuntime,
    cache_key_of,
    runtime_for,
    tp_size_of,
)
from trtllm_prfaas.errors import ConfigError

__all__ = [
    "Drop",
    "LoadPlan",
    "PrfaasMeta",
    "SendPlan",
    "hybrid_reason",
    "is_reference_host",
    "refuse_hybrid",
    "runtime_of",
]


@dataclass
class SendPlan:
    """Export the blocks a prefill chunk completed (every rank: its own shard, its own id)."""

    request_id: int
    transfer_uuid: str
    relay_endpoints: list[str]
    tokens: list[int] | None  # the L tokens: in the request's first send only (ids per rank)
    device_blocks: list[int]  # blocks [block_start, block_start + n) of the request, in order
    block_start: int
    is_last: bool  # this chunk ends at L: send the tail, close every layer, finish
    # Hybrid models: this chunk ends at S = floor((L-1)/B)*B beyond what the decode holds:
    # send every linear layer's state after S too (the decode keeps it as a snapshot)
    snapshot_tokens: int = 0


@dataclass
class LoadPlan:
    """Copy a whole relayed transfer into the request's blocks (every rank: its own shard)."""

    request_id: int
    transfer_uuid: str
    tokens: list[int]  # the L claimed tokens (each rank derives its own transfer id)
    skip_blocks: int  # num_computed_tokens // tokens_per_block: reused blocks, never written
    device_blocks: list[int] = field(default_factory=list)


@dataclass
class Drop:
    """A transfer nobody will load (not complete at claim time, or all reused): every rank
    releases its buffers (a still-receiving transfer is abandoned: its sender is told)."""

    transfer_uuid: str
    tokens: list[int]


@dataclass
class PrfaasMeta:
    """Broadcast unchanged to every rank (picklable: plain dataclasses and lists)."""

    sends: list[SendPlan] = field(default_factory=list)
    loads: list[LoadPlan] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)


_HYBRID_KEYS = ("hybrid_override_pattern", "layers_block_type", "layer_types", "mamba_d_state")


def hybrid_reason(model: str) -> str | None:
    """Why ``model`` (a path holding a Hugging Face ``config.json``) is a hybrid model that
    TensorRT-LLM's connector API cannot serve, or None (dense, or no readable config)."""
    path = Path(model) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    model_type = str(config.get("model_type", "")).lower()
    kinds = [str(v).lower() for key in _HYBRID_KEYS[1:3] for v in (config.get(key) or [])]
    is_hybrid = (
        "mamba" in model_type
        or "hybrid" in model_type
        or bool(config.get("hybrid_override_pattern"))
        or config.get("mamba_d_state") is not None
        or any("mamba" in k or "linear" in k or "ssm" in k for k in kinds)
    )
    return f"{path} describes a hybrid model (model_type {model_type!r})" if is_hybrid else None


def refuse_hybrid(llm_args: Any) -> None:
    reason = hybrid_reason(str(getattr(llm_args, "model", "") or ""))
    if reason is not None:
        raise ConfigError(
            f"the PrfaaS connector cannot serve this model on TensorRT-LLM: {reason}. "
            "TensorRT-LLM keeps a hybrid's recurrent state outside the KV pool a connector sees, "
            "refuses KV connectors on Mamba cache managers (PR #13577), and on 1.2 its hybrid "
            "cache managers turn block reuse off, so a decode connector is never asked. Route "
            "this model local-only (prefill and decode on one node), or use TensorRT-LLM's "
            "native generation-only disaggregation (>= 1.3)."
        )


def is_reference_host(llm_args: Any) -> bool:
    """The reference engine passes its runtime in ``connector_options``; TensorRT-LLM's
    ``TorchLlmArgs`` has no such field."""
    return "prfaas_runtime" in (getattr(llm_args, "connector_options", None) or {})


def runtime_of(llm_args: Any) -> PrfaasRuntime:
    """The runtime the reference engine passed in, or, inside TensorRT-LLM, this rank's from
    the ``TRTLLM_PRFAAS_*`` variables (a hybrid model is refused first)."""
    if not is_reference_host(llm_args):
        refuse_hybrid(llm_args)
        from trtllm_prfaas.config import connector_config_from_env  # the edge: reads the env

        config = connector_config_from_env()
        return runtime_for(config, cache_key_of(llm_args), tp_size_of(llm_args))
    runtime = llm_args.connector_options["prfaas_runtime"]
    if not isinstance(runtime, PrfaasRuntime):
        raise ConfigError("connector_options['prfaas_runtime'] must be a PrfaasRuntime")
    return runtime
