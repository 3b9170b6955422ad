from __future__ import annotations

import pytest
import torch

from tests.kv.conftest import PoolFactory
from trtllm_prfaas.errors import AdmissionRejected, ConfigError
from trtllm_prfaas.kv import HybridPrefixCachePool, KVSpec


def fill_prefix(pool: HybridPrefixCachePool, hashes: list[int]) -> list[int]:
    """Allocate, write (byte = hash % 256) and commit one block per hash; caller holds refs."""
    block_ids = pool.allocate_prefix_blocks(hashes)
    for block_id, block_hash in zip(block_ids, hashes, strict=True):
        pool.block_view(block_id).fill_(block_hash % 256)
        assert pool.commit_prefix_block(block_id)
    return block_ids


def test_storage_shapes_and_zero_copy_views(make_pool: PoolFactory) -> None:
    pool = make_pool(num_blocks=4, block_bytes=32, num_state_slots=2, state_bytes=12)
    assert pool.blocks.shape == (4, 32) and pool.blocks.dtype == torch.uint8
    assert pool.states.shape == (2, 12)
    [block_id] = pool.allocate_transfer_blocks("t", 1)
    view = pool.block_view(block_id)
    assert view.shape == (32,) and view.data_ptr() == pool.blocks[block_id].data_ptr()
    view.copy_(torch.arange(32, dtype=torch.uint8))
    assert pool.blocks[block_id].tolist() == list(range(32))
    slot = pool.put_state(9, 5)
    pool.state_view(slot).fill_(3)
    assert pool.states[slot].tolist() == [3] * 12
    pool.release_state(slot)
    pool.drop_transfer("t")


def test_views_of_unheld_rows_are_refused(make_pool: PoolFactory) -> None:
    pool = make_pool()
    with pytest.raises(ValueError, match="block 0"):
        pool.block_view(0)
    with pytest.raises(ValueError, match="state slot 0"):
        pool.state_view(0)


def test_from_spec_sizes_rows() -> None:
    spec = KVSpec(
        num_full_layers=2, num_kv_heads=1, head_dim=4, tokens_per_block=8, dtype_bytes=2,
        state_bytes=40,
    )  # fmt: skip
    pool = HybridPrefixCachePool.from_spec(spec, num_blocks=3, num_state_slots=2)
    assert pool.blocks.shape == (3, spec.block_bytes)
    assert pool.states.shape == (2, 40)
    pool.assert_no_leaks()


