"""Decode-side placement of received items: chunk by chunk from their frames, or assembled."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from trtllm_prfaas.connector.base import RecurrentStates
from trtllm_prfaas.connector.prfaas import PrfaasConnectorWorker, _LoadPlan
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
    worker.kv_pool = torch.zeros(16, 2, 2, ROW)  # (num_blocks, num_full_layers, 2, row)
    states = torch.zeros(1, 1, 1, 1, 1)
    worker.states = RecurrentStates(states, lambda rid: 0, {0: 0}, {1: 0, 2: 1})
    return worker


@pytest.mark.parametrize(
    ("chunk_bytes", "assemble"),
    [(BLOCK_BYTES, False), (3 * BLOCK_BYTES, False), (BLOCK_BYTES + 8, True), (5000, True)],
    ids=["one-block-chunks", "three-block-chunks", "misaligned", "one-chunk"],
)
def test_blocks_land_in_the_planned_pool_rows(chunk_bytes: int, assemble: bool) -> None:
    worker = _worker()
    blocks = torch.arange(7 * 2 * ROW, dtype=torch.float32).view(7, 2, ROW) + 1
    plan = _LoadPlan(request_id=3, transfer_id="t", device_blocks=[9, 4, 11, 0, 2, 15, 7, 5])
    key = ItemKey("t", layer=2, item_index=0, kind=Kind.FULL_BLOCK, block_start=1, block_end=8)
    item = FakeItem(key, blocks.numpy().tobytes(), chunk_bytes, assemble)
    worker._place_item(plan, 2, item)  # type: ignore[arg-type]
    pool = worker.kv_pool
    assert pool is not None
    for k, block_id in enumerate(plan.device_blocks[1:8]):
        assert torch.equal(pool[block_id, 1], blocks[k])  # model layer 2 = pool layer 1
    untouched = [b for b in range(16) if b not in plan.device_blocks[1:8]]
    assert not pool[untouched].any() and not pool[:, 0].any()
