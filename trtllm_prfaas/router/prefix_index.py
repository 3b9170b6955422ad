"""The global prefix index: which node holds how much of a prompt, per node and per cluster.

The paper's global KV-cache manager. It is fed by the KV cache events each worker's engine
records (``kv/events.py``: chained block hashes stored and removed, TensorRT-LLM's shape) and
answers, for a prompt's block hashes, "how many leading tokens does node N hold" and "which node
of cluster C holds the most".

Exact nodes (fed by events). Per node the index keeps the blocks it can reach from a prompt's
first block: a stored chain whose parent the node does not hold is unreachable and ignored
(counted), and removing a block removes everything stored below it. So what a node holds is
closed under prefixes, and since a chained hash names its whole prefix, "node holds block k"
implies "node holds blocks 0..k": the longest held prefix is found by binary search over the
prompt's hashes, ``O(log n)`` dictionary probes (12 for a 128K-token prompt in 32-token blocks).
A gap in a node's event ids, a batch that reports dropped events, or a ``created`` event means
the view is no longer exact: the node's entries are cleared (``num_resyncs``) and rebuilt from
later events, so the index under-reports rather than over-reports. A router that starts after
the engine (or reconnects to it) gets the engine's snapshot (``kv/events.py`` ``KvSnapshot``)
first and loads it (``load_snapshot``, ``num_snapshots``): exact from then on.

Approximate nodes (``approximate=True``; engines that cannot report events, such as a Triton
``llmapi`` worker). The router records each prompt it routes there (``record_routed``) and the
index assumes the node holds those blocks for ``ttl_s`` after the last use, at most
``max_approx_blocks`` per node (least recently used first out, a chain's tail before its head).
Their answers carry ``is_approximate=True`` and ``stats()`` counts them apart.

Hybrid models (``requires_states=True``): an engine resumes a prefix only where it also holds
the recurrent state after exactly that prefix, so exact nodes also track the snapshots they
report (``state_stored`` / ``state_removed`` events) and a match ends at the longest held prefix
that has one (a step back from the block match, usually zero steps: engines keep a snapshot at
every prompt's last block boundary). Approximate nodes assume one wherever they hold blocks.

Time is passed in (``now``), as in ``policy/``; the index does no I/O. Not thread-safe: the
router's event loop owns it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.kv.events import (
    KvCacheCreated,
    KvCacheRemoved,
    KvCacheStored,
    KvEventBatch,
    KvSnapshot,
    KvStateRemoved,
    KvStateStored,
)
from trtllm_prfaas.kv.hashing import CacheKey, block_hashes

__all__ = ["PrefixIndex", "PrefixIndexStats", "PrefixMatch"]


@dataclass(frozen=True)
class PrefixMatch:
    node_id: str
    num_blocks: int
    num_tokens: int
    is_approximate: bool


@dataclass
class PrefixIndexStats:
    """Counters a user would watch (the router exports them as metrics)."""

    num_lookups: int = 0
    num_approximate_lookups: int = 0  # lookups answered from routing history
    num_events: int = 0
    num_resyncs: int = 0  # a node's view cleared after a gap, dropped events or a restart
    num_snapshots: int = 0  # a node's view replaced by its engine's snapshot (a late router)
    num_unreachable_blocks: int = 0  # stored under a parent the node did not hold
    num_expired_blocks: int = 0  # approximate entries past their ttl
    blocks_per_node: dict[str, int] = field(default_factory=dict)


class _ExactNode:
    """What one node reported: reachable block hash -> its index in the chain."""

    is_approximate = False

    def __init__(self, cluster_id: str) -> None:
        self.cluster_id = cluster_id
        self.depth: dict[int, int] = {}
        self.children: dict[int, set[int]] = {}
        self.states: set[int] = set()  # hashes of blocks a state snapshot ends at
        self.next_event_id: int | None = None  # None: the next id is unknown, take any

    def clear(self) -> None:
        self.depth.clear()
        self.children.clear()
        self.states.clear()

    def store(self, parent: int | None, hashes: Sequence[int]) -> int:
        """Add a chain below ``parent``; returns the number of blocks left unreachable."""
        if parent is None:
            level = 0
        elif parent in self.depth:
            level = self.depth[parent] + 1
        else:
            return len(hashes)
        for block_hash in hashes:
            if block_hash not in self.depth:
                self.depth[block_hash] = level
                if parent is not None:
                    self.children.setdefault(parent, set()).add(block_hash)
            parent, level = block_hash, level + 1
        return 0

    def remove(self, block_hash: int) -> None:
        """Forget a block and everything stored below it (no longer reachable)."""
        stack = [block_hash]
        while stack:
            current = stack.pop()
            if self.depth.pop(current, None) is not None:
                stack.extend(self.children.pop(current, ()))

    def holds(self, hashes: Sequence[int], index: int, now: float) -> bool:
        return self.depth.get(hashes[index]) == index

    def __len__(self) -> int:
        return len(self.depth)


class _ApproxNode:
    """Prompts routed to one node, assumed cached until their expiry (LRU order = expiry)."""

    is_approximate = True

    def __init__(self, cluster_id: str, ttl_s: float, max_blocks: int) -> None:
        self.cluster_id, self.ttl_s, self.max_blocks = cluster_id, ttl_s, max_blocks
        self.expiry: OrderedDict[int, float] = OrderedDict()  # oldest first
        self.num_expired = 0

    def record(self, hashes: Sequence[int], now: float) -> None:
        until = now + self.ttl_s
        for block_hash in reversed(hashes):  # head last: most recent, evicted last
            self.expiry[block_hash] = until
            self.expiry.move_to_end(block_hash)
        while len(self.expiry) > self.max_blocks:
            self.expiry.popitem(last=False)

    def expire(self, now: float) -> None:
        while self.expiry:
            block_hash, until = next(iter(self.expiry.items()))
            if until > now:
                return
            del self.expiry[block_hash]
            self.num_expired += 1

    def holds(self, hashes: Sequence[int], index: int, now: float) -> bool:
        until = self.expiry.get(hashes[index])
        return until is not None and until > now

    def __len__(self) -> int:
        return len(self.expiry)


_Node = _ExactNode | _ApproxNode


class PrefixIndex:
    """Per-node, per-cluster prefix holdings for one model (one ``CacheKey``, one block size)."""

    def __init__(
        self,
        key: CacheKey,
        tokens_per_block: int,
        ttl_s: float = 300.0,
        max_approx_blocks: int = 1 << 20,
        requires_states: bool = False,
    ) -> None:
        if tokens_per_block < 1 or ttl_s <= 0 or max_approx_blocks < 1:
            raise ConfigError(
                f"PrefixIndex needs tokens_per_block >= 1, ttl_s > 0, max_approx_blocks >= 1; got "
                f"{tokens_per_block}, {ttl_s}, {max_approx_blocks}"
            )
        self.key, self.tokens_per_block = key, tokens_per_block
        self.ttl_s, self.max_approx_blocks = ttl_s, max_approx_blocks
        self.requires_states = requires_states
        self._nodes: dict[str, _Node] = {}
        self._stats = PrefixIndexStats()

    # ---- membership ----------------------------------------------------------------------------

    def add_node(self, node_id: str, cluster_id: str, approximate: bool = False) -> None:
        """Track a node (again: its view starts empty). ``approximate``: it reports no events."""
        self._nodes[node_id] = (
            _ApproxNode(cluster_id, self.ttl_s, self.max_approx_blocks)
            if approximate
            else _ExactNode(cluster_id)
        )

    def remove_node(self, node_id: str) -> None:
        self._nodes.pop(node_id, None)

    def is_approximate(self, node_id: str) -> bool:
        return self._node(node_id).is_approximate

    # ---- feeding -------------------------------------------------------------------------------

    def hashes_for(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The block hashes an engine could reuse for this prompt: full blocks of all but its
        last token (the last prompt token is always computed). Hash once per request."""
        return block_hashes(prompt_token_ids[:-1], self.tokens_per_block, self.key)

    def apply(self, node_id: str, batch: KvEventBatch) -> bool:
        """Apply one drained batch of an exact node's events, in order; True if events were
        lost (the view was cleared: the engine's snapshot would make it exact again)."""
        node = self._exact_node(node_id)
        lost = bool(batch.dropped)
        if batch.dropped:
            self._resync(node)
            node.next_event_id = None  # the batch starts after the loss
        for event in batch.events:
            if node.next_event_id is not None and event.event_id != node.next_event_id:
                lost = True
                self._resync(node)
            node.next_event_id = event.event_id + 1
            self._stats.num_events += 1
            data = event.data
            if isinstance(data, KvCacheStored):
                hashes = [block.block_hash for block in data.blocks]
                self._stats.num_unreachable_blocks += node.store(data.parent_hash, hashes)
            elif isinstance(data, KvCacheRemoved):
                for block_hash in data.block_hashes:
                    node.remove(block_hash)
            elif isinstance(data, KvStateStored):
                node.states.add(data.block_hash)
            elif isinstance(data, KvStateRemoved):
                node.states.difference_update(data.block_hashes)
            elif isinstance(data, KvCacheCreated):
                node.clear()
        return lost

    def load_snapshot(self, node_id: str, snapshot: KvSnapshot) -> None:
        """Replace what an exact node is known to hold with its engine's snapshot (a router
        that started after the engine, or reconnected); its events go on from the snapshot's
        ``next_event_id``."""
        node = self._exact_node(node_id)
        node.clear()
        for stored in snapshot.stored:
            hashes = [block.block_hash for block in stored.blocks]
            self._stats.num_unreachable_blocks += node.store(stored.parent_hash, hashes)
        node.states.update(state.block_hash for state in snapshot.states)
        node.next_event_id = snapshot.next_event_id
        self._stats.num_snapshots += 1

    def _exact_node(self, node_id: str) -> _ExactNode:
        node = self._node(node_id)
        if not isinstance(node, _ExactNode):
            raise ConfigError(f"node {node_id!r} is approximate: it takes no KV cache events")
        return node

    def _resync(self, node: _ExactNode) -> None:
        node.clear()
        self._stats.num_resyncs += 1

    def record_routed(self, node_id: str, hashes: Sequence[int], now: float) -> None:
        """An approximate node was given a prompt with these block hashes at ``now``."""
        node = self._node(node_id)
        if isinstance(node, _ApproxNode):
            node.record(hashes, now)

    # ---- queries -------------------------------------------------------------------------------

    def match(self, node_id: str, hashes: Sequence[int], now: float) -> PrefixMatch:
        """How much of the prompt (its ``hashes_for``) node ``node_id`` holds."""
        node = self._node(node_id)
        self._stats.num_lookups += 1
        if isinstance(node, _ApproxNode):
            self._stats.num_approximate_lookups += 1
            node.expire(now)
        num_blocks = _held_prefix(node, hashes, now)
        if self.requires_states and isinstance(node, _ExactNode):
            while num_blocks and hashes[num_blocks - 1] not in node.states:
                num_blocks -= 1
        return PrefixMatch(
            node_id, num_blocks, num_blocks * self.tokens_per_block, node.is_approximate
        )

    def best_in_cluster(
        self, cluster_id: str, hashes: Sequence[int], now: float
    ) -> PrefixMatch | None:
        """The node of ``cluster_id`` holding the longest prefix (the cache-affine node; the
        first added wins a tie), or None when the cluster has no node."""
        best: PrefixMatch | None = None
        for node_id, node in self._nodes.items():
            if node.cluster_id == cluster_id:
                found = self.match(node_id, hashes, now)
                if best is None or found.num_blocks > best.num_blocks:
                    best = found
        return best

    def stats(self) -> PrefixIndexStats:
        self._stats.blocks_per_node = {node_id: len(n) for node_id, n in self._nodes.items()}
        self._stats.num_expired_blocks = sum(
            n.num_expired for n in self._nodes.values() if isinstance(n, _ApproxNode)
        )
        return self._stats

    def _node(self, node_id: str) -> _Node:
        node = self._nodes.get(node_id)
        if node is None:
            raise ConfigError(f"prefix index: unknown node {node_id!r}")
        return node


def _held_prefix(node: _Node, hashes: Sequence[int], now: float) -> int:
    """Largest k with blocks 0..k-1 held. Holdings are prefix-closed (see the module
    docstring), so ``holds`` is monotone along the chain: binary search."""
    low, high = 0, len(hashes)  # invariant: blocks < low held; block high (if any) not held
    while low < high:
        mid = (low + high + 1) // 2  # test the block mid-1
        if node.holds(hashes, mid - 1, now):
            low = mid
        else:
            high = mid - 1
    return low
