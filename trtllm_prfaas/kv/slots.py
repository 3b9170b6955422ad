"""A refcounted, content-keyed table of fixed-size slots with LRU eviction (bookkeeping only).

:class:`SlotTable` is the engine under :class:`~trtllm_prfaas.kv.pool.HybridPrefixCachePool`:
once for KV blocks (keyed by chained block hash) and once for recurrent-state snapshots (keyed by
``(prefix hash, num_tokens)``). It holds no bytes. Every slot is in exactly one state:

- **free**: unowned, contents meaningless;
- **cached**: committed under a key, refcount 0, in LRU order, evictable;
- **referenced**: refcount > 0; either *pending* (taken under a key, bytes being written, not
  matchable yet), committed (matchable), or *unkeyed* (a duplicate of an already committed key,
  freed rather than cached on its last release);
- **raw**: taken without a key (transfer blocks, or a request's own blocks before their bytes are
  final); returned with :meth:`SlotTable.give_raw`, or named later with :meth:`SlotTable.key_raw`.

``on_evict`` (optional) is called with the key of every cached slot evicted to make room, so an
owner can report removals (KV cache events).

Not thread-safe: the owner serializes calls. No call blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

from trtllm_prfaas.errors import AdmissionRejected

__all__ = ["SlotTable"]

K = TypeVar("K", bound=Hashable)


class SlotTable(Generic[K]):
    """``num_slots`` slots named ``0..num_slots-1``; ``noun`` names them in error messages."""

    def __init__(
        self, num_slots: int, noun: str, on_evict: Callable[[K], None] | None = None
    ) -> None:
        self.num_slots = num_slots
        self.noun = noun
        self.on_evict = on_evict
        # Inserted high-to-low so popitem() (LIFO) hands out low ids first on a fresh table.
        self._free: dict[int, None] = dict.fromkeys(range(num_slots - 1, -1, -1))
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached; first = least recently used
        self._refcount: dict[int, int] = {}  # referenced slots
        self._key_of: dict[int, K] = {}  # pending and committed slots
        self._slot_of: dict[K, int] = {}  # committed keys only
        self._pending: set[int] = set()
        self._raw: set[int] = set()
        self.num_evictions = 0

    # ---- queries -------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._lru)

    @property
    def num_referenced(self) -> int:
        return len(self._refcount)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def num_raw(self) -> int:
        return len(self._raw)

    @property
    def num_available(self) -> int:
        """Slots a take could get right now: free plus evictable."""
        return len(self._free) + len(self._lru)

    def is_owned(self, slot: int) -> bool:
        """True if ``slot`` is referenced or raw (its bytes may be read or written)."""
        return slot in self._refcount or slot in self._raw

    def is_raw(self, slot: int) -> bool:
        return slot in self._raw

    def contains(self, key: K) -> bool:
        """True if ``key`` is committed (matchable); takes no reference, does not touch LRU."""
        return key in self._slot_of

    def referenced_slots(self) -> list[int]:
        return sorted(self._refcount)

    def pending_slots(self) -> list[int]:
        return sorted(self._pending)

    def raw_slots(self) -> list[int]:
        return sorted(self._raw)

    # ---- taking and giving back ----------------------------------------------------------------

    def _take(self, count: int) -> list[int]:
        """``count`` slots, all or nothing, evicting LRU cached slots when free ones run out."""
        if count > self.num_available:
            raise AdmissionRejected(
                f"{self.noun} pool exhausted: need {count}, free {self.num_free}, "
                f"evictable {self.num_cached} (total {self.num_slots}, "
                f"referenced {self.num_referenced}, in transfer {self.num_raw})"
            )
        return [self._take_one() for _ in range(count)]

    def _take_one(self) -> int:
        if self._free:
            return self._free.popitem()[0]
        return self._evict_lru()

    def _evict_lru(self) -> int:
        slot, _ = self._lru.popitem(last=False)
        key = self._key_of.pop(slot)
        del self._slot_of[key]
        self.num_evictions += 1
        if self.on_evict is not None:
            self.on_evict(key)
        return slot

    def evict_one(self) -> bool:
        """Evict the least recently used cached slot to the free list (a capacity bound).
        Returns False when nothing is cached."""
        if not self._lru:
            return False
        self._free[self._evict_lru()] = None
        return True

    def take_keyed(self, keys: Iterable[K]) -> list[int]:
        """One pending slot per key (refcount 1), all or nothing; commit each after writing it."""
        key_list = list(keys)
        slots = self._take(len(key_list))
        for slot, key in zip(slots, key_list, strict=True):
            self._refcount[slot] = 1
            self._key_of[slot] = key
            self._pending.add(slot)
        return slots

    def commit(self, slot: int) -> bool:
        """Make a pending slot matchable. False if its key was committed meanwhile by another slot:
        this one then stays referenced but unkeyed and is freed on its last release."""
        if slot not in self._pending:
            raise ValueError(
                f"{self.noun} {slot} is not pending (never taken, or already committed)"
            )
        self._pending.discard(slot)
        key = self._key_of[slot]
        if key in self._slot_of:
            del self._key_of[slot]
            return False
        self._slot_of[key] = slot
        return True

    def acquire(self, key: K) -> int | None:
        """The committed slot under ``key`` with one more reference, or None if not cached."""
        slot = self._slot_of.get(key)
        if slot is None:
            return None
        self._lru.pop(slot, None)
        self._refcount[slot] = self._refcount.get(slot, 0) + 1
        return slot

    def release(self, slot: int) -> None:
        """Drop one reference. At zero a committed slot becomes most-recently-used cached; a
        pending or unkeyed one is freed. Raises ValueError if ``slot`` holds no reference."""
        count = self._refcount.get(slot)
        if count is None:
            raise ValueError(f"{self.noun} {slot} is not referenced (double release?)")
        if count > 1:
            self._refcount[slot] = count - 1
            return
        del self._refcount[slot]
        if slot in self._pending:
            self._pending.discard(slot)
            del self._key_of[slot]
            self._free[slot] = None
        elif slot in self._key_of:
            self._lru[slot] = None
        else:
            self._free[slot] = None

    def take_raw(self, count: int) -> list[int]:
        """``count`` unkeyed, unmatchable slots, all or nothing."""
        slots = self._take(count)
        self._raw.update(slots)
        return slots

    def key_raw(self, slot: int, key: K) -> bool:
        """Name a raw slot whose bytes are now final: it becomes referenced (refcount 1) and
        committed under ``key``, as if taken keyed and committed. False if ``key`` is already
        committed elsewhere: the slot then stays referenced but unkeyed (freed on release)."""
        if slot not in self._raw:
            raise ValueError(f"{self.noun} {slot} is not raw")
        self._raw.discard(slot)
        self._refcount[slot] = 1
        if key in self._slot_of:
            return False
        self._key_of[slot] = key
        self._slot_of[key] = slot
        return True

    def give_raw(self, slots: Iterable[int]) -> None:
        """Free raw slots taken with :meth:`take_raw`."""
        for slot in slots:
            self._raw.remove(slot)
            self._free[slot] = None

    # ---- invariants ----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError unless every slot is in exactly one state and the maps agree."""
        groups = [set(self._free), set(self._lru), set(self._refcount), self._raw]
        total = sum(len(g) for g in groups)
        union = set().union(*groups)
        if total != self.num_slots or union != set(range(self.num_slots)):
            raise AssertionError(f"{self.noun} partition broken: {total} placements")
        if any(c < 1 for c in self._refcount.values()):
            raise AssertionError(f"{self.noun} refcount < 1 recorded")
        if not self._pending <= set(self._refcount):
            raise AssertionError(f"{self.noun} pending slot without a reference")
        for key, slot in self._slot_of.items():
            if self._key_of.get(slot) != key or slot in self._pending:
                raise AssertionError(f"{self.noun} {slot}: key maps disagree")
        committed = set(self._slot_of.values())
        if set(self._lru) - committed or set(self._key_of) != committed | self._pending:
            raise AssertionError(f"{self.noun} cached slots and keys disagree")
