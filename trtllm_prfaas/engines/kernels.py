"""Batch-invariant CPU kernels for the reference engine.

Why this module exists: the product promises that a request's tokens are bit-identical whatever
route it takes (one engine, chunked prefill, relayed KV, batched decode). Floating-point results
depend on reduction order, and CPU BLAS picks a different kernel, or splits work across threads
differently, for a matrix with few rows (on MKL with two threads, rows 2..11 each give different
bits than the same row computed inside a larger matrix). So every op here is arranged so that the
value computed for one token row never depends on which other rows share the call:

- ``linear``: pads the row count (and a narrow output width) up to ``MIN_ROWS`` (16), past which
  MKL's GEMM returns the same bits for a row whatever the row count and the row's position.
- ``paged_attention``: reads keys from the block pool in fixed tiles aligned to absolute token
  positions and merges tiles with an online softmax. A tile that is fully masked for a query is
  an exact no-op (multiply by 1, add 0), so a query's result does not depend on how many queries
  or tiles share the call; query rows are padded to ``MIN_ROWS`` like ``linear``.
- ``linear_attention_segments``: the gated linear-attention recurrence in segments aligned to
  absolute multiples of the segment length; a short segment is zero-padded to the full length, so
  every segment has the same shape and its bits depend only on its own tokens and input state.

These properties are empirical facts about the BLAS in use (MKL on x86-64, fixed thread count);
``tests/engines/test_reference_exactness.py`` checks the equalities they buy on every run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "MIN_ROWS",
    "NEG_INIT",
    "apply_rope",
    "linear",
    "linear_attention_segments",
    "paged_attention",
    "rms_norm",
]

MIN_ROWS = 16
# The online softmax starts its running max here rather than at -inf, so a fully masked tile
# yields exp(-inf - NEG_INIT) = 0 and a rescale of exp(0) = 1 instead of NaN.
NEG_INIT = -1.0e30


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` with row-invariant bits: x (N, in), weight (out, in) -> (N, out).

    Both the row count and the output width are padded up to ``MIN_ROWS`` (bfloat16 GEMMs with a
    very narrow output, such as the two-head gate projection, are not row-invariant otherwise).
    """
    num_rows, num_out = x.shape[0], weight.shape[0]
    if num_out < MIN_ROWS:
        wide = weight.new_zeros((MIN_ROWS, weight.shape[1]))
        wide[:num_out] = weight
        return linear(x, wide)[:, :num_out]
    if num_rows >= MIN_ROWS:
        return F.linear(x, weight)
    padded = x.new_zeros((MIN_ROWS, x.shape[1]))
    padded[:num_rows] = x
    return F.linear(padded, weight)[:num_rows]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Root-mean-square norm over the last dim, computed in float32.

    (A bfloat16 mean over the last dim gives different bits for a row depending on how many rows
    share the call; the float32 one does not.)"""
    x32 = x.float()
    variance = x32.pow(2).mean(dim=-1, keepdim=True)
    return (x32 * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half form: x (N, heads, D), cos/sin (N, D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def _pad_rows(q: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Zero-pad (R, H, n, D) queries to (R, H, num_rows, D)."""
    if q.shape[2] == num_rows:
        return q
    padded = q.new_zeros((q.shape[0], q.shape[1], num_rows, q.shape[3]))
    padded[:, :, : q.shape[2]] = q
    return padded


