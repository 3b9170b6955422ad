"""The global prefix index: per-node and per-cluster holdings from real engine KV cache events
(exact), resyncs on lost events, and the approximate mode fed from routing history with expiry."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import EngineFactory
from trtllm_prfaas.engines.prefix_cache import cache_key_for
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.kv.events import KvEventBatch, KvEventLog
from trtllm_prfaas.kv.hashing import CacheKey, block_hashes
from trtllm_prfaas.router.prefix_index import PrefixIndex

TPB = 16
KEY = CacheKey("m", "HND", "float32", 0)
ONE_TOKEN = SamplingParams(max_tokens=1, ignore_eos=True)


def _tokens(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=gen).tolist()


def _stored(log: KvEventLog, tokens: list[int], first: int, stop: int) -> None:
    hashes = block_hashes(tokens, TPB, KEY)
    log.record_stored(hashes[first - 1] if first else None, hashes[first:stop], TPB)


def test_index_follows_a_real_engine(make_engine: EngineFactory) -> None:
    """What the index says node 'a' holds is what the engine then reuses."""
    engine = make_engine(enable_block_reuse=True, num_blocks=20)
    index = PrefixIndex(cache_key_for(engine.cfg), TPB, requires_states=True)
    index.add_node("a", "pd")
    index.add_node("b", "pd")
    prompt = _tokens(6 * TPB + 5, seed=1)
    engine.generate([prompt], ONE_TOKEN)
    index.apply("a", engine.drain_kv_events())
    follow_up = prompt + _tokens(2 * TPB, seed=2)
    hashes = index.hashes_for(follow_up)
    held = index.match("a", hashes, now=0.0)
    assert (held.num_blocks, held.num_tokens, held.is_approximate) == (6, 6 * TPB, False)
    assert index.match("b", hashes, now=0.0).num_blocks == 0
    best = index.best_in_cluster("pd", hashes, now=0.0)
    assert best is not None and best.node_id == "a"
    reused = engine.stats.num_reused_tokens
    engine.generate([follow_up], ONE_TOKEN)
    assert engine.stats.num_reused_tokens - reused == held.num_tokens
    # Fill the pool with other prompts: evictions reach the index as removals.
    engine.generate([_tokens(15 * TPB, seed=3)], ONE_TOKEN)
    index.apply("a", engine.drain_kv_events())
    assert index.match("a", hashes, now=0.0).num_blocks < 6


def test_removal_cuts_the_chain_below_it() -> None:
    index, log = PrefixIndex(KEY, TPB), KvEventLog(100)
    index.add_node("n", "c")
    tokens = _tokens(10 * TPB, seed=4)
    _stored(log, tokens, 0, 4)
    _stored(log, tokens, 4, 10)
    hashes = block_hashes(tokens, TPB, KEY)
    log.record_removed(hashes[6])
    index.apply("n", log.drain())
    assert index.match("n", hashes, 0.0).num_blocks == 6
    assert index.stats().blocks_per_node == {"n": 6}


def test_orphan_chains_are_unreachable_until_their_parent_returns() -> None:
    index, log = PrefixIndex(KEY, TPB), KvEventLog(100)
    index.add_node("n", "c")
    tokens = _tokens(6 * TPB, seed=5)
    _stored(log, tokens, 3, 6)  # parent block 2 never stored here
    index.apply("n", log.drain())
    hashes = block_hashes(tokens, TPB, KEY)
    assert index.match("n", hashes, 0.0).num_blocks == 0
    assert index.stats().num_unreachable_blocks == 3
    _stored(log, tokens, 0, 6)
    index.apply("n", log.drain())
    assert index.match("n", hashes, 0.0).num_blocks == 6


def test_lost_events_clear_the_node_then_it_rebuilds() -> None:
    index, log = PrefixIndex(KEY, TPB), KvEventLog(2)
    index.add_node("n", "c")
    a, b = _tokens(4 * TPB, seed=6), _tokens(4 * TPB, seed=7)
    _stored(log, a, 0, 4)
    index.apply("n", log.drain())
    for seed in range(3):  # overflow: one event is dropped
        _stored(log, _tokens(TPB, seed=10 + seed), 0, 1)
    batch = log.drain()
    assert batch.dropped == 1
    index.apply("n", batch)
    assert index.stats().num_resyncs == 1
    assert index.match("n", block_hashes(a, TPB, KEY), 0.0).num_blocks == 0  # under-reports
    _stored(log, b, 0, 4)
    index.apply("n", log.drain())
    assert index.match("n", block_hashes(b, TPB, KEY), 0.0).num_blocks == 4
    # An id gap (a batch lost in transit) also resyncs.
    _stored(log, a, 0, 4)
    log.drain()
    _stored(log, a, 0, 4)
    index.apply("n", log.drain())
    assert index.stats().num_resyncs == 2


def test_created_event_forgets_a_restarted_engine() -> None:
    index, log = PrefixIndex(KEY, TPB), KvEventLog(10)
    index.add_node("n", "c")
    tokens = _tokens(3 * TPB, seed=8)
    _stored(log, tokens, 0, 3)
    log.record_created(64)
    index.apply("n", log.drain())
    assert index.match("n", block_hashes(tokens, TPB, KEY), 0.0).num_blocks == 0


def test_approximate_nodes_from_routing_history_expire() -> None:
    index = PrefixIndex(KEY, TPB, ttl_s=10.0, max_approx_blocks=8)
    index.add_node("triton", "pd", approximate=True)
    index.add_node("ref", "pd")
    prompt = _tokens(5 * TPB + 1, seed=9)
    hashes = index.hashes_for(prompt)
    index.record_routed("triton", hashes, now=100.0)
    held = index.match("triton", hashes, now=105.0)
    assert (held.num_blocks, held.is_approximate) == (5, True)
    best = index.best_in_cluster("pd", hashes, now=105.0)
    assert best is not None and best.node_id == "triton" and best.is_approximate
    assert index.match("triton", hashes, now=110.5).num_blocks == 0
    stats = index.stats()
    assert stats.num_approximate_lookups == 3 and stats.num_expired_blocks == 5
    with pytest.raises(ConfigError, match="approximate"):
        index.apply("triton", KvEventBatch([]))


def test_approximate_capacity_evicts_tails_first() -> None:
    index = PrefixIndex(KEY, TPB, ttl_s=10.0, max_approx_blocks=4)
    index.add_node("n", "c", approximate=True)
    hashes = block_hashes(_tokens(6 * TPB, seed=11), TPB, KEY)
    index.record_routed("n", hashes, now=0.0)
    assert index.match("n", hashes, now=1.0).num_blocks == 4


def test_unknown_node_and_bad_config() -> None:
    index = PrefixIndex(KEY, TPB)
    with pytest.raises(ConfigError, match="unknown node 'x'"):
        index.match("x", [], 0.0)
    assert index.best_in_cluster("nowhere", [], 0.0) is None
    with pytest.raises(ConfigError, match="tokens_per_block"):
        PrefixIndex(KEY, 0)


def test_hybrid_match_ends_at_a_reported_state_snapshot(make_engine: EngineFactory) -> None:
    """A prompt that shares 5 cached blocks with an earlier one, whose snapshots are at chunk
    ends (32, 64, 96 tokens): the engine can resume at 64 only, and so says the index."""
    engine = make_engine(enable_block_reuse=True, chunk_size=32)
    hybrid = PrefixIndex(cache_key_for(engine.cfg), TPB, requires_states=True)
    blocks_only = PrefixIndex(cache_key_for(engine.cfg), TPB)
    earlier = _tokens(6 * TPB + 5, seed=12)
    engine.generate([earlier], ONE_TOKEN)
    batch = engine.drain_kv_events()
    for index in (hybrid, blocks_only):
        index.add_node("a", "pd")
        index.apply("a", batch)
    probe = earlier[: 5 * TPB] + _tokens(3 * TPB, seed=13)
    assert blocks_only.match("a", blocks_only.hashes_for(probe), 0.0).num_tokens == 5 * TPB
    held = hybrid.match("a", hybrid.hashes_for(probe), 0.0)
    assert held.num_tokens == 4 * TPB
    engine.generate([probe], ONE_TOKEN)
    assert engine.stats.num_reused_tokens == held.num_tokens