@pytest.mark.parametrize("field", ["num_blocks", "block_bytes", "num_state_slots", "state_bytes"])
def test_config_validation(make_pool: PoolFactory, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        make_pool(**{field: -1})


def test_match_reuses_committed_blocks(make_pool: PoolFactory) -> None:
    pool = make_pool()
    first = fill_prefix(pool, [11, 12, 13])
    pool.release(first)
    assert pool.stats().num_cached_unreferenced == 3
    assert pool.num_cached_prefix_blocks([11, 12, 99, 13]) == 2
    hit = pool.match_prefix([11, 12, 99, 13])
    assert hit == first[:2]
    assert [pool.block_view(b)[0].item() for b in hit] == [11, 12]
    stats = pool.stats()
    assert (stats.num_referenced, stats.num_cached_unreferenced) == (2, 1)
    pool.release(hit)


def test_shared_blocks_are_refcounted(make_pool: PoolFactory) -> None:
    pool = make_pool()
    mine = fill_prefix(pool, [1, 2])
    theirs = pool.match_prefix([1, 2])
    assert theirs == mine
    pool.release(mine)
    assert pool.stats().num_referenced == 2  # still held by the second request
    pool.release(theirs)
    assert pool.stats().num_cached_unreferenced == 2


def test_pending_blocks_are_not_matchable(make_pool: PoolFactory) -> None:
    pool = make_pool()
    [block_id] = pool.allocate_prefix_blocks([5])
    assert pool.match_prefix([5]) == []
    pool.commit_prefix_block(block_id)
    assert pool.match_prefix([5]) == [block_id]
    pool.release([block_id, block_id])


def test_released_pending_block_is_freed_not_cached(make_pool: PoolFactory) -> None:
    pool = make_pool()
    block_id = pool.allocate_prefix_block(5)
    pool.release([block_id])  # prefill aborted before the bytes were written
    assert pool.stats().num_free == pool.num_blocks
    assert pool.match_prefix([5]) == []
    with pytest.raises(ValueError, match="not pending"):
        pool.commit_prefix_block(block_id)


def test_duplicate_commit_keeps_first_and_frees_copy(make_pool: PoolFactory) -> None:
    pool = make_pool()
    a = pool.allocate_prefix_block(7)
    b = pool.allocate_prefix_block(7)  # two requests computed the same block concurrently
    assert pool.commit_prefix_block(a)
    assert not pool.commit_prefix_block(b)
    pool.release([a, b])
    stats = pool.stats()
    assert (stats.num_cached_unreferenced, stats.num_free) == (1, pool.num_blocks - 1)
    assert pool.match_prefix([7]) == [a]
    pool.release([a])


def test_double_release_is_a_caller_bug(make_pool: PoolFactory) -> None:
    pool = make_pool()
    ids = fill_prefix(pool, [1])
    pool.release(ids)
    with pytest.raises(ValueError, match="double release"):
        pool.release(ids)


def test_lru_eviction_order(make_pool: PoolFactory) -> None:
    pool = make_pool(num_blocks=4)
    pool.release(fill_prefix(pool, [1, 2]))  # chain A: released tail first, so 2 is older than 1
    pool.release(fill_prefix(pool, [3, 4]))
    pool.release(pool.match_prefix([1]))  # touch 1: now most recently used
    order, held = [], []
    for new_hash in (10, 11, 12, 13):
        before = {h for h in (1, 2, 3, 4) if pool.num_cached_prefix_blocks([h])}
        held.append(pool.allocate_prefix_block(new_hash))
        after = {h for h in (1, 2, 3, 4) if pool.num_cached_prefix_blocks([h])}
        order += sorted(before - after)
    assert order == [2, 4, 3, 1]
    assert pool.stats().num_block_evictions == 4
    pool.release(held)


def test_referenced_blocks_are_never_evicted(make_pool: PoolFactory) -> None:
    pool = make_pool(num_blocks=3)
    held = fill_prefix(pool, [1, 2])
    pool.release(fill_prefix(pool, [3]))
    new = pool.allocate_prefix_block(4)  # must evict 3, the only unreferenced block
    assert pool.num_cached_prefix_blocks([1, 2]) == 2
    assert pool.num_cached_prefix_blocks([3]) == 0
    with pytest.raises(AdmissionRejected):
        pool.allocate_transfer_blocks("t", 1)
    pool.release([*held, new])


def test_exhaustion_rejects_with_numbers_and_changes_nothing(make_pool: PoolFactory) -> None:
    pool = make_pool(num_blocks=4)
    held = fill_prefix(pool, [1, 2])
    pool.release(fill_prefix(pool, [3]))
    before = pool.stats()
    with pytest.raises(AdmissionRejected, match=r"need 3, free 1, evictable 1"):
        pool.allocate_transfer_blocks("t", 3)
    with pytest.raises(AdmissionRejected, match=r"need 3, free 1, evictable 1"):
        pool.allocate_prefix_blocks([7, 8, 9])
    assert pool.stats() == before
    assert pool.can_allocate(2) and not pool.can_allocate(3)
    assert pool.num_available_blocks() == 2
    assert pool.transfer_blocks("t") == []
    pool.release(held)


def test_transfer_blocks_share_the_pool_and_drop_as_a_unit(make_pool: PoolFactory) -> None:
    pool = make_pool(num_blocks=6)
    prefix = fill_prefix(pool, [1, 2])
    tail = pool.allocate_transfer_blocks("req-1", 3)
    tail += pool.allocate_transfer_blocks("req-1", 1)  # appended to the same transfer
    assert set(tail).isdisjoint(prefix) and len(set(tail)) == 4
    assert pool.transfer_blocks("req-1") == tail
    stats = pool.stats()
    assert (stats.num_transfer, stats.num_transfers, stats.num_free) == (4, 1, 0)
    assert pool.leak_report().transfer_ids == ("req-1",)
    assert pool.drop_transfer("req-1") == 4
    assert pool.drop_transfer("req-1") == 0  # idempotent
    assert pool.stats().num_free == 4
    pool.release(prefix)


def test_transfer_blocks_are_never_matchable(make_pool: PoolFactory) -> None:
    pool = make_pool()
    pool.allocate_transfer_blocks(42, 2)
    assert pool.match_prefix([0, 1]) == []
    with pytest.raises(ValueError):
        pool.release(pool.transfer_blocks(42))
    pool.drop_transfer(42)


def test_state_reuse_requires_exact_length(make_pool: PoolFactory) -> None:
    pool = make_pool()
    slot = pool.put_state(0xABC, 64)
    pool.state_view(slot).fill_(9)
    assert pool.match_state(0xABC, 64) is None  # not committed yet
    assert pool.commit_state(slot)
    pool.release_state(slot)
    assert pool.match_state(0xABC, 63) is None
    assert pool.match_state(0xABC, 65) is None
    assert pool.match_state(0xABD, 64) is None
    hit = pool.match_state(0xABC, 64)
    assert hit == slot and pool.state_view(hit).tolist() == [9] * 8
    assert pool.stats().num_state_slots_used == 1
    pool.release_state(hit)


def test_state_slots_lru_and_refcount(make_pool: PoolFactory) -> None:
    pool = make_pool(num_state_slots=2)
    for key in (1, 2):
        slot = pool.put_state(key, 10)
        pool.commit_state(slot)
        pool.release_state(slot)
    held = pool.match_state(1, 10)  # 1 referenced, 2 cached
    assert held is not None
    pool.release_state(pool.put_state(3, 10))  # evicts 2; pending 3 is freed on release
    assert pool.match_state(2, 10) is None
    other = pool.put_state(4, 10)  # takes the free slot
    with pytest.raises(AdmissionRejected, match="state slot pool exhausted: need 1, free 0"):
        pool.put_state(5, 10)
    pool.release_state(held)
    pool.release_state(other)
    assert pool.stats().num_state_evictions == 1


def test_pool_without_state_slots_rejects_states(make_pool: PoolFactory) -> None:
    pool = make_pool(num_state_slots=0, state_bytes=0)
    assert pool.match_state(1, 1) is None
    with pytest.raises(AdmissionRejected):
        pool.put_state(1, 1)


def test_leak_report_names_what_is_held(make_pool: PoolFactory) -> None:
    pool = make_pool()
    ids = fill_prefix(pool, [1])
    pending = pool.allocate_prefix_block(2)
    pool.allocate_transfer_blocks("t9", 1)
    slot = pool.put_state(3, 4)
    report = pool.leak_report()
    assert report.referenced_blocks == (ids[0], pending)
    assert report.pending_blocks == (pending,)
    assert report.transfer_ids == ("t9",)
    assert report.referenced_state_slots == (slot,)
    with pytest.raises(AssertionError, match="t9"):
        pool.assert_no_leaks()
    pool.release([*ids, pending])
    pool.drop_transfer("t9")
    pool.release_state(slot)
    assert str(pool.leak_report()) == "no leaks"
