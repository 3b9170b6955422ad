"""Builders for the kv tests; every pool built here is leak-checked when its test ends."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from trtllm_prfaas.kv import HybridPrefixCachePool

PoolFactory = Callable[..., HybridPrefixCachePool]


@pytest.fixture
def make_pool() -> Iterator[PoolFactory]:
    """``make_pool(num_blocks=8, block_bytes=16, num_state_slots=4, state_bytes=8)``.

    At teardown each pool must hold nothing (the test released and dropped everything) and its
    invariants must hold.
    """
    pools: list[HybridPrefixCachePool] = []

    def build(
        *,
        num_blocks: int = 8,
        block_bytes: int = 16,
        num_state_slots: int = 4,
        state_bytes: int = 8,
    ) -> HybridPrefixCachePool:
        pool = HybridPrefixCachePool(
            num_blocks=num_blocks,
            block_bytes=block_bytes,
            num_state_slots=num_state_slots,
            state_bytes=state_bytes,
        )
        pools.append(pool)
        return pool

    yield build
    for pool in pools:
        pool.check_invariants()
        pool.assert_no_leaks()
        stats = pool.stats()
        assert stats.num_referenced == stats.num_transfer == stats.num_state_slots_used == 0
