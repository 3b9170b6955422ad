"""The reference engine's prefix cache (block reuse): tokens served from cached KV equal a cold
single-engine run (greedy and seeded sampling, multi-turn, concurrent requests sharing a
prefix, hybrid and full-attention-only models), the last prompt token is always computed,
cached blocks are evictable and never leaks, and stored/removed KV cache events are recorded.
Every engine here is leak-checked by ``make_engine``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.builders import tiny_model
from tests.conftest import EngineFactory
from tests.connector.fakes import CallLog, RecordingScheduler, RecordingWorker
from trtllm_prfaas.connector.base import ConnectorPair
from trtllm_prfaas.engines.base import SupportsKvEvents
from trtllm_prfaas.engines.engine import ReferenceEngine
from trtllm_prfaas.engines.prefix_cache import cache_key_for
from trtllm_prfaas.engines.request import RequestOutput, SamplingParams
from trtllm_prfaas.errors import ConfigError, ConnectorError
from trtllm_prfaas.kv.events import (
    KvCacheCreated,
    KvCacheRemoved,
    KvCacheStored,
    KvStateRemoved,
    KvStateStored,
)
from trtllm_prfaas.kv.hashing import block_hashes

TPB = 16  # tiny_model's tokens_per_block
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=8, temperature=0.9, seed=11, ignore_eos=True)


def _tokens(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=gen).tolist()


def _cold(make_engine: EngineFactory, prompts: list[list[int]], sampling: SamplingParams,
          **config: object) -> list[list[int]]:  # fmt: skip
    """Each prompt alone on a fresh engine without block reuse: the reference tokens."""
    return [make_engine(**config).generate([p], sampling)[0] for p in prompts]


def _stored_hashes(engine: ReferenceEngine) -> list[int]:
    batch = engine.drain_kv_events()
    return [b.block_hash for e in batch.events if isinstance(e.data, KvCacheStored)
            for b in e.data.blocks]  # fmt: skip


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("pattern", ["LLLF", "F"], ids=["hybrid", "full-attention"])
def test_repeat_prompt_reuses_blocks_and_equals_cold(
    make_engine: EngineFactory, sampling: SamplingParams, pattern: str
) -> None:
    model = tiny_model(layer_pattern=pattern)
    prompt = _tokens(5 * TPB + 7, seed=1)
    (cold,) = _cold(make_engine, [prompt], sampling, model=model)
    engine = make_engine(model=model, enable_block_reuse=True)
    first = engine.generate([prompt], sampling)[0]
    computed = engine.stats.num_prompt_tokens_computed
    second = engine.generate([prompt], sampling)[0]
    assert first == cold and second == cold
    # 5 full blocks of the first L-1 tokens are reused; the 7-token tail is computed again.
    assert engine.stats.num_reused_tokens == 5 * TPB
    assert engine.stats.num_prompt_tokens_computed - computed == 7
    assert engine.stats.num_prefix_queries == 2 and engine.stats.num_prefix_hits == 1


def test_block_aligned_prompt_cached_whole_still_computes_its_last_block(
    make_engine: EngineFactory,
) -> None:
    """As TensorRT-LLM's addSequence: only blocks of the first L-1 tokens can match, so a
    prompt of exactly k blocks reuses k-1 and computes the last block (its logits)."""
    prompt = _tokens(4 * TPB, seed=2)
    (cold,) = _cold(make_engine, [prompt], GREEDY)
    engine = make_engine(enable_block_reuse=True)
    engine.generate([prompt], GREEDY)
    before = engine.stats.num_prompt_tokens_computed
    assert engine.generate([prompt], GREEDY)[0] == cold
    assert engine.stats.num_prompt_tokens_computed - before == TPB
    assert engine.stats.num_reused_tokens == 3 * TPB


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_multi_turn_conversation_equals_cold(
    make_engine: EngineFactory, sampling: SamplingParams
) -> None:
    """Each turn's prompt is the whole history (earlier prompts, replies, a new message); a
    hybrid model resumes at the previous prompt's last block boundary (its snapshot)."""
    engine = make_engine(enable_block_reuse=True, chunk_size=64, max_num_tokens=128)
    history: list[int] = _tokens(3 * TPB + 5, seed=3)
    computed_total = prompt_total = 0
    for turn in range(4):
        (cold,) = _cold(make_engine, [history], sampling, chunk_size=64, max_num_tokens=128)
        before = engine.stats.num_prompt_tokens_computed
        reply = engine.generate([history], sampling)[0]
        assert reply == cold, f"turn {turn}"
        computed_total += engine.stats.num_prompt_tokens_computed - before
        prompt_total += len(history)
        if turn:  # everything up to the previous prompt's last full block was reused
            assert engine.stats.num_prompt_tokens_computed - before < len(history) // 2
        history = history + reply + _tokens(TPB + 3, seed=10 + turn)
    assert engine.stats.num_prefix_hits == 3
    assert computed_total + engine.stats.num_reused_tokens == prompt_total


