"""The host-memory connector as a second tier under the engine's own block reuse (TensorRT-LLM's
KVBM offload shape): when the device cache (bounded by ``max_cached_blocks``) has evicted the
tail of an earlier turn but kept its head, the host tier supplies the blocks above the device's
match and the state at their end, the engine computes only the rest, and the tokens equal a cold
single engine. The host ends up holding the whole chain; nothing leaks in either pool."""

from __future__ import annotations

import pytest

from tests.builders import tiny_model
from tests.conftest import EngineFactory
from tests.connector.fakes import AsyncHostMemoryScheduler, AsyncHostMemoryWorker
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.connector.host_memory import HostKVStore, host_memory_connector
from trtllm_prfaas.engines.engine import ReferenceEngine
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.kv.hashing import block_hashes

TPB = 16  # tiny_model's tokens_per_block
SAMPLING = SamplingParams(max_tokens=8, temperature=0.7, seed=3, ignore_eos=True)
# Device cache: 4 unreferenced blocks kept. Turn 1's 10 prompt blocks are released tail first,
# so the device keeps blocks 0-3 (and its snapshot at 64 tokens) and evicts 4-9.
DEVICE = dict(enable_block_reuse=True, max_cached_blocks=4, chunk_size=32, max_num_tokens=64)


def _prompt(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % 256 for i in range(n)]


def _host_chain_len(store: HostKVStore, tokens: list[int]) -> int:
    """How many full blocks of ``tokens``' chain the host holds, from the head (a peek)."""
    return store.pool.num_cached_prefix_blocks(block_hashes(tokens, TPB, store.key))


def _two_turns(engine: ReferenceEngine) -> tuple[list[int], list[int], int]:
    """Turn 1 (160 tokens), then turn 2 = turn 1 + its reply + a new 20-token message (188).
    Returns turn 2's prompt, its tokens and the prompt tokens turn 2 computed."""
    first = _prompt(10 * TPB, seed=1)
    reply = engine.generate([first], SAMPLING)[0]
    second = first + reply + _prompt(20, seed=2)
    before = engine.stats.num_prompt_tokens_computed
    got = engine.generate([second], SAMPLING)[0]
    return second, got, engine.stats.num_prompt_tokens_computed - before


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("pattern", ["LLLF", "F"], ids=["hybrid", "full-attention"])
def test_the_host_tier_supplies_what_the_device_evicted(
    make_engine: EngineFactory, pattern: str, dtype: str
) -> None:
    model = tiny_model(layer_pattern=pattern, dtype=dtype)
    pair, store = host_memory_connector(model, num_blocks=64, num_states=16)
    engine = make_engine(model, connector=pair, **DEVICE)
    second, got, computed = _two_turns(engine)
    assert len(second) == 188
    assert got == make_engine(model, chunk_size=32).generate([second], SAMPLING)[0]
    # Device: blocks 0-3 (64 tokens). Host: blocks 4-9 and the state at 160 (turn 1's end).
    assert engine.stats.num_reused_tokens == 64
    assert engine.stats.num_connector_tokens == 96
    assert computed == 188 - 160
    stats = pair.scheduler.stats
    assert (stats.num_hits_beyond_device, stats.num_hit_tokens_beyond_device) == (1, 96)
    # The host keeps the whole chain of turn 2 (11 full blocks of its first 187 tokens); the
    # device-reused and host-loaded blocks were touched, not copied again.
    assert _host_chain_len(store, second[:-1]) == 11
    assert stats.num_saved_blocks == 10 + 1 and stats.num_skipped_blocks == 10
    store.pool.assert_no_leaks()
    store.pool.check_invariants()

    # Without the host tier the same engine shape recomputes from the device's 64 tokens.
    alone = make_engine(model, **DEVICE)
    second_alone, got_alone, computed_alone = _two_turns(alone)
    assert (second_alone, got_alone) == (second, got)
    assert alone.stats.num_reused_tokens == 64 and computed_alone == 188 - 64


def test_blocks_the_host_lost_are_saved_again_from_the_device(make_engine: EngineFactory) -> None:
    """The host evicted all of turn 1 while the device kept its head: turn 2 gets no host claim,
    and its saves copy the device-reused blocks back, so the host holds the whole chain again
    and a third turn (device evicted again) claims from the host."""
    model = tiny_model()
    pair, store = host_memory_connector(model, num_blocks=64, num_states=16)
    engine = make_engine(model, connector=pair, **DEVICE)
    first = _prompt(10 * TPB, seed=1)
    reply = engine.generate([first], SAMPLING)[0]
    pool = store.pool
    junk = pool.allocate_prefix_blocks(range(10**6, 10**6 + pool.num_available_blocks()))
    pool.release(junk)  # pending, never committed: freed; every cached block was evicted
    assert _host_chain_len(store, first) == 0
    second = first + reply + _prompt(20, seed=2)
    got = engine.generate([second], SAMPLING)[0]
    assert got == make_engine(model, chunk_size=32).generate([second], SAMPLING)[0]
    assert engine.stats.num_reused_tokens == 64 and engine.stats.num_connector_tokens == 0
    assert _host_chain_len(store, second[:-1]) == 11
    third = second + got + _prompt(20, seed=3)
    before = engine.stats.num_prompt_tokens_computed
    got3 = engine.generate([third], SAMPLING)[0]
    assert got3 == make_engine(model, chunk_size=32).generate([third], SAMPLING)[0]
    # Device: 64 again (max 4 cached). Host: the rest up to turn 2's last full block, 176.
    assert engine.stats.num_reused_tokens == 128
    assert engine.stats.num_connector_tokens == 176 - 64
    assert engine.stats.num_prompt_tokens_computed - before == len(third) - 176
    pool.assert_no_leaks()
    pool.check_invariants()