def paged_attention(
    q: torch.Tensor,
    q_positions: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    num_tile_blocks: int,
) -> torch.Tensor:
    """Causal GQA attention of queries over keys held in paged blocks.

    q: (R, n, H, D) queries of R sequences, n rows each (rows beyond a sequence's real count may
    hold anything; their output is garbage and the caller drops it). q_positions: (R, n) absolute
    position of each query row (int64). key_cache / value_cache: (num_blocks, KVH, T_b, D) views of
    one layer of the pool. block_tables: (R, max_blocks) int64 block ids, padded with any valid id.
    A query attends to every key at a position <= its own. Returns (R, n, H, D).
    """
    num_seqs, num_rows, num_heads, head_dim = q.shape
    num_kv_heads, tokens_per_block = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    rows = max(num_rows, MIN_ROWS)
    # (R, n, H, D) -> (R, KVH, group * rows, D): the query heads sharing one KV head become rows.
    qh = _pad_rows(q.permute(0, 2, 1, 3), rows) * (head_dim**-0.5)
    qh = qh.reshape(num_seqs, num_kv_heads, group * rows, head_dim)
    pos = torch.full((num_seqs, rows), -1, dtype=torch.int64)
    pos[:, :num_rows] = q_positions
    pos = pos.repeat(1, group)[:, None, :, None]  # (R, 1, group*rows, 1)

    running_max = torch.full((num_seqs, num_kv_heads, group * rows, 1), NEG_INIT, dtype=q.dtype)
    denom = torch.zeros_like(running_max)
    acc = torch.zeros((num_seqs, num_kv_heads, group * rows, head_dim), dtype=q.dtype)
    tile_tokens = num_tile_blocks * tokens_per_block
    first_query = int(q_positions.min())
    for tile in range((int(q_positions.max()) // tile_tokens) + 1):
        k, v = _gather_tile(key_cache, value_cache, block_tables, tile, num_tile_blocks)
        scores = qh @ k.transpose(-1, -2)  # (R, KVH, group*rows, tile_tokens)
        if (tile + 1) * tile_tokens - 1 > first_query:  # some key is after some query: mask
            key_pos = torch.arange(tile * tile_tokens, (tile + 1) * tile_tokens)
            scores.masked_fill_(key_pos[None, None, None, :] > pos, float("-inf"))
        tile_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True))
        probs = scores.sub_(tile_max).exp_()
        rescale = torch.exp(running_max - tile_max)
        denom = denom * rescale + probs.sum(dim=-1, keepdim=True)
        acc = acc * rescale + probs @ v
        running_max = tile_max
    out = (acc / denom).reshape(num_seqs, num_kv_heads, group, rows, head_dim)
    return out.reshape(num_seqs, num_heads, rows, head_dim)[:, :, :num_rows].permute(0, 2, 1, 3)


def _gather_tile(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    tile: int,
    num_tile_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one tile for every sequence: (R, KVH, tile_tokens, D) each."""
    first = tile * num_tile_blocks
    ids = block_tables[:, first : first + num_tile_blocks]
    if ids.shape[1] < num_tile_blocks:  # table shorter than the tile: pad; masked by position
        ids = F.pad(ids, (0, num_tile_blocks - ids.shape[1]), value=int(block_tables[0, 0]))
    num_seqs, num_kv_heads, head_dim = ids.shape[0], key_cache.shape[1], key_cache.shape[3]
    # (R, G, KVH, T_b, D) -> (R, KVH, G*T_b, D)
    k = key_cache[ids].permute(0, 2, 1, 3, 4).reshape(num_seqs, num_kv_heads, -1, head_dim)
    v = value_cache[ids].permute(0, 2, 1, 3, 4).reshape(num_seqs, num_kv_heads, -1, head_dim)
    return k, v


def linear_attention_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    init_states: torch.Tensor,
    chain: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated linear attention over S zero-padded segments of equal length C.

    Recurrence per head (scalar gate g_t = exp(log_decay_t) in (0, 1)):
        S_t = g_t * S_{t-1} + k_t^T v_t          state (d_k, d_v)
        o_t = q_t S_t
    q, k: (S, H, C, d_k); v: (S, H, C, d_v); log_decay: (S, H, C), zero on padded rows (and
    k, v zero there) so padding leaves the state untouched. init_states: (S, H, d_k, d_v) input
    state of each segment; chain: (S,) bool, True where a segment continues from the previous
    segment's output state instead of its own ``init_states`` row. Returns (outputs (S, H, C, d_v),
    final states (S, H, d_k, d_v)).
    """
    cum = torch.cumsum(log_decay, dim=-1)  # (S, H, C) log of the decay since the segment start
    last = cum[..., -1:]  # (S, H, 1)
    # State update terms: U = (k * exp(last - cum))^T v; the old state decays by exp(last).
    k_to_end = k * torch.exp(last - cum)[..., None]
    updates = k_to_end.transpose(-1, -2) @ v  # (S, H, d_k, d_v)
    state_decay = torch.exp(last)[..., None]  # (S, H, 1, 1)
    states_in = init_states.clone()
    states_out = torch.empty_like(init_states)
    for s in range(q.shape[0]):
        if bool(chain[s]):
            states_in[s] = states_out[s - 1]
        states_out[s] = state_decay[s] * states_in[s] + updates[s]
    # Outputs: inter-segment part from the input state, intra-segment part causal within C.
    inter = (q * torch.exp(cum)[..., None]) @ states_in  # (S, H, C, d_v)
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    gap = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf"))
    intra = ((q @ k.transpose(-1, -2)) * torch.exp(gap)) @ v  # (S, H, C, d_v)
    return inter + intra, states_out