def test_concurrent_requests_sharing_a_prefix_equal_cold(make_engine: EngineFactory) -> None:
    shared = _tokens(4 * TPB, seed=4)
    prompts = [shared + _tokens(9 + i, seed=20 + i) for i in range(4)]
    cold = _cold(make_engine, prompts, SEEDED)
    engine = make_engine(enable_block_reuse=True)
    engine.generate([prompts[0]], SEEDED)  # warm the shared prefix
    assert engine.generate(prompts, SEEDED) == cold  # admitted together, all share it
    assert engine.stats.num_reused_tokens == 4 * 4 * TPB
    assert engine.generate(prompts, SEEDED) == cold  # now each also has its own tail blocks


def test_concurrent_cold_requests_with_one_prefix_do_not_share_unfinished_blocks(
    make_engine: EngineFactory,
) -> None:
    """Two requests admitted together compute the same prefix each (neither is committed
    yet); both commit, the second as a private copy freed on release, none leaks."""
    shared = _tokens(3 * TPB, seed=5)
    prompts = [[*shared, 1, 2, 3], [*shared, 4, 5, 6]]
    cold = _cold(make_engine, prompts, GREEDY)
    engine = make_engine(enable_block_reuse=True)
    assert engine.generate(prompts, GREEDY) == cold
    assert engine.stats.num_reused_tokens == 0
    assert engine.blocks.num_cached == 3  # one copy of the shared chain stays cached


def test_cached_blocks_are_evictable_and_eviction_is_reported(make_engine: EngineFactory) -> None:
    """A pool full of cached blocks still admits new work (LRU eviction), and each evicted
    block is reported removed."""
    engine = make_engine(enable_block_reuse=True, num_blocks=12)
    first = _tokens(8 * TPB + 1, seed=6)
    engine.generate([first], GREEDY)
    assert engine.blocks.num_cached == 8 and engine.blocks.num_available == 12
    stored = _stored_hashes(engine)
    assert stored == block_hashes(first, TPB, cache_key_for(engine.cfg))[:8]
    other = _tokens(9 * TPB, seed=7)
    (cold,) = _cold(make_engine, [other], GREEDY, num_blocks=12)
    assert engine.generate([other], GREEDY)[0] == cold
    removed = [h for e in engine.drain_kv_events().events if isinstance(e.data, KvCacheRemoved)
               for h in e.data.block_hashes]  # fmt: skip
    assert engine.stats.num_block_evictions == len(removed) > 0
    assert set(removed) <= set(stored)
    # The tail of a chain is evicted before its head (released tail first).
    assert removed == stored[::-1][: len(removed)]


