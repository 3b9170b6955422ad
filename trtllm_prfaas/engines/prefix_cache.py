"""The reference engine's prefix cache: block reuse as TensorRT-LLM's, plus recurrent-state
snapshots for the hybrid model's linear layers.

Full-attention blocks are reused on a chained-hash prefix match (``kv/hashing.py``), whole blocks
only, as upstream with partial reuse off. The match covers the first ``L - 1`` prompt tokens only,
so the last prompt token is always computed and yields the logits of the first output token:
upstream ``WindowBlockManager::addSequence`` chops ``inputLength - 1`` tokens into block keys
("Ignore last token because it can't be recovered") before ``loadOrAllocateBlocks``
(``cpp/tensorrt_llm/batch_manager/kvCacheManager.cpp``, stored copy 1277673704). A prompt that
is cached whole therefore reuses ``floor((L - 1) / tokens_per_block)`` blocks and recomputes the
rest (at least one token).

Linear-attention layers keep one recurrent state per request, valid only after exactly the
tokens it has seen. So a hybrid model can resume at ``n`` tokens only if a snapshot of the state
after exactly ``n`` tokens exists (the paper's exact-length rule). The engine takes snapshots
where it has the state: at every prefill chunk end that is block aligned, and it ends a chunk at
``floor((L - 1) / tokens_per_block) * tokens_per_block`` so that a repeat of the prompt finds one
where its match ends, and a follow-up turn (which extends the prompt) finds one at the prompt's
last full block (that boundary, or L itself when L is block aligned). The match is the
longest run of cached blocks that ends at a snapshot. Snapshots are keyed by the hash of the block
they end at, held in their own LRU table of ``num_state_snapshots`` slots.

Only prompt blocks are named and cached, never blocks written by decode steps: a decode step
computes a token alone, and the model's kernels give bit-identical KV for a token only if every
route computes it in the same block-aligned segments (``engines/batch.py``); a follow-up turn
prefills those tokens, so decode-written blocks would change its bits. Blocks filled by a KV
cache connector's load are prompt blocks from the same kernels and are named like computed ones.

Events: every named block chain is reported stored (parent hash first), every evicted block
removed, and every snapshot taken or evicted (``state_stored`` / ``state_removed``), into a
:class:`~trtllm_prfaas.kv.events.KvEventLog`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trtllm_prfaas.engines.blocks import BlockManager
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.engines.request import LlmRequest
from trtllm_prfaas.kv.events import KvEventLog
from trtllm_prfaas.kv.hashing import CacheKey, block_hashes
from trtllm_prfaas.kv.slots import SlotTable

__all__ = ["PrefixCache", "PrefixCacheStats", "PrefixPin", "cache_key_for"]

_LAYOUT = "HND"


def cache_key_for(cfg: ModelConfig, tp_rank: int = 0) -> CacheKey:
    """The key that names this model's blocks: a router hashes prompts under the same key."""
    return CacheKey(cfg.model_id, _LAYOUT, cfg.dtype, tp_rank)


@dataclass
class PrefixCacheStats:
    """Counters a user would watch (the worker exports them as metrics)."""

    num_queries: int = 0  # requests admitted with block reuse on
    num_hits: int = 0  # ... that reused at least one block
    num_reused_tokens: int = 0  # prompt tokens served from cached blocks
    num_query_tokens: int = 0  # prompt tokens of those requests
    num_snapshot_evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_reused_tokens / self.num_query_tokens if self.num_query_tokens else 0.0


@dataclass(frozen=True)
class PrefixPin:
    """A cached prefix held for a request that is not admitted yet (a decode slot's
    reservation: ``PrefixCache.pin``): one reference on each block and on the snapshot where the
    prefix ends, so nothing of it is evicted before the request's admission matches it."""

    block_ids: tuple[int, ...]
    snapshot_slot: int | None
    num_tokens: int


