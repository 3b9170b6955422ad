"""The fake model: a dense (attention-only) model whose KV and greedy tokens are functions of the
token prefix, so equal prefixes give equal KV on every deployment and a test can check any
rank's pool against ``kv_rows`` and ``shard``."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FakeModel:
    """A dense (attention-only) model: every decoder layer has KV in the pool."""

    name: str = "fake-dense-model"
    num_layers: int = 4
    num_kv_heads: int = 4
    head_dim: int = 8
    tokens_per_block: int = 16
    num_blocks: int = 64
    dtype: torch.dtype = torch.float16
    vocab_size: int = 1000

    def pool_shape(self, tp_size: int) -> tuple[int, int, int, int]:
        """One rank's ``[num_blocks, num_layers, kv_factor, heads/tp * tokens_per_block * dim]``."""
        row = self.num_kv_heads // tp_size * self.tokens_per_block * self.head_dim
        return (self.num_blocks, self.num_layers, 2, row)


def _digest(tokens: list[int], *salt: int) -> int:
    data = torch.tensor(list(tokens) + list(salt), dtype=torch.int64).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def kv_rows(model: FakeModel, tokens: list[int], pos: int, layer: int) -> torch.Tensor:
    """``(2, num_kv_heads, head_dim)``: K and V of token ``pos`` in ``layer``, all heads (a
    function of the prefix ``tokens[: pos + 1]``, so equal prefixes give equal KV)."""
    gen = torch.Generator().manual_seed(_digest(tokens[: pos + 1], layer) & 0x7FFF_FFFF)
    return torch.randn((2, model.num_kv_heads, model.head_dim), generator=gen).to(model.dtype)


def shard(model: FakeModel, rows: torch.Tensor, rank: int, tp_size: int) -> torch.Tensor:
    """Rank ``rank``'s heads of ``rows`` (heads split evenly across tensor-parallel ranks)."""
    per_rank = model.num_kv_heads // tp_size
    return rows[:, rank * per_rank : (rank + 1) * per_rank, :]


def next_token(model: FakeModel, tokens: list[int]) -> int:
    """The fake model's greedy next token after ``tokens``."""
    return _digest(tokens, -1) % model.vocab_size