def test_max_cached_blocks_bounds_the_cache(make_engine: EngineFactory) -> None:
    engine = make_engine(enable_block_reuse=True, max_cached_blocks=3)
    engine.generate([_tokens(6 * TPB + 2, seed=8)], GREEDY)
    assert engine.blocks.num_cached == 3 and engine.stats.num_block_evictions == 3
    assert engine.blocks.num_available == engine.config.num_blocks


def test_kv_events_shape_and_overflow(make_engine: EngineFactory) -> None:
    engine = make_engine(
        model=tiny_model(layer_pattern="F"), enable_block_reuse=True, max_kv_events=2,
        chunk_size=32,
    )  # fmt: skip
    prompt = _tokens(6 * TPB + 3, seed=9)
    engine.generate([prompt], GREEDY)
    batch = engine.drain_kv_events()
    # created + three chunks' stored chains (32 + 32 + 32 tokens) = 4 events, 2 kept.
    assert batch.dropped == 2 and engine.stats.num_kv_events_dropped == 2
    assert [e.event_id for e in batch.events] == [2, 3]
    hashes = block_hashes(prompt, TPB, cache_key_for(engine.cfg))
    last = batch.events[-1]
    assert isinstance(last.data, KvCacheStored)
    assert last.data.parent_hash == hashes[3]
    assert [b.block_hash for b in last.data.blocks] == hashes[4:6]
    as_dict = last.to_trtllm_dict()
    assert as_dict["data"]["type"] == "stored" and as_dict["event_id"] == 3
    assert as_dict["data"]["blocks"][0]["block_hash"] == hashes[4]
    assert engine.drain_kv_events().events == []


def test_created_event_and_no_events_without_reuse(make_engine: EngineFactory) -> None:
    on = make_engine(enable_block_reuse=True)
    assert isinstance(on, SupportsKvEvents)
    assert isinstance(on.drain_kv_events().events[0].data, KvCacheCreated)
    off = make_engine()
    off.generate([_tokens(3 * TPB, seed=1)], GREEDY)
    assert off.drain_kv_events().events == [] and off.blocks.num_cached == 0


def test_aborted_request_leaves_only_named_blocks_cached(make_engine: EngineFactory) -> None:
    engine = make_engine(enable_block_reuse=True, chunk_size=32)
    prompt = _tokens(5 * TPB, seed=12)
    rid = engine.add_request(prompt, GREEDY)
    engine.step()  # first chunk: 2 blocks named
    out = engine.abort(rid)
    assert isinstance(out, RequestOutput) and out.finish_reason == "aborted"
    assert engine.blocks.num_cached == 2
    (cold,) = _cold(make_engine, [prompt], GREEDY, chunk_size=32)
    assert engine.generate([prompt], GREEDY)[0] == cold
    assert engine.stats.num_reused_tokens == 2 * TPB


def test_finishing_output_reports_cached_tokens(make_engine: EngineFactory) -> None:
    """What the worker reports per request (hit rate per node): reused prompt tokens."""
    engine = make_engine(enable_block_reuse=True, chunk_size=32)
    prompt = _tokens(2 * TPB + 1, seed=18)
    finals = []
    for _ in range(2):
        engine.add_request(prompt, GREEDY)
        while engine.has_unfinished():
            finals += [o for o in engine.step() if o.finished]
    assert [o.num_cached_tokens for o in finals] == [0, 2 * TPB]


def test_snapshot_eviction_falls_back_to_an_earlier_or_no_match(
    make_engine: EngineFactory,
) -> None:
    """With one snapshot slot, a second prompt evicts the first's snapshot: the first prompt's
    blocks are still cached but unusable without a state, so it is computed again, exactly."""
    engine = make_engine(enable_block_reuse=True, num_state_snapshots=1, chunk_size=256,
                         max_num_tokens=256)  # fmt: skip
    a, b = _tokens(4 * TPB + 3, seed=13), _tokens(4 * TPB + 3, seed=14)
    (cold_a,) = _cold(make_engine, [a], GREEDY, chunk_size=256, max_num_tokens=256)
    engine.generate([a], GREEDY)
    engine.generate([b], GREEDY)
    assert engine.stats.num_snapshot_evictions == 1
    assert engine.generate([a], GREEDY)[0] == cold_a
    assert engine.stats.num_reused_tokens == 0


