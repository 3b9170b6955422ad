"""The engine's device-pool block manager and state-slot allocator (plain Python, no tensors).

Blocks are reserved for a request's worst case (prompt + max_tokens) when it is admitted and
handed out as its sequence grows, so a running request can never run out of blocks mid-decode.

With block reuse (``EngineConfig.enable_block_reuse``) the same pool is also the prefix cache, as
TensorRT-LLM's ``BlockManager`` is: a block is free, a request's own (raw: its bytes may still
change), referenced (named by its chained hash, shared by every request that matched it), or
cached (named, unreferenced, evictable least-recently-used). A request's own block is named with
:meth:`BlockManager.commit_chain` once its bytes are final; on release a named block stays cached
and an unnamed one (a prompt's partial tail, decode blocks: the transfer blocks of a prefill) goes
back to the free list. Cached blocks are free for accounting: ``num_available`` counts them, and
``take`` evicts them when no free block is left. Evictions are reported to ``on_evict``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from trtllm_prfaas.errors import AdmissionRejected
from trtllm_prfaas.kv.slots import SlotTable

__all__ = ["BlockManager", "SlotAllocator"]


class BlockManager:
    """The pool's blocks with reservations; see the module docstring. ``max_cached_blocks``
    bounds the unreferenced cached blocks (LRU beyond it); None: any unused block may stay."""

    def __init__(
        self,
        num_blocks: int,
        max_cached_blocks: int | None = None,
        on_evict: Callable[[int], None] | None = None,
    ) -> None:
        self.num_blocks = num_blocks
        self.max_cached_blocks = num_blocks if max_cached_blocks is None else max_cached_blocks
        self._table: SlotTable[int] = SlotTable(num_blocks, "KV block", on_evict)
        self._reserved = 0

    @property
    def num_free(self) -> int:
        """Blocks no request holds (free or cached)."""
        return self._table.num_available

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks kept for reuse (evictable)."""
        return self._table.num_cached

    @property
    def num_evictions(self) -> int:
        return self._table.num_evictions

    @property
    def num_available(self) -> int:
        """Blocks neither in use nor promised to an admitted request."""
        return self.num_free - self._reserved

    def can_reserve(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_available

    def reserve(self, num_blocks: int) -> None:
        if not self.can_reserve(num_blocks):
            raise AdmissionRejected(
                f"KV block pool exhausted: need {num_blocks} blocks, "
                f"{self.num_available} available of {self.num_blocks}"
            )
        self._reserved += num_blocks

    def take(self, num_blocks: int) -> list[int]:
        """Hand out reserved blocks (the caller reserved them before); evicts cached ones when
        no free block is left."""
        if num_blocks > self._reserved:
            raise AssertionError(f"take({num_blocks}) exceeds the {self._reserved} reserved")
        self._reserved -= num_blocks
        return self._table.take_raw(num_blocks)

    def release(self, block_ids: list[int], unused_reservation: int) -> None:
        """Return a finished request's blocks (tail first, so a chain's tail is evicted before
        its head) and whatever of its reservation it never took."""
        for block_id in reversed(block_ids):
            if self._table.is_raw(block_id):
                self._table.give_raw([block_id])
            else:
                self._table.release(block_id)
        self._reserved -= unused_reservation
        while self._table.num_cached > self.max_cached_blocks:
            self._table.evict_one()

    # ---- block reuse ---------------------------------------------------------------------------

    def num_cached_prefix(self, hashes: Sequence[int]) -> int:
        """Length of the matchable run at the head of ``hashes`` (a peek: no reference taken)."""
        count = 0
        while count < len(hashes) and self._table.contains(hashes[count]):
            count += 1
        return count

    def acquire(self, hashes: Sequence[int]) -> list[int]:
        """One reference on the block of each hash (all must be matchable: peek first)."""
        block_ids = []
        for block_hash in hashes:
            block_id = self._table.acquire(block_hash)
            if block_id is None:
                raise AssertionError(f"block hash {block_hash:#x} is not cached")
            block_ids.append(block_id)
        return block_ids

    def commit_chain(self, block_ids: Sequence[int], hashes: Sequence[int]) -> None:
        """Name a request's own blocks whose bytes are final. A hash already named by another
        block leaves this one a private copy (freed on release), as upstream's storeBlocks."""
        for block_id, block_hash in zip(block_ids, hashes, strict=True):
            self._table.key_raw(block_id, block_hash)

    def leak_report(self) -> str | None:
        in_use = self.num_blocks - self.num_free
        if in_use == 0 and self._reserved == 0:
            return None
        return f"{in_use} blocks in use, {self._reserved} reserved"


class SlotAllocator:
    """Recurrent-state slots: one per admitted request."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise AdmissionRejected(f"no free sequence slot (max_num_seqs={self.num_slots})")
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)
