"""Decode-side placement of received items: chunk by chunk from their frames, or assembled; blocks
below ``num_computed_tokens // tokens_per_block`` (reused on the device) are never written."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from trtllm_prfaas.connector.base import RecurrentStates
from trtllm_prfaas.connector.device import backend_for
from trtllm_prfaas.connector.prfaas import PrfaasConnectorWorker
from trtllm_prfaas.connector.prfaas_meta import LoadPlan
from trtllm_prfaas.transport import ItemKey, Kind

ROW = 8  # num_kv_heads * tokens_per_block * head_dim of this toy pool
BLOCK_BYTES = 2 * ROW * 4  # (kv_factor, row) float32 of one block in one layer


@dataclass
class FakeItem:
    """A received item as the connector sees it; ``assemble`` says whether ``buffer`` may be
    read (the assembled copy the chunk-wise path avoids)."""

    key: ItemKey
    payload: bytes
    chunk_bytes: int
    assemble: bool

    @property
    def nbytes(self) -> int:
        return len(self.payload)

    @property
    def chunks(self) -> tuple[tuple[int, memoryview], ...]:
        view = memoryview(bytearray(self.payload))
        step = self.chunk_bytes
        return tuple((o, view[o : o + step]) for o in range(0, len(self.payload), step))

    @property
    def buffer(self) -> memoryview:
        if not self.assemble:
            raise AssertionError("the chunk-wise path must not assemble the item")
        return memoryview(bytearray(self.payload))


def _worker() -> PrfaasConnectorWorker:
    worker = PrfaasConnectorWorker.__new__(PrfaasConnectorWorker)  # no runtime needed here
    worker.register_kv_caches(torch.zeros(16, 2, 2, ROW))  # (blocks, full layers, 2, row)
    states = torch.zeros(1, 1, 1, 1, 1)
    worker.states = RecurrentStates(states, lambda rid: 0, {0: 0}, {1: 0, 2: 1})
    return worker


@pytest.mark.parametrize(
    ("chunk_bytes", "assemble"),
    [(BLOCK_BYTES, False), (3 * BLOCK_BYTES, False), (BLOCK_BYTES + 8, True), (5000, True)],
    ids=["one-block-chunks", "three-block-chunks", "misaligned", "one-chunk"],
)
@pytest.mark.parametrize("skip_blocks", [0, 3], ids=["cold", "warm-prefix"])
def test_blocks_land_in_the_planned_pool_rows(
    chunk_bytes: int, assemble: bool, skip_blocks: int
) -> None:
    worker = _worker()
    blocks = torch.arange(7 * 2 * ROW, dtype=torch.float32).view(7, 2, ROW) + 1
    device_blocks = [9, 4, 11, 0, 2, 15, 7, 5]
    plan = LoadPlan(3, "t", [1, 2, 3], skip_blocks, device_blocks)
    key = ItemKey("t", layer=2, item_index=0, kind=Kind.FULL_BLOCK, block_start=1, block_end=8)
    item = FakeItem(key, blocks.numpy().tobytes(), chunk_bytes, assemble)
    landings = worker._place(plan, 2, item, None)  # type: ignore[arg-type]
    assert all(landing.event.query() for landing in landings)  # host pool: synchronous
    pool = worker.kv_pool
    written = range(max(1, skip_blocks), 8)
    for k in written:
        assert torch.equal(pool[device_blocks[k], 1], blocks[k - 1])  # layer 2 = pool layer 1
    untouched = [b for b in range(16) if b not in [device_blocks[k] for k in written]]
    assert not pool[untouched].any() and not pool[:, 0].any()


def test_host_backend_copies_runs_of_consecutive_blocks() -> None:
    pool = torch.arange(10 * 2 * 2 * ROW, dtype=torch.float32).view(10, 2, 2, ROW)
    backend = backend_for(pool)
    staged = backend.stage_blocks(pool, 1, [3, 4, 5, 8, 0], None)
    assert staged.event.query() and torch.equal(staged.host, pool[[3, 4, 5, 8, 0], 1])
    rows = staged.host.clone() * -1
    landing = backend.write_blocks(pool, 0, [7, 8, 9, 1, 2], rows, None)
    assert landing.event.query() and torch.equal(pool[[7, 8, 9, 1, 2], 0], rows)