class PrefixCache:
    """Matching, naming and snapshots over the engine's ``BlockManager`` and state tensor."""

    def __init__(
        self,
        cfg: ModelConfig,
        blocks: BlockManager,
        states: torch.Tensor,
        num_state_snapshots: int,
        events: KvEventLog,
    ) -> None:
        self.cfg, self.blocks, self.states, self.events = cfg, blocks, states, events
        self.key = cache_key_for(cfg)
        self.tokens_per_block = cfg.tokens_per_block
        self.has_states = cfg.num_linear_layers > 0
        num_snapshots = num_state_snapshots if self.has_states else 0
        self.snapshots = torch.zeros((num_snapshots, *cfg.state_shape), dtype=states.dtype)
        self._snapshots: SlotTable[int] = SlotTable(
            num_snapshots, "state snapshot", events.record_state_removed
        )
        self.stats = PrefixCacheStats()

    # ---- admission ---------------------------------------------------------------------------

    def acquire(self, req: LlmRequest) -> None:
        """Find and reference ``req``'s cached prefix: sets ``block_ids`` (the shared blocks),
        ``num_cached_tokens`` and, for a hybrid model, ``snapshot_slot``. Undo with
        :meth:`release_match` if the request cannot be admitted after all."""
        tpb = self.tokens_per_block
        if not req.block_hashes:
            req.block_hashes = block_hashes(req.prompt_token_ids, tpb, self.key)
        usable = req.block_hashes[: (req.prompt_len - 1) // tpb]
        block_ids, req.snapshot_slot = self._reference(usable)
        req.block_ids = block_ids
        req.num_cached_tokens = len(block_ids) * tpb

    def _reference(self, hashes: list[int]) -> tuple[list[int], int | None]:
        """Reference the longest cached run at the head of ``hashes`` that (hybrid model) ends
        at a snapshot: its blocks, and the snapshot's slot."""
        num_blocks = self.blocks.num_cached_prefix(hashes)
        slot = None
        if self.has_states:
            while num_blocks and slot is None:
                slot = self._snapshots.acquire(hashes[num_blocks - 1])
                num_blocks -= slot is None
        return self.blocks.acquire(hashes[:num_blocks]), slot

    def pin(self, hashes: list[int]) -> PrefixPin:
        """Hold the cached prefix of ``hashes`` (a prompt's chained block hashes, as a router
        computes them) exactly as admission would match it, snapshot rule included; the pin's
        ``num_tokens`` is how much of it that is (block aligned, 0 when nothing matched). Give
        it back with :meth:`unpin`, whatever happened to the request."""
        block_ids, slot = self._reference(list(hashes))
        return PrefixPin(tuple(block_ids), slot, len(block_ids) * self.tokens_per_block)

    def unpin(self, pin: PrefixPin) -> None:
        self.blocks.release(list(pin.block_ids), 0)
        if pin.snapshot_slot is not None:
            self._snapshots.release(pin.snapshot_slot)

    def release_match(self, req: LlmRequest) -> None:
        """Give back what :meth:`acquire` referenced (admission deferred)."""
        self.blocks.release(req.block_ids, 0)
        self.release_snapshot(req)
        req.block_ids, req.num_cached_tokens = [], 0

    def admitted(self, req: LlmRequest) -> None:
        """Count the request and start its state from the snapshot it matched."""
        self.stats.num_queries += 1
        self.stats.num_query_tokens += req.prompt_len
        self.stats.num_hits += req.num_cached_tokens > 0
        self.stats.num_reused_tokens += req.num_cached_tokens
        req.num_committed_blocks = req.num_cached_tokens // self.tokens_per_block
        self.restore_state(req)

    def restore_state(self, req: LlmRequest) -> None:
        """The request's state as after its cached prefix (zeros when there is none)."""
        if req.snapshot_slot is None:
            self.states[req.state_slot].zero_()
        else:
            self.states[req.state_slot].copy_(self.snapshots[req.snapshot_slot])

    def release_snapshot(self, req: LlmRequest) -> None:
        if req.snapshot_slot is not None:
            self._snapshots.release(req.snapshot_slot)
            req.snapshot_slot = None

    # ---- scheduling and after each prefill chunk ----------------------------------------------

    def chunk_end(self, req: LlmRequest, start: int, end: int) -> int:
        """``end``, or the last block boundary before the prompt's last token when the chunk
        would run past it, so a hybrid model has a snapshot where a repeat of this prompt, or a
        follow-up turn that extends it, can resume (the prompt's end itself is a chunk end)."""
        tpb = self.tokens_per_block
        boundary = (req.prompt_len - 1) // tpb * tpb
        return boundary if self.has_states and start < boundary < end else end

    def after_chunk(self, req: LlmRequest, start: int, end: int) -> None:
        """A prefill chunk ``[start, end)`` was computed: name the prompt's newly completed
        blocks (including any a connector loaded below it) and snapshot the state if ``end`` is
        block aligned. A chunk that starts off the block grid (after a connector's claim of
        exactly L-1 tokens: the decode of the remote handoff computes t1 alone) is not
        bit-identical to a prefill of the same tokens, so the block it writes into and the
        state after it are not cached; the blocks below it are."""
        tpb = self.tokens_per_block
        first, stop = req.num_committed_blocks, min(end, req.prompt_len) // tpb
        on_grid = start % tpb == 0
        if not on_grid:
            stop = min(stop, start // tpb)
        if stop > first:
            hashes = req.block_hashes[first:stop]
            self.blocks.commit_chain(req.block_ids[first:stop], hashes)
            parent = req.block_hashes[first - 1] if first else None
            self.events.record_stored(
                parent, hashes, tpb, req.prompt_token_ids[first * tpb : stop * tpb]
            )
            req.num_committed_blocks = stop
        if self.has_states and on_grid and end % tpb == 0:
            self._snapshot(req, req.block_hashes[end // tpb - 1], end)
        if end >= req.prompt_len:
            self.release_snapshot(req)

    def store_relayed_snapshot(self, req: LlmRequest, num_tokens: int, state: torch.Tensor) -> bool:
        """Keep ``state`` (the recurrent states of every linear layer after exactly
        ``num_tokens`` prompt tokens, computed by the prefill node that relayed this request's
        KV) as a snapshot where the block ending at ``num_tokens`` is, so that a follow-up turn
        can resume there once the relayed blocks below it are named. False (nothing kept) when
        ``num_tokens`` is not a block boundary inside the prompt or the shape is wrong."""
        tpb = self.tokens_per_block
        if not self.has_states or num_tokens <= 0 or num_tokens % tpb:
            return False
        if num_tokens > req.prompt_len or tuple(state.shape) != tuple(self.snapshots.shape[1:]):
            return False
        if not req.block_hashes:
            req.block_hashes = block_hashes(req.prompt_token_ids, tpb, self.key)
        self._keep(req.block_hashes[num_tokens // tpb - 1], num_tokens, state)
        return True

    def _snapshot(self, req: LlmRequest, block_hash: int, num_tokens: int) -> None:
        self._keep(block_hash, num_tokens, self.states[req.state_slot])

    def _keep(self, block_hash: int, num_tokens: int, state: torch.Tensor) -> None:
        table = self._snapshots
        if table.contains(block_hash) or table.num_available == 0:
            return  # already there, or every snapshot is in use: skip (reuse is best effort)
        evicted = table.num_evictions
        slot = table.take_keyed([block_hash])[0]
        self.stats.num_snapshot_evictions += table.num_evictions - evicted
        self.snapshots[slot].copy_(state)
        table.commit(slot)
        table.release(slot)
        self.events.record_state_stored(block_hash, num_tokens)

    # ---- checks ---------------------------------------------------------------------------------

    def leak_report(self) -> list[str]:
        held = self._snapshots.referenced_slots()
        return [f"state snapshots {held} still referenced"] if held else []