def test_config_validation() -> None:
    from trtllm_prfaas.engines.config import EngineConfig

    with pytest.raises(ConfigError, match="num_state_snapshots"):
        EngineConfig(model=tiny_model(), chunk_size=32, num_state_snapshots=-1)
    with pytest.raises(ConfigError, match="max_cached_blocks"):
        EngineConfig(model=tiny_model(), chunk_size=32, max_cached_blocks=-2)
    with pytest.raises(ConfigError, match="max_kv_events"):
        EngineConfig(model=tiny_model(), chunk_size=32, max_kv_events=0)


class _GreedyClaimer(RecordingScheduler):
    """Records ``num_computed_tokens``; claims all but the last token when told to (too much
    once the engine has matched a prefix itself: upstream's 'at least one uncomputed token')."""

    claim_all = False

    def __init__(self, llm_args: Any, log: CallLog, pin_saves: bool = False) -> None:
        super().__init__(llm_args, log, pin_saves)
        self.seen: list[int] = []

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        super().get_num_new_matched_tokens(request, num_computed_tokens)
        self.seen.append(num_computed_tokens)
        return (request.prompt_len - 1 if self.claim_all else 0), False


def _claimer(pin_saves: bool = False) -> tuple[ConnectorPair, _GreedyClaimer]:
    log = CallLog()
    args = ReferenceEngine.llm_args_for(tiny_model())
    scheduler = _GreedyClaimer(args, log, pin_saves)
    return ConnectorPair(scheduler, RecordingWorker(args, log)), scheduler


def test_connector_sees_the_cached_prefix_as_computed(make_engine: EngineFactory) -> None:
    """As TensorRT-LLM: the connector is asked after the engine's own reuse, with the reused
    count; a new request's computed_position includes it and its new_block_ids include the
    shared blocks. A claim on top that leaves no token to compute fails the request only."""
    pair, scheduler = _claimer(pin_saves=True)
    engine = make_engine(connector=pair, enable_block_reuse=True)
    prompt = _tokens(3 * TPB + 4, seed=15)
    engine.generate([prompt], GREEDY)
    assert engine.blocks.num_cached == 3  # released after the pinned save, then cached
    engine.generate([prompt], GREEDY)
    assert scheduler.seen == [0, 3 * TPB]
    first_of_second = [o for o in scheduler.outputs if o.new_requests][-1].new_requests[0]
    assert first_of_second.computed_position == 3 * TPB
    assert len(first_of_second.new_block_ids) == 4  # 3 shared + the tail block
    scheduler.claim_all = True
    rid = engine.add_request(prompt, GREEDY)
    outputs = engine.step()
    assert outputs[0].request_id == rid and outputs[0].finish_reason == "error"
    assert isinstance(outputs[0].error, ConnectorError)
    assert "after 48 cached" in str(outputs[0].error)
    assert engine.blocks.num_cached == 3  # the refused request's references were given back


def test_state_snapshot_events(make_engine: EngineFactory) -> None:
    """A hybrid engine reports each snapshot it keeps, by the hash of the block it ends at,
    and each it evicts."""
    engine = make_engine(enable_block_reuse=True, chunk_size=32, num_state_snapshots=2)
    prompt = _tokens(4 * TPB + 3, seed=16)
    engine.generate([prompt], GREEDY)
    hashes = block_hashes(prompt, TPB, cache_key_for(engine.cfg))
    events = [e.data for e in engine.drain_kv_events().events]
    stored = [(d.block_hash, d.num_tokens) for d in events if isinstance(d, KvStateStored)]
    removed = [h for d in events if isinstance(d, KvStateRemoved) for h in d.block_hashes]
    # chunk ends at 32 and 64 tokens (block aligned); the prompt's last boundary is 64 too
    assert stored == [(hashes[1], 2 * TPB), (hashes[3], 4 * TPB)]
    assert removed == []
    engine.generate([_tokens(2 * TPB + 3, seed=17)], GREEDY)
    events = [e.data for e in engine.drain_kv_events().events]
    removed = [h for d in events if isinstance(d, KvStateRemoved) for h in d.block_hashes]
    assert removed == [hashes[1]] and engine.stats.num_snapshot_evictions == 1