def test_a_device_match_that_covers_the_host_claim_adds_nothing(
    make_engine: EngineFactory,
) -> None:
    """A repeat with the device cache unbounded: the device already holds everything the host
    could supply (up to the last block-aligned snapshot), so the host claims nothing."""
    model: ModelConfig = tiny_model()
    pair, store = host_memory_connector(model, num_blocks=64, num_states=16)
    engine = make_engine(model, connector=pair, enable_block_reuse=True, chunk_size=32)
    prompt = _prompt(150, seed=4)
    want = engine.generate([prompt], SAMPLING)
    assert engine.generate([prompt], SAMPLING) == want
    assert engine.stats.num_reused_tokens == 144 and engine.stats.num_connector_tokens == 0
    assert pair.scheduler.stats.num_queries == 2 and pair.scheduler.stats.num_hits == 0
    store.pool.assert_no_leaks()


def _conversations(engine: ReferenceEngine) -> list[list[int]]:
    """Four conversations interleaved turn by turn, five turns each: a 300-token opening, then
    each turn appends the 16-token reply and a 40-token message (prompts of 300 to 524 tokens;
    8240 prompt tokens in all). Returns every reply in order."""
    sampling = SamplingParams(max_tokens=16, temperature=0.7, seed=3, ignore_eos=True)
    history = {c: _prompt(300, seed=c) for c in range(4)}
    replies = []
    for turn in range(5):
        for c in range(4):
            replies.append(engine.generate([history[c]], sampling)[0])
            history[c] += replies[-1] + _prompt(40, seed=100 + 10 * turn + c)
    return replies


def test_interleaved_conversations_compute_about_half_with_the_host_tier(
    make_engine: EngineFactory,
) -> None:
    """The figure in docs/design/prefix_cache.md §5: a device cache of 96 unreferenced blocks
    cannot keep four growing conversations; the host tier (2048 blocks) keeps them all."""
    model = model_preset("tiny")
    config = dict(num_blocks=256, chunk_size=64, max_num_tokens=128)
    device = dict(config, enable_block_reuse=True, max_cached_blocks=96)
    cold = make_engine(model, **config)
    want = _conversations(cold)
    assert cold.stats.num_prompt_tokens_computed == 8240
    alone = make_engine(model, **device)
    assert _conversations(alone) == want
    pair, store = host_memory_connector(model, num_blocks=2048, num_states=256)
    tiered = make_engine(model, connector=pair, **device)
    assert _conversations(tiered) == want
    assert alone.stats.num_prompt_tokens_computed == 4176
    assert tiered.stats.num_prompt_tokens_computed == 2224
    assert tiered.stats.num_reused_tokens == alone.stats.num_reused_tokens == 4064
    assert tiered.stats.num_connector_tokens == 1952
    assert pair.scheduler.stats.num_hit_tokens_beyond_device > 0
    store.pool.assert_no_leaks()
    store.pool.check_invariants()


def test_an_async_load_above_the_device_match_is_exact(make_engine: EngineFactory) -> None:
    """The same two turns with the load reported done only after a few polls: the request is
    parked with the device's 64 tokens referenced, then resumes at 160."""
    model = tiny_model()
    pair, store = host_memory_connector(
        model, scheduler_cls=AsyncHostMemoryScheduler, worker_cls=AsyncHostMemoryWorker
    )
    engine = make_engine(model, connector=pair, **DEVICE)
    second, got, computed = _two_turns(engine)
    assert got == make_engine(model, chunk_size=32).generate([second], SAMPLING)[0]
    assert engine.stats.num_reused_tokens == 64 and engine.stats.num_connector_tokens == 96
    assert computed == 188 - 160
    store.pool.assert_no_leaks()


def test_a_host_pool_without_state_room_saves_nothing_and_leaks_nothing(
    make_engine: EngineFactory,
) -> None:
    """Every snapshot point fails to get a state slot: the blocks allocated beside it are given
    back (not left pending), the save is skipped (logged) and the tokens stay exact."""
    model = tiny_model()
    pair, store = host_memory_connector(model, num_blocks=64, num_states=0)
    engine = make_engine(model, connector=pair, **DEVICE)
    second, got, computed = _two_turns(engine)
    assert got == make_engine(model, chunk_size=32).generate([second], SAMPLING)[0]
    assert engine.stats.num_connector_tokens == 0 and computed == 188 - 64
    assert store.pool.stats().num_cached_unreferenced == 0
    store.pool.assert_no_leaks()
    store.pool.check_invariants()
