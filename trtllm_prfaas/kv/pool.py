"""The hybrid prefix-cache pool: host memory for KV blocks and recurrent-state snapshots.

The paper's per-cluster pool. It OWNS two contiguous ``torch.uint8`` tensors and keeps plain-data
bookkeeping over them (see :mod:`trtllm_prfaas.kv.slots`):

- ``blocks``: ``[num_blocks, block_bytes]``; one row holds ``tokens_per_block`` tokens of every
  full-attention layer. Rows are shared by two kinds of block (one pool, as in the paper):

  * **prefix-cache blocks**: full blocks named by their chained hash
    (:func:`~trtllm_prfaas.kv.hashing.block_hashes`), reusable, reference counted; at refcount 0
    they stay cached and are evicted least-recently-used only when an allocation needs room;
  * **transfer-cache blocks**: the tail of a prefill (any length, last block partial) owned by a
    transfer id, never matchable, freed all at once by :meth:`HybridPrefixCachePool.drop_transfer`.

- ``states``: ``[num_state_slots, state_bytes]``; one row is the whole recurrent state of one
  request after exactly ``num_tokens`` tokens. Reusable only on an EXACT length match.

Life of a prefix block: ``match_prefix`` (hits, referenced) → ``allocate_prefix_blocks`` for the
misses (pending) → write bytes through ``block_view`` → ``commit_prefix_block`` (matchable) →
``release`` when the request is done (cached, evictable). State snapshots follow the same path with
``match_state`` / ``put_state`` / ``commit_state`` / ``release_state``.

Allocation that cannot be satisfied even after evicting every unreferenced entry raises
:class:`~trtllm_prfaas.errors.AdmissionRejected` and changes nothing (all or nothing). Calling
``release``/``commit`` on something the caller does not hold raises ``ValueError`` (a caller bug).

Not thread-safe (one owner serializes calls); no call blocks or does I/O.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.kv.slots import SlotTable
from trtllm_prfaas.kv.spec import KVSpec

__all__ = ["HybridPrefixCachePool", "LeakReport", "PoolStats", "TransferId"]

TransferId = Hashable
"""Any hashable that names one transfer (a request id, a string)."""

_StateKey = tuple[int, int]  # (prefix hash, num_tokens)


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool's accounting. Block counts partition ``num_blocks``:
    ``num_free + num_cached_unreferenced + num_referenced + num_transfer == num_blocks``."""

    num_blocks: int
    num_free: int
    num_cached_unreferenced: int
    num_referenced: int  # referenced prefix blocks, pending ones included
    num_pending: int
    num_transfer: int
    num_transfers: int
    num_block_evictions: int
    num_state_slots: int
    num_state_slots_free: int
    num_state_slots_cached: int
    num_state_slots_used: int  # referenced
    num_state_evictions: int


@dataclass(frozen=True)
class LeakReport:
    """What is still held. Empty everywhere once every request has released and dropped."""

    referenced_blocks: tuple[int, ...]
    pending_blocks: tuple[int, ...]
    transfer_ids: tuple[TransferId, ...]
    referenced_state_slots: tuple[int, ...]

    @property
    def is_clean(self) -> bool:
        return not (self.referenced_blocks or self.transfer_ids or self.referenced_state_slots)

    def __str__(self) -> str:
        if self.is_clean:
            return "no leaks"
        return (
            f"referenced blocks {list(self.referenced_blocks)} "
            f"(pending {list(self.pending_blocks)}), open transfers {list(self.transfer_ids)}, "
            f"referenced state slots {list(self.referenced_state_slots)}"
        )