def test_a_chunk_off_the_block_grid_is_not_cached(make_engine: EngineFactory) -> None:
    """A claim of exactly L-1 tokens (the handoff's decode) leaves the last token to compute
    alone, off the block grid: not bit-identical to a prefill, so the block it completes and
    the state after it are not cached; the claimed blocks below it are."""
    pair, scheduler = _claimer()
    scheduler.claim_all = True
    engine = make_engine(connector=pair, enable_block_reuse=True)
    prompt = _tokens(3 * TPB, seed=19)  # the last token completes block 2
    engine.generate([prompt], GREEDY)
    assert engine.blocks.num_cached == 2
    events = [e.data for e in engine.drain_kv_events().events]
    assert not [d for d in events if isinstance(d, KvStateStored)]


@pytest.mark.parametrize("pattern", ["LLLF", "F"], ids=["hybrid", "full-attention"])
def test_a_pinned_prefix_survives_eviction_until_unpinned(
    make_engine: EngineFactory, pattern: str
) -> None:
    """``pin_prefix`` (a decode slot's reservation) holds a cached prefix, matched as admission
    matches it, so other prompts cannot evict it before its request comes; ``unpin_prefix``
    gives it back (idempotent). The fixture checks that nothing is left referenced."""
    model = tiny_model(layer_pattern=pattern)
    engine = make_engine(model=model, enable_block_reuse=True, max_cached_blocks=6)
    mine, other = _tokens(6 * TPB + 5, seed=21), _tokens(6 * TPB + 5, seed=22)
    (cold,) = _cold(make_engine, [mine], GREEDY, model=model)
    engine.generate([mine], GREEDY)
    hashes = block_hashes(mine[:-1], TPB, cache_key_for(model))
    pin_id, num_tokens = engine.pin_prefix(hashes)
    assert pin_id and num_tokens == 6 * TPB
    assert engine.pin_prefix([1, 2, 3]) == (0, 0)  # nothing held: no pin
    engine.generate([other], GREEDY)  # its 6 blocks take the cache's room
    reused = engine.stats.num_reused_tokens
    assert engine.generate([mine], GREEDY)[0] == cold
    assert engine.stats.num_reused_tokens - reused == 6 * TPB  # the pinned prefix, all of it
    assert any("prefix pins" in problem for problem in engine.leak_report())
    engine.unpin_prefix(pin_id)
    engine.unpin_prefix(pin_id)
    engine.generate([other], GREEDY)
    assert engine.pin_prefix(hashes) == (0, 0)  # evicted once unpinned


def test_a_relayed_snapshot_off_the_block_grid_is_refused(make_engine: EngineFactory) -> None:
    engine = make_engine(enable_block_reuse=True)
    assert engine.prefix_cache is not None
    engine.add_request(_tokens(3 * TPB, seed=5), GREEDY, request_id=7)
    req = engine.waiting[0]
    state = torch.zeros(engine.states.shape[1:])
    assert not engine.prefix_cache.store_relayed_snapshot(req, TPB + 1, state)  # off the grid
    assert not engine.prefix_cache.store_relayed_snapshot(req, 4 * TPB, state)  # past the prompt
    assert not engine.prefix_cache.store_relayed_snapshot(req, TPB, state[:1])  # wrong shape
    assert engine.prefix_cache.store_relayed_snapshot(req, 2 * TPB, state)
    engine.abort(7)
