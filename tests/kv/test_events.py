"""KV cache events (TensorRT-LLM's shapes) and the slot-table operations block reuse needs:
naming a raw slot, evicting to a capacity bound, eviction callbacks."""

from __future__ import annotations

import msgspec
import pytest

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.kv.events import (
    KvCacheCreated,
    KvCacheRemoved,
    KvCacheStored,
    KvEventBatch,
    KvEventLog,
)
from trtllm_prfaas.kv.slots import SlotTable


def test_stored_removed_created_in_order_with_ids() -> None:
    log = KvEventLog(max_events=10, keep_tokens=True)
    log.record_created(64)
    log.record_stored(None, [11, 12], 2, [1, 2, 3, 4])
    log.record_removed(12)
    log.record_removed(11)  # joins the previous removal, as upstream batches them
    log.record_stored(11, [13], 2, [5, 6])
    batch = log.drain()
    assert [e.event_id for e in batch.events] == [0, 1, 2, 3] and batch.dropped == 0
    created, stored, removed, again = (e.data for e in batch.events)
    assert isinstance(created, KvCacheCreated) and created.num_blocks_per_cache_level == [64]
    assert isinstance(stored, KvCacheStored) and stored.parent_hash is None
    assert [(b.block_hash, b.tokens) for b in stored.blocks] == [(11, [1, 2]), (12, [3, 4])]
    assert isinstance(removed, KvCacheRemoved) and removed.block_hashes == [12, 11]
    assert isinstance(again, KvCacheStored) and again.parent_hash == 11
    assert log.drain() == KvEventBatch([], 0)


def test_tokens_are_left_out_unless_kept() -> None:
    log = KvEventLog(max_events=4)
    log.record_stored(None, [1], 2, [7, 8])
    (event,) = log.drain().events
    assert isinstance(event.data, KvCacheStored) and event.data.blocks[0].tokens == []


def test_overflow_drops_the_oldest_and_counts() -> None:
    log = KvEventLog(max_events=3)
    for i in range(5):
        log.record_stored(None, [i], 4)
    batch = log.drain()
    assert [e.event_id for e in batch.events] == [2, 3, 4]
    assert batch.dropped == 2 and log.num_dropped == 2 and log.num_recorded == 5
    log.record_stored(None, [9], 4)
    assert log.drain().dropped == 0  # counted once, in the batch that followed the loss


def test_trtllm_dict_shape() -> None:
    log = KvEventLog(max_events=4, keep_tokens=True)
    log.record_stored(5, [6], 1, [42])
    log.record_removed(6)
    stored, removed = (e.to_trtllm_dict() for e in log.drain().events)
    assert stored == {
        "event_id": 0,
        "window_size": 0,
        "data": {
            "type": "stored",
            "parent_hash": 5,
            "blocks": [
                {
                    "type": "stored_block",
                    "block_hash": 6,
                    "tokens": [{"type": "unique_token", "token_id": 42, "token_extra_id": 0}],
                    "cache_level": 0,
                    "priority": 35,
                }
            ],
        },
    }
    assert removed["data"] == {"type": "removed", "block_hashes": [6]}


def test_batch_round_trips_through_msgpack() -> None:
    """What the worker will publish over its control channel, and the router decode."""
    log = KvEventLog(max_events=8)
    log.record_created(8)
    log.record_stored(None, [2**64 - 1, 3], 16)
    log.record_removed(3)
    log.record_state_stored(2**64 - 1, 16)
    log.record_state_removed(2**64 - 1)
    log.record_state_removed(5)  # joins the previous state removal
    batch = log.drain()
    assert len(batch.events) == 5
    assert batch.events[-1].to_trtllm_dict()["data"] == {
        "type": "state_removed",
        "block_hashes": [2**64 - 1, 5],
    }
    wire = msgspec.msgpack.encode(batch)
    assert msgspec.msgpack.decode(wire, type=KvEventBatch) == batch


def test_bad_max_events() -> None:
    with pytest.raises(ConfigError, match="max_events"):
        KvEventLog(max_events=0)


def test_slot_table_key_raw_and_eviction_callback() -> None:
    evicted: list[str] = []
    table: SlotTable[str] = SlotTable(3, "block", on_evict=evicted.append)
    a, b, c = table.take_raw(3)
    assert table.key_raw(a, "A") and table.key_raw(b, "B")
    assert not table.key_raw(c, "A")  # "A" already named: c stays a private copy
    for slot in (a, b, c):
        table.release(slot)
    table.check_invariants()
    assert table.num_cached == 2 and table.num_free == 1
    assert table.acquire("A") == a
    table.release(a)  # now most recently used; B is the LRU one
    table.take_raw(2)  # the free one, then evict B
    assert evicted == ["B"] and table.num_evictions == 1
    with pytest.raises(ValueError, match="not raw"):
        table.key_raw(a, "X")
    table.check_invariants()


def test_slot_table_evict_one() -> None:
    evicted: list[int] = []
    table: SlotTable[int] = SlotTable(2, "block", on_evict=evicted.append)
    (slot,) = table.take_keyed([7])
    table.commit(slot)
    table.release(slot)
    assert table.evict_one() and evicted == [7] and table.num_free == 2
    assert not table.evict_one()
    table.check_invariants()


def test_block_hash_values_are_pinned() -> None:
    """Hashes cross processes (engine events, the router's index): their values must not
    change with an implementation change (this pins the original streaming xxh64 version)."""
    from trtllm_prfaas.kv.hashing import CacheKey, block_hashes

    key = CacheKey("m", "HND", "float32", 0)
    assert block_hashes(list(range(64)), 32, key) == [13124479954116406306, 5868160215432901579]
