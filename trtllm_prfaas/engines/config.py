"""The reference engine's configuration, counters, and the ``llm_args`` its connectors get."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.errors import ConfigError

__all__ = ["EngineConfig", "EngineStats", "KvCacheConfigArgs", "ReferenceLlmArgs"]


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    num_blocks: int = 2048  # device pool blocks (2048 x 32 tokens = 64K tokens)
    max_num_seqs: int = 16  # concurrent requests (recurrent-state slots)
    chunk_size: int = 2048  # prefill chunk, a multiple of tokens_per_block
    max_num_tokens: int = 4096  # tokens per iteration (decode tokens + prefill chunks)
    max_waiting: int = 1024
    admission_timeout_s: float = 300.0
    connector_timeout_s: float = 60.0
    on_load_failure: str = "recompute"  # a failed connector load: "recompute" locally or "fail"
    num_threads: int = 2
    # Prefix cache (TensorRT-LLM's enable_block_reuse). Off by default: TensorRT-LLM 1.x turns
    # block reuse off for hybrid (Mamba) models, so a GPU deployment of the reference engine's
    # hybrid shape runs without it; a worker turns it on explicitly. See prefix_cache.py.
    enable_block_reuse: bool = False
    max_cached_blocks: int | None = None  # unreferenced cached blocks kept (None: whole pool)
    num_state_snapshots: int = 64  # recurrent-state snapshots (hybrid models), LRU
    max_kv_events: int = 10000  # KV cache events buffered between drains (oldest dropped)

    def __post_init__(self) -> None:
        tpb = self.model.tokens_per_block
        if self.chunk_size <= 0 or self.chunk_size % tpb:
            raise ConfigError(f"chunk_size {self.chunk_size} must be a positive multiple of {tpb}")
        if self.max_num_tokens < self.chunk_size:
            raise ConfigError(f"max_num_tokens {self.max_num_tokens} < chunk_size")
        if self.on_load_failure not in ("recompute", "fail"):
            raise ConfigError(
                f"on_load_failure must be 'recompute' or 'fail', got {self.on_load_failure!r}"
            )
        for name in ("num_blocks", "max_num_seqs", "max_waiting", "num_threads", "max_kv_events"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"EngineConfig.{name} must be > 0")
        if self.num_state_snapshots < 0:
            raise ConfigError(
                f"EngineConfig.num_state_snapshots must be >= 0, got {self.num_state_snapshots}"
            )
        if self.max_cached_blocks is not None and self.max_cached_blocks < 0:
            raise ConfigError(
                f"EngineConfig.max_cached_blocks must be >= 0 or None, got {self.max_cached_blocks}"
            )


@dataclass
class EngineStats:
    """Counters a user would watch (the worker exports them as metrics)."""

    num_iterations: int = 0
    num_prompt_tokens_computed: int = 0
    num_connector_tokens: int = 0  # prompt tokens supplied by the connector instead
    num_generated_tokens: int = 0
    num_failed_requests: int = 0
    num_prefix_queries: int = 0  # requests admitted with block reuse on
    num_prefix_hits: int = 0  # ... that reused at least one cached block
    num_reused_tokens: int = 0  # prompt tokens served from the engine's own cached blocks
    num_block_evictions: int = 0  # cached blocks evicted (LRU) to make room
    num_snapshot_evictions: int = 0  # recurrent-state snapshots evicted
    num_kv_events_dropped: int = 0  # KV cache events discarded because the buffer was full


@dataclass
class KvCacheConfigArgs:
    tokens_per_block: int


@dataclass
class ReferenceLlmArgs:
    """The slice of TensorRT-LLM's ``TorchLlmArgs`` that connectors read, plus the model id."""

    kv_cache_config: KvCacheConfigArgs
    model: str
    dtype: str
    connector_options: dict[str, Any] = field(default_factory=dict)
