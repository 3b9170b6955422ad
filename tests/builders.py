"""Builders with keyword defaults shared by the tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

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


def caching_engine_and_conversation(
    make_engine: Any, max_cached_blocks: int
) -> tuple[ModelConfig, Any, Any]:
    """A reference engine with block reuse (the tiny hybrid model, chunks of 64, state
    snapshots) and a short multi-turn conversation (3 conversations x 3 turns, one shared
    system prompt) whose prompts reuse each other's prefixes: ``(model, engine, conversations)``;
    ``conversations.trace(...).prompt_hashes`` are the prompts' block chains."""
    from trtllm_prfaas.sim.conversations import ConversationModel, make_conversations

    model = tiny_model()
    engine = make_engine(model=model, enable_block_reuse=True, chunk_size=64, max_num_tokens=128,
                         max_cached_blocks=max_cached_blocks, num_state_snapshots=64)  # fmt: skip
    conv = make_conversations(
        ConversationModel(3, 1.0, num_turns=3, num_system_prompts=1, system_prompt_tokens=80,
                          user_tokens=24, output_tokens=8, think_s=1.0), seed=6,
    )  # fmt: skip
    return model, engine, conv


_ROUTER_THREADS = ("local-engine", "frontdoor", "serve_forever")


def _router_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if any(n in t.name for n in _ROUTER_THREADS)}


@pytest.fixture(autouse=True)
def router_thread_leak_check() -> Iterator[None]:
    """No engine, front-door or metrics thread a test started outlives it (2 s grace)."""
    before = _router_threads()
    yield
    deadline = time.monotonic() + 2.0
    while _router_threads() - before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _router_threads() - before, f"leaked threads: {_router_threads() - before}"
