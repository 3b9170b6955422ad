"""KV cache events: what an engine's prefix cache stored and removed, in TensorRT-LLM's shape.

A router keeps a global prefix index (``router/prefix_index.py``) from these events, as
TensorRT-LLM users do with ``LLM.get_kv_cache_events()``. The shapes follow upstream's
``executor.h`` (``KVCacheCreatedData``, ``KVCacheStoredData`` with ``parentHash`` and a chain of
``KVCacheStoredBlockData``, ``KVCacheRemovedData`` with ``blockHashes``) and the dicts
``tensorrt_llm/_utils.py`` ``KVCacheEventSerializer`` makes of them (``{"event_id", "data":
{"type": "stored" | "removed" | "created", ...}, "window_size"}``); the buffer follows
``cpp/tensorrt_llm/batch_manager/kvCacheEventManager.cpp``: event ids count up from 0, removals
of consecutive blocks batch into one event, and a full buffer discards the OLDEST events
(upstream logs a warning; here the discarded count is also kept and handed to the consumer).

Two event types are this project's own, for hybrid models: ``state_stored`` / ``state_removed``
name the recurrent-state snapshots an engine keeps (by the hash of the block they end at), since
a hybrid engine resumes a prefix only where it also has the state after exactly that prefix.
TensorRT-LLM reports no such events (its 1.x hybrid managers turn block reuse off).

Hashes are this project's chained block hashes (:func:`~trtllm_prfaas.kv.hashing.block_hashes`,
under the engine's :class:`~trtllm_prfaas.kv.hashing.CacheKey`), so a router that knows the key
hashes a prompt itself and never needs the tokens: ``StoredBlock.tokens`` stays empty unless the
log was asked to keep them. (TensorRT-LLM's own hashes are a different function; a worker that
relays upstream events must translate them, see ``docs/design/prefix_cache.md``.)

Consumer contract: events are applied in ``event_id`` order. A gap (``dropped`` > 0 in a batch,
or an id that skips) means the consumer's view of that engine is no longer exact: it must drop
what it knows of that engine and rebuild from later events (the index does).

Late consumers: the log also keeps what its events leave matchable (one dict entry per held
block and per state snapshot), and :meth:`KvEventLog.snapshot` gives it as a
:class:`KvSnapshot` (stored chains, parent first; the states; the id of the next event), so a
router that starts after the engine, or that lost the connection, is exact at once instead of
rebuilding from later events. TensorRT-LLM has no such call: its ``KVCacheEventManager``
(``cpp/tensorrt_llm/batch_manager/kvCacheEventManager.cpp``, commit 05843b0, stored copy
2919521072) only drains (``getEvents``), and its first event is ``enqueueCreatedEvent``'s, so
its consumers must see everything from ``created`` on. The snapshot is the project's own, like
the state events.

The worker publishes a :class:`KvEventBatch` as it is (msgspec, plain types) over its control
channel: ``engine.drain_kv_events()`` -> ``msgspec.msgpack.encode(batch)`` -> router ->
``PrefixIndex.apply(node_id, batch)``. Not thread-safe: the engine's thread records and drains.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.telemetry.logging import get_logger

__all__ = [
    "KvCacheCreated",
    "KvCacheEvent",
    "KvCacheRemoved",
    "KvCacheStored",
    "KvEventBatch",
    "KvEventLog",
    "KvSnapshot",
    "KvStateRemoved",
    "KvStateStored",
    "StoredBlock",
]

log = get_logger(__name__)

PRIMARY_LEVEL = 0  # upstream kPrimaryLevel: the device pool


class StoredBlock(msgspec.Struct, frozen=True, gc=False):
    """One block of a stored chain (upstream ``KVCacheStoredBlockData``)."""

    block_hash: int
    num_tokens: int
    tokens: list[int] = []  # empty unless the log keeps tokens
    cache_level: int = PRIMARY_LEVEL
    priority: int = 35  # upstream KvCacheRetentionConfig::kDefaultRetentionPriority


class KvCacheCreated(msgspec.Struct, frozen=True, tag="created"):
    """The cache (re)started empty: forget everything known of this engine."""

    num_blocks_per_cache_level: list[int]


class KvCacheStored(msgspec.Struct, frozen=True, tag="stored"):
    """Blocks became matchable. Block ``i``'s parent is block ``i-1``; the first one's is
    ``parent_hash`` (None: the chain starts at the first block of a prompt)."""

    parent_hash: int | None
    blocks: list[StoredBlock]


class KvCacheRemoved(msgspec.Struct, frozen=True, tag="removed"):
    """Blocks were evicted and are no longer matchable."""

    block_hashes: list[int]


class KvStateStored(msgspec.Struct, frozen=True, tag="state_stored", gc=False):
    """A recurrent-state snapshot after exactly the prefix that ends with ``block_hash``."""

    block_hash: int
    num_tokens: int


class KvStateRemoved(msgspec.Struct, frozen=True, tag="state_removed"):
    """Snapshots evicted (named by the hash of the block each ends at)."""

    block_hashes: list[int]


EventData = KvCacheCreated | KvCacheStored | KvCacheRemoved | KvStateStored | KvStateRemoved


class KvCacheEvent(msgspec.Struct, frozen=True):
    event_id: int
    data: EventData
    window_size: int = 0  # upstream's attention window; 0 here: one full-attention window

    def to_trtllm_dict(self) -> dict[str, Any]:
        """The dict ``LLM.get_kv_cache_events()`` returns for the same event."""
        data: dict[str, Any]
        if isinstance(self.data, KvCacheStored):
            data = {
                "type": "stored",
                "parent_hash": self.data.parent_hash,
                "blocks": [
                    {
                        "type": "stored_block",
                        "block_hash": b.block_hash,
                        "tokens": [
                            {"type": "unique_token", "token_id": t, "token_extra_id": 0}
                            for t in b.tokens
                        ],
                        "cache_level": b.cache_level,
                        "priority": b.priority,
                    }
                    for b in self.data.blocks
                ],
            }
        elif isinstance(self.data, KvCacheRemoved):
            data = {"type": "removed", "block_hashes": list(self.data.block_hashes)}
        elif isinstance(self.data, KvStateStored):  # no upstream equivalent (see above)
            data = {
                "type": "state_stored",
                "block_hash": self.data.block_hash,
                "num_tokens": self.data.num_tokens,
            }
        elif isinstance(self.data, KvStateRemoved):
            data = {"type": "state_removed", "block_hashes": list(self.data.block_hashes)}
        else:
            data = {
                "type": "created",
                "num_blocks_per_cache_level": list(self.data.num_blocks_per_cache_level),
            }
        return {"event_id": self.event_id, "data": data, "window_size": self.window_size}


class KvEventBatch(msgspec.Struct, frozen=True):
    """What one drain returns: the events in order, and how many were discarded (oldest
    first) since the previous drain because the buffer was full."""

    events: list[KvCacheEvent]
    dropped: int = 0


class KvSnapshot(msgspec.Struct, frozen=True):
    """What an engine holds, as of just before event ``next_event_id``: the stored chains (a
    chain's parent comes earlier in the list or is None) and the state snapshots. A consumer
    replaces its view of the engine with it and expects ``next_event_id`` next."""

    stored: list[KvCacheStored]
    states: list[KvStateStored]
    next_event_id: int


class KvEventLog:
    """A bounded buffer of KV cache events (upstream ``KVCacheEventManager``).

    ``max_events`` bounds memory: past it the oldest events are discarded and counted
    (``num_dropped`` in total, ``dropped`` in the next batch). ``keep_tokens`` stores each
    block's tokens in its event (upstream always does; the router does not need them)."""

    def __init__(self, max_events: int, keep_tokens: bool = False) -> None:
        if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
            raise ConfigError(f"KvEventLog.max_events must be an int >= 1, got {max_events!r}")
        self.max_events = max_events
        self.keep_tokens = keep_tokens
        self._events: deque[KvCacheEvent] = deque()
        self._next_id = 0
        self._dropped_since_drain = 0
        self.num_dropped = 0
        self.num_recorded = 0
        # what the events leave matchable, for snapshot()
        self._held: dict[int, tuple[int | None, int]] = {}  # hash -> (parent, num_tokens)
        self._states: dict[int, int] = {}  # hash of the block a snapshot ends at -> num_tokens

    def __len__(self) -> int:
        return len(self._events)

    def record_created(self, num_blocks: int) -> None:
        self._held.clear()
        self._states.clear()
        self._append(KvCacheCreated([num_blocks]))

    def record_stored(
        self,
        parent_hash: int | None,
        block_hashes: Sequence[int],
        tokens_per_block: int,
        tokens: Sequence[int] = (),
    ) -> None:
        """A chain of newly matchable blocks; ``tokens`` are the chain's own tokens (only kept
        with ``keep_tokens``)."""
        if not block_hashes:
            return
        blocks = []
        parent = parent_hash
        for i, block_hash in enumerate(block_hashes):
            own = list(tokens[i * tokens_per_block : (i + 1) * tokens_per_block])
            blocks.append(
                StoredBlock(block_hash, tokens_per_block, own if self.keep_tokens else [])
            )
            self._held[block_hash] = (parent, tokens_per_block)
            parent = block_hash
        self._append(KvCacheStored(parent_hash, blocks))

    def record_removed(self, block_hash: int) -> None:
        """One evicted block; joins the previous event when that one is a removal (upstream)."""
        self._held.pop(block_hash, None)
        last = self._events[-1] if self._events else None
        if last is not None and isinstance(last.data, KvCacheRemoved):
            last.data.block_hashes.append(block_hash)
            return
        self._append(KvCacheRemoved([block_hash]))

    def record_state_stored(self, block_hash: int, num_tokens: int) -> None:
        self._states[block_hash] = num_tokens
        self._append(KvStateStored(block_hash, num_tokens))

    def record_state_removed(self, block_hash: int) -> None:
        self._states.pop(block_hash, None)
        last = self._events[-1] if self._events else None
        if last is not None and isinstance(last.data, KvStateRemoved):
            last.data.block_hashes.append(block_hash)
            return
        self._append(KvStateRemoved([block_hash]))

    def drain(self) -> KvEventBatch:
        """Every buffered event, oldest first, and the count discarded since the last drain."""
        batch = KvEventBatch(list(self._events), self._dropped_since_drain)
        self._events.clear()
        self._dropped_since_drain = 0
        return batch

    def snapshot(self) -> KvSnapshot:
        """What the recorded events leave matchable, as of the next event id: every held block
        reachable from a prompt's first block through held parents (the others cannot be
        matched), parent first, one ``stored`` entry per run of a chain. Exact for a consumer
        that has applied nothing else when taken right after :meth:`drain` (what the worker
        does). Costs O(held blocks)."""
        # parent -> its child, or its children where a chain branches (a list per block would
        # be 80K lists for 80K blocks, and the collector's passes over them cost more than
        # the walk)
        children: dict[int | None, int | list[int]] = {}
        for block_hash, (parent, _) in self._held.items():
            have = children.get(parent)
            if have is None:
                children[parent] = block_hash
            elif isinstance(have, list):
                have.append(block_hash)
            else:
                children[parent] = [have, block_hash]
        stored: list[KvCacheStored] = []
        starts = _listed(children.get(None))[::-1]
        while starts:
            block_hash = starts.pop()
            run = KvCacheStored(self._held[block_hash][0], [])
            while True:
                run.blocks.append(StoredBlock(block_hash, self._held[block_hash][1]))
                below = children.get(block_hash)
                if below is None:
                    break
                if isinstance(below, list):  # no list per block on this path: see above
                    starts.extend(reversed(below[1:]))  # after this run, whose blocks are parents
                    below = below[0]
                block_hash = below
            stored.append(run)
        states = [KvStateStored(h, n) for h, n in self._states.items()]
        return KvSnapshot(stored, states, self._next_id)

    def _append(self, data: EventData) -> None:
        self._events.append(KvCacheEvent(self._next_id, data))
        self._next_id += 1
        self.num_recorded += 1
        if len(self._events) > self.max_events:
            self._events.popleft()
            self.num_dropped += 1
            self._dropped_since_drain += 1
            if self._dropped_since_drain == 1:
                log.warning("kv_events_dropped", max_events=self.max_events)


def _listed(children: int | list[int] | None) -> list[int]:
    """A ``snapshot`` children entry as a list (one child is kept bare, not in a list)."""
    return [] if children is None else children if isinstance(children, list) else [children]
