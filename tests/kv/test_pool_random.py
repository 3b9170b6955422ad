"""Random sequences of pool operations; invariants and byte integrity checked after every step."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from tests.kv.conftest import PoolFactory
from trtllm_prfaas.errors import AdmissionRejected
from trtllm_prfaas.kv import HybridPrefixCachePool


@dataclass
class Request:
    block_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    state_slot: int | None = None
    state_key: tuple[int, int] | None = None


@dataclass
class Model:
    """What the test holds, and what bytes each held row must contain."""

    requests: list[Request] = field(default_factory=list)
    transfers: dict[str, list[int]] = field(default_factory=dict)
    num_rejections: int = 0


def byte_of(value: int) -> int:
    return value * 37 % 251


def chain(rng: random.Random) -> list[int]:
    prompt = rng.randrange(6)  # few prompts, so prefixes are shared and reused
    return [prompt * 100 + i for i in range(rng.randint(1, 6))]


def start_request(pool: HybridPrefixCachePool, model: Model, rng: random.Random) -> None:
    hashes = chain(rng)
    hit = pool.match_prefix(hashes)
    assert len(hit) == pool.num_cached_prefix_blocks(hashes)
    try:
        new = pool.allocate_prefix_blocks(hashes[len(hit) :])
    except AdmissionRejected:
        pool.release(hit)
        model.num_rejections += 1
        return
    for block_id, block_hash in zip(new, hashes[len(hit) :], strict=True):
        pool.block_view(block_id).fill_(byte_of(block_hash))
        if rng.random() < 0.9:  # sometimes the prefill aborts before committing
            pool.commit_prefix_block(block_id)
    model.requests.append(Request(block_ids=hit + new, hashes=hashes))


def finish_request(pool: HybridPrefixCachePool, model: Model, rng: random.Random) -> None:
    if model.requests:
        request = model.requests.pop(rng.randrange(len(model.requests)))
        pool.release(request.block_ids)
        if request.state_slot is not None:
            pool.release_state(request.state_slot)


def start_transfer(pool: HybridPrefixCachePool, model: Model, rng: random.Random) -> None:
    transfer_id = f"t{rng.randrange(5)}"
    try:
        block_ids = pool.allocate_transfer_blocks(transfer_id, rng.randint(0, 4))
    except AdmissionRejected:
        model.num_rejections += 1
        return
    for block_id in block_ids:
        pool.block_view(block_id).fill_(byte_of(1000 + int(transfer_id[1:])))
    model.transfers.setdefault(transfer_id, []).extend(block_ids)


def drop_transfer(pool: HybridPrefixCachePool, model: Model, rng: random.Random) -> None:
    transfer_id = f"t{rng.randrange(5)}"
    freed = pool.drop_transfer(transfer_id)
    assert freed == len(model.transfers.pop(transfer_id, []))


def use_state(pool: HybridPrefixCachePool, model: Model, rng: random.Random) -> None:
    free = [r for r in model.requests if r.state_slot is None]
    if not free:
        return
    request = rng.choice(free)
    key = (request.hashes[0] // 100, rng.choice([16, 32]))
    slot = pool.match_state(*key)
    if slot is None:
        try:
            slot = pool.put_state(*key)
        except AdmissionRejected:
            model.num_rejections += 1
            return
        pool.state_view(slot).fill_(byte_of(key[0] * 7 + key[1]))
        pool.commit_state(slot)
    request.state_slot, request.state_key = slot, key


OPERATIONS = [start_request, finish_request, start_transfer, drop_transfer, use_state]


def check(pool: HybridPrefixCachePool, model: Model) -> None:
    pool.check_invariants()
    stats = pool.stats()
    held = {b for r in model.requests for b in r.block_ids}
    assert stats.num_referenced == len(held)
    assert stats.num_transfer == sum(len(ids) for ids in model.transfers.values())
    assert stats.num_transfers == len(model.transfers)
    total = stats.num_free + stats.num_cached_unreferenced + stats.num_referenced
    assert total + stats.num_transfer == stats.num_blocks
    for request in model.requests:  # nobody else overwrote a row we hold
        for block_id, block_hash in zip(request.block_ids, request.hashes, strict=True):
            assert pool.block_view(block_id)[0].item() == byte_of(block_hash)
        if request.state_key is not None and request.state_slot is not None:
            value = byte_of(request.state_key[0] * 7 + request.state_key[1])
            assert pool.state_view(request.state_slot)[-1].item() == value


@pytest.mark.parametrize("seed", range(8))
def test_random_operations_keep_invariants(make_pool: PoolFactory, seed: int) -> None:
    rng = random.Random(seed)
    pool = make_pool(num_blocks=16, block_bytes=4, num_state_slots=3, state_bytes=4)
    model = Model()
    for _ in range(400):
        rng.choice(OPERATIONS)(pool, model, rng)
        check(pool, model)
    assert model.num_rejections > 0  # the pool was driven into exhaustion at least once
    assert pool.stats().num_block_evictions > 0
    while model.requests:
        finish_request(pool, model, rng)
    for transfer_id in list(model.transfers):
        assert pool.drop_transfer(transfer_id) == len(model.transfers.pop(transfer_id))
    check(pool, model)