class HybridPrefixCachePool:
    """Host-memory pool of KV blocks and recurrent-state snapshots; see the module docstring.

    Storage contents are undefined until written (allocated with ``torch.empty``).
    """

    def __init__(
        self, *, num_blocks: int, block_bytes: int, num_state_slots: int = 0, state_bytes: int = 0
    ) -> None:
        _check_size("num_blocks", num_blocks, 1)
        _check_size("block_bytes", block_bytes, 1)
        _check_size("num_state_slots", num_state_slots, 0)
        _check_size("state_bytes", state_bytes, 0)
        self.block_bytes = block_bytes
        self.state_bytes = state_bytes
        self.blocks = torch.empty((num_blocks, block_bytes), dtype=torch.uint8)
        self.states = torch.empty((num_state_slots, state_bytes), dtype=torch.uint8)
        self._blocks: SlotTable[int] = SlotTable(num_blocks, "block")
        self._states: SlotTable[_StateKey] = SlotTable(num_state_slots, "state slot")
        self._transfers: dict[TransferId, list[int]] = {}

    @classmethod
    def from_spec(
        cls, spec: KVSpec, *, num_blocks: int, num_state_slots: int = 0
    ) -> HybridPrefixCachePool:
        """A pool whose rows fit ``spec``'s blocks and recurrent states."""
        return cls(
            num_blocks=num_blocks,
            block_bytes=spec.block_bytes,
            num_state_slots=num_state_slots,
            state_bytes=spec.state_bytes,
        )

    @property
    def num_blocks(self) -> int:
        return self._blocks.num_slots

    @property
    def num_state_slots(self) -> int:
        return self._states.num_slots

    # ---- views ---------------------------------------------------------------------------------

    def block_view(self, block_id: int) -> torch.Tensor:
        """The bytes of a block the caller holds (referenced or in a transfer): a 1-D uint8 view
        of length ``block_bytes`` into the pool, no copy. Raises ValueError for an unheld block."""
        if not self._blocks.is_owned(block_id):
            raise ValueError(f"block {block_id} is not held by anyone; no view of it is valid")
        return self.blocks[block_id]

    def state_view(self, slot: int) -> torch.Tensor:
        """The bytes of a state slot the caller holds: 1-D uint8 view of length ``state_bytes``."""
        if not self._states.is_owned(slot):
            raise ValueError(f"state slot {slot} is not held by anyone; no view of it is valid")
        return self.states[slot]

    # ---- prefix-cache blocks -------------------------------------------------------------------

    def num_cached_prefix_blocks(self, hashes: Sequence[int]) -> int:
        """Length of the cached run at the head of ``hashes``. Takes no reference, does not touch
        LRU order: safe for a scheduler that must only peek (e.g. under TensorRT-LLM's lock)."""
        count = 0
        while count < len(hashes) and self._blocks.contains(hashes[count]):
            count += 1
        return count

    def match_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest cached run at the head of ``hashes`` (stops at the first miss),
        with one reference taken on each; the caller must :meth:`release` them."""
        block_ids: list[int] = []
        for block_hash in hashes:
            block_id = self._blocks.acquire(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def allocate_prefix_blocks(self, hashes: Sequence[int]) -> list[int]:
        """New pending blocks, one per hash, refcount 1, all or nothing (may evict cached blocks).
        Not matchable until :meth:`commit_prefix_block`. Raises AdmissionRejected when full."""
        return self._blocks.take_keyed(hashes)

    def allocate_prefix_block(self, block_hash: int) -> int:
        """One new pending block under ``block_hash``; see :meth:`allocate_prefix_blocks`."""
        return self.allocate_prefix_blocks([block_hash])[0]

    def commit_prefix_block(self, block_id: int) -> bool:
        """Register a pending block under its hash once its bytes are written; the caller keeps its
        reference. Returns False if another block already holds that hash: this one is then a
        private copy, freed (not cached) on release. Raises ValueError unless pending."""
        return self._blocks.commit(block_id)

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each prefix block. Processed tail first, so a released chain's
        tail becomes older in LRU order and is evicted before its head (keeping heads matchable).
        Raises ValueError on a block with no reference (earlier ids are already released)."""
        for block_id in reversed(block_ids):
            self._blocks.release(block_id)

    # ---- transfer-cache blocks -----------------------------------------------------------------

    def allocate_transfer_blocks(self, transfer_id: TransferId, num_blocks: int) -> list[int]:
        """``num_blocks`` blocks owned by ``transfer_id`` (appended if it already holds some), all
        or nothing, never matchable. Raises AdmissionRejected when the pool cannot supply them."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        block_ids = self._blocks.take_raw(num_blocks)
        self._transfers.setdefault(transfer_id, []).extend(block_ids)
        return block_ids

    def transfer_blocks(self, transfer_id: TransferId) -> list[int]:
        """The blocks ``transfer_id`` holds, in allocation order ([] if unknown)."""
        return list(self._transfers.get(transfer_id, ()))

    def drop_transfer(self, transfer_id: TransferId) -> int:
        """Free every block of ``transfer_id`` once its transfer is done or abandoned. Idempotent:
        an unknown or already dropped id frees nothing. Returns the number of blocks freed."""
        block_ids = self._transfers.pop(transfer_id, [])
        self._blocks.give_raw(block_ids)
        return len(block_ids)

    # ---- recurrent-state snapshots -------------------------------------------------------------

    def match_state(self, key_hash: int, num_tokens: int) -> int | None:
        """The slot of a committed snapshot of exactly ``num_tokens`` tokens under ``key_hash``,
        with a reference taken (caller must :meth:`release_state`), or None. No near matches."""
        return self._states.acquire((key_hash, num_tokens))

    def put_state(self, key_hash: int, num_tokens: int) -> int:
        """A new pending slot (refcount 1) for a snapshot at ``num_tokens``; write it through
        :meth:`state_view`, then :meth:`commit_state`. Raises AdmissionRejected when full."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return self._states.take_keyed([(key_hash, num_tokens)])[0]

    def commit_state(self, slot: int) -> bool:
        """Make a written snapshot matchable; same contract as :meth:`commit_prefix_block`."""
        return self._states.commit(slot)

    def release_state(self, slot: int) -> None:
        """Drop one reference on a state slot (cached at zero if committed, else freed)."""
        self._states.release(slot)

    # ---- admission and accounting --------------------------------------------------------------

    def num_available_blocks(self) -> int:
        """Blocks an allocation could get right now: free plus evictable."""
        return self._blocks.num_available

    def can_allocate(self, num_blocks: int, num_states: int = 0) -> bool:
        """True if allocations of this size would succeed right now (admission without raising)."""
        return num_blocks <= self._blocks.num_available and num_states <= self._states.num_available

    def stats(self) -> PoolStats:
        """A consistent snapshot of the accounting (cheap; O(1))."""
        b, s = self._blocks, self._states
        return PoolStats(
            num_blocks=b.num_slots,
            num_free=b.num_free,
            num_cached_unreferenced=b.num_cached,
            num_referenced=b.num_referenced,
            num_pending=b.num_pending,
            num_transfer=b.num_raw,
            num_transfers=len(self._transfers),
            num_block_evictions=b.num_evictions,
            num_state_slots=s.num_slots,
            num_state_slots_free=s.num_free,
            num_state_slots_cached=s.num_cached,
            num_state_slots_used=s.num_referenced,
            num_state_evictions=s.num_evictions,
        )

    def leak_report(self) -> LeakReport:
        """Which blocks, transfers and state slots are still held (for tests and shutdown logs)."""
        return LeakReport(
            referenced_blocks=tuple(self._blocks.referenced_slots()),
            pending_blocks=tuple(self._blocks.pending_slots()),
            transfer_ids=tuple(self._transfers),
            referenced_state_slots=tuple(self._states.referenced_slots()),
        )

    def assert_no_leaks(self) -> None:
        """Raise AssertionError naming what is still held, unless nothing is."""
        report = self.leak_report()
        if not report.is_clean:
            raise AssertionError(f"pool leaks: {report}")

    def check_invariants(self) -> None:
        """Raise AssertionError unless every block is in exactly one of {free, cached, referenced,
        transfer}, every state slot likewise, and transfers own exactly the transfer blocks."""
        self._blocks.check_invariants()
        self._states.check_invariants()
        owned = [b for ids in self._transfers.values() for b in ids]
        if len(owned) != len(set(owned)) or sorted(owned) != self._blocks.raw_slots():
            raise AssertionError("transfer ownership disagrees with transfer blocks")


def _check_size(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"HybridPrefixCachePool.{name} must be an int >= {minimum}, got {value!r}"
        )
