"""Index bookkeeping for one forward iteration of the reference model.

``ForwardBatch`` turns a list of ``SequenceChunk`` into the flat index tensors the layers need:
where each token's K/V goes in the pool, which rows share one attention call, and how tokens map
onto the zero-padded, block-aligned segments of the linear-attention recurrence. It computes
nothing numeric itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from trtllm_prfaas.engines.reference import ModelConfig

__all__ = ["ForwardBatch", "SegmentLayout", "SequenceChunk"]


@dataclass
class SequenceChunk:
    """The tokens of one request computed in one iteration.

    ``block_ids`` is the request's block table (it must cover ``start_pos + len(token_ids)``);
    ``state_slot`` indexes the recurrent-state tensor. Linear-attention segments are aligned to
    absolute multiples of ``tokens_per_block``, so a chunk that starts off a block boundary gives
    the same bits as another route only if every route starts it there (the engine guarantees
    this: chunks start at 0, at a block boundary, or are a single token).
    """

    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    state_slot: int
    positions: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.positions = torch.arange(self.start_pos, self.start_pos + len(self.token_ids))


class SegmentLayout:
    """Maps flat token rows onto S segments of length C (zero-padded), per chunk in order."""

    def __init__(self, chunks: list[SequenceChunk], length: int) -> None:
        seg_of_row: list[int] = []
        offset_of_row: list[int] = []
        first_slots: list[int] = []
        chain: list[bool] = []
        last_segment: list[int] = []
        for chunk in chunks:
            pos, end = chunk.start_pos, chunk.start_pos + len(chunk.token_ids)
            first = True
            while pos < end:
                seg_end = min(end, (pos // length + 1) * length)
                seg_of_row += [len(first_slots)] * (seg_end - pos)
                offset_of_row += list(range(seg_end - pos))
                first_slots.append(chunk.state_slot)
                chain.append(not first)
                first, pos = False, seg_end
            last_segment.append(len(first_slots) - 1)
        self.length = length
        self.num_segments = len(first_slots)
        self.seg_of_row = torch.tensor(seg_of_row, dtype=torch.int64)
        self.offset_of_row = torch.tensor(offset_of_row, dtype=torch.int64)
        self.first_slots = torch.tensor(first_slots, dtype=torch.int64)
        self.chain = torch.tensor(chain, dtype=torch.bool)
        self.last_segment = torch.tensor(last_segment, dtype=torch.int64)
        self.last_slots = torch.tensor([c.state_slot for c in chunks], dtype=torch.int64)

    def scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """(N, H, d) token rows -> (S, H, C, d), zeros where a segment is shorter than C."""
        out = rows.new_zeros((self.num_segments, self.length, *rows.shape[1:]))
        out[self.seg_of_row, self.offset_of_row] = rows
        return out.transpose(1, 2)

    def gather(self, segments: torch.Tensor) -> torch.Tensor:
        """(S, H, C, d) -> (N, H, d): the inverse of ``scatter`` on the real rows."""
        return segments.transpose(1, 2)[self.seg_of_row, self.offset_of_row]


class ForwardBatch:
    """Everything the layers index with during one iteration (built once, read by every layer)."""

    def __init__(
        self,
        cfg: ModelConfig,
        chunks: list[SequenceChunk],
        pool: torch.Tensor,
        states: torch.Tensor,
        rope_cos: torch.Tensor,
        rope_sin: torch.Tensor,
    ) -> None:
        self.cfg, self.chunks, self.pool, self.states = cfg, chunks, pool, states
        self.token_ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.int64)
        positions = torch.cat([c.positions for c in chunks])
        self.cos, self.sin = rope_cos[positions], rope_sin[positions]
        tpb = cfg.tokens_per_block
        table_of_row = [c.block_ids for c in chunks for _ in c.token_ids]
        self.slot_blocks = torch.tensor(
            [table[p // tpb] for table, p in zip(table_of_row, positions.tolist(), strict=True)],
            dtype=torch.int64,
        )
        self.slot_offsets = positions % tpb
        lengths = [len(c.token_ids) for c in chunks]
        ends = torch.tensor(lengths).cumsum(0)
        self.last_rows = ends - 1
        self.attention_groups = self._group_rows(lengths, ends)
        self.segments = SegmentLayout(chunks, tpb)

    @staticmethod
    def _group_rows(lengths: list[int], ends: torch.Tensor) -> list[tuple[torch.Tensor, list[int]]]:
        """Multi-token chunks attend alone; single-token chunks (decode) share one call."""
        groups: list[tuple[torch.Tensor, list[int]]] = []
        singles = [i for i, n in enumerate(lengths) if n == 1]
        for i, n in enumerate(lengths):
            if n > 1:
                start = int(ends[i]) - n
                groups.append((torch.arange(start, start + n), [i]))
        if singles:
            groups.append((ends[singles] - 1, singles))
        return groups

    def kv_views(self, pool_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one pool layer as (num_blocks, KVH, tokens_per_block, head_dim) views."""
        cfg = self.cfg
        shape = (self.pool.shape[0], cfg.num_kv_heads, cfg.tokens_per_block, cfg.head_dim)
        return self.pool[:, pool_layer, 0].view(shape), self.pool[:, pool_layer, 1].view(shape)

    def block_tables(self, chunk_indices: list[int]) -> torch.Tensor:
        """(R, max_blocks) block tables of the given chunks, padded with block 0 (masked)."""
        tables = [self.chunks[i].block_ids for i in chunk_indices]
        width = max(len(t) for t in tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
