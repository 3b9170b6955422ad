"""A late router's view of an engine's prefix cache: ``KvEventLog.snapshot`` (the engine's
holdings as of its next event id) loaded with ``PrefixIndex.load_snapshot``, then the events
after it, must equal the view of a router that applied every event from the engine's start.
Checked against the reference engine (hybrid tiny model, block reuse on, with and without LRU
eviction) on a multi-turn conversation, and on hand-made logs for the edge cases."""

from __future__ import annotations

import pytest

from tests.builders import caching_engine_and_conversation
from tests.conftest import EngineFactory
from trtllm_prfaas.engines.prefix_cache import cache_key_for
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.kv.events import KvEventLog, KvSnapshot
from trtllm_prfaas.kv.hashing import CacheKey
from trtllm_prfaas.router.prefix_index import PrefixIndex

KEY = CacheKey("m", "HND", "float16", 0)


def _chains(snapshot: KvSnapshot) -> list[tuple[int | None, list[int]]]:
    return [(s.parent_hash, [b.block_hash for b in s.blocks]) for s in snapshot.stored]


def test_snapshot_lists_reachable_chains_parent_first_with_states() -> None:
    log = KvEventLog(max_events=100)
    log.record_created(64)
    log.record_stored(None, [1, 2, 3], 16)
    log.record_stored(2, [4, 5], 16)  # a branch off block 2
    log.record_stored(3, [6], 16)  # the trunk goes on
    log.record_state_stored(3, 48)
    log.record_state_stored(5, 64)
    log.record_removed(5)
    log.record_state_removed(5)
    snapshot = log.snapshot()
    assert _chains(snapshot) == [(None, [1, 2, 3, 6]), (2, [4])]
    assert [(s.block_hash, s.num_tokens) for s in snapshot.states] == [(3, 48)]
    assert snapshot.next_event_id == 8 and len(log) == 8  # the snapshot does not drain
    log.record_removed(1)  # the root: nothing below it can be matched any more
    assert _chains(log.snapshot()) == []
    log.record_created(64)  # a restarted cache holds nothing
    log.record_stored(None, [9], 16)
    assert _chains(log.snapshot()) == [(None, [9])] and log.snapshot().states == []


def test_a_loaded_snapshot_replaces_the_view_and_sets_the_next_id() -> None:
    log = KvEventLog(max_events=100)
    log.record_stored(None, [1, 2], 16)
    index = PrefixIndex(KEY, 16)
    index.add_node("n", "c")
    index.apply("n", log.drain())
    log.record_removed(2)
    log.record_stored(1, [3], 16)
    late = PrefixIndex(KEY, 16)
    late.add_node("n", "c")
    late.apply("n", KvEventLog(max_events=4).drain())  # nothing yet
    index.apply("n", log.drain())
    late.load_snapshot("n", log.snapshot())
    log.record_stored(3, [4], 16)
    batch = log.drain()
    index.apply("n", batch)
    late.apply("n", batch)
    for hashes in ([1, 2], [1, 3, 4]):
        assert late.match("n", hashes, 0.0) == index.match("n", hashes, 0.0)
    stats = late.stats()
    assert stats.num_snapshots == 1 and stats.num_resyncs == 0
    assert stats.blocks_per_node == index.stats().blocks_per_node == {"n": 3}
    late.add_node("approx", "c", approximate=True)
    with pytest.raises(ConfigError, match="approximate"):
        late.load_snapshot("approx", log.snapshot())


@pytest.mark.parametrize("max_blocks", [1000, 12], ids=["roomy", "evicting"])
def test_a_late_index_agrees_with_one_that_saw_every_event(
    make_engine: EngineFactory, max_blocks: int
) -> None:
    """After every request, a new index loaded from the engine's snapshot (then fed the
    events after it, as the worker sends them) answers every prompt of the conversation as the
    index fed from the start does, and holds as many blocks."""
    model, engine, conv = caching_engine_and_conversation(make_engine, max_blocks)
    tpb = model.tokens_per_block
    trace = conv.trace(tpb, cache_key_for(model))
    assert trace.prompt_hashes is not None
    chains = list(trace.prompt_hashes)

    def new_index() -> PrefixIndex:
        index = PrefixIndex(cache_key_for(model), tpb, requires_states=True)
        index.add_node("engine", "pd")
        return index

    full, lates = new_index(), list[PrefixIndex]()
    for prompt in conv.prompts:
        engine.generate([prompt.tolist()], SamplingParams(max_tokens=2, ignore_eos=True))
        batch = engine.drain_kv_events()
        for index in (full, *lates):
            index.apply("engine", batch)
        late = new_index()  # a router that joins now: the snapshot right after the drain
        late.load_snapshot("engine", engine.kv_events_snapshot())
        lates.append(late)
        for index in lates:
            for chain in chains:
                assert index.match("engine", chain, 0.0) == full.match("engine", chain, 0.0)
            stats = index.stats()
            assert stats.blocks_per_node == full.stats().blocks_per_node
            assert stats.num_resyncs == 0
    assert sum(full.match("engine", c, 0.0).num_blocks > 0 for c in chains) >= 3
    assert (engine.blocks.num_evictions > 0) == (max_blocks < 100)
