"""Builders with keyword defaults shared by the tests."""

from __future__ import annotations

from typing import Any

from trtllm_prfaas.engines.reference import ModelConfig


def tiny_model(**overrides: Any) -> ModelConfig:
    """A small hybrid model (3 linear layers, 1 full) that runs in milliseconds."""
    fields: dict[str, Any] = dict(
        num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
        linear_num_heads=2, mlp_hidden_size=96, tokens_per_block=16, attention_tile_blocks=2,
        max_seq_len=4096, seed=7,
    )  # fmt: skip
    fields.update(overrides)
    return ModelConfig(**fields)
