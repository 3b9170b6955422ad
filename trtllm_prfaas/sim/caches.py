"""Modelled prefix caches for the discrete-event simulator, and the router's index fed from them.

The live system's cache path is: each worker's engine keeps a bounded prefix cache (chained block
hashes, LRU, recurrent-state snapshots for hybrid models: ``engines/prefix_cache.py``), records
what it stores and evicts as KV cache events (``kv/events.py``), and the router's
:class:`~trtllm_prfaas.router.prefix_index.PrefixIndex` follows those events and tells
``policy.route`` how much of each prompt every node holds. The simulator models the same path
with the same pieces: :class:`NodePrefixCache` stands in for one engine's cache (block
granularity, no tensors) and records into a real :class:`~trtllm_prfaas.kv.events.KvEventLog`;
:class:`SimPrefixCaches` drains every node's log into one real ``PrefixIndex`` (time passed
in) and builds each request's :class:`~trtllm_prfaas.policy.placement.NodeView` from the
index's answers, exactly as ``router/cluster.py`` does.

What a node caches, as the engine: the full blocks of a prompt's first ``L - 1`` tokens (its
``hashes_for``, the last prompt token is always computed) once its prefill has finished, and,
for a hybrid model, recurrent-state snapshots at every prefill chunk end (``chunk_tokens`` apart
from where the prefill resumed, as the engine's block-aligned chunks) and where the chain ends
(the engine ends a chunk at ``floor((L - 1) / B) * B`` for this). A match ends only where the
node holds a snapshot (the paper's exact-length rule for linear-attention state); the index
applies the same rule (``requires_states``). Blocks are evicted least recently used first; a
request touches its chain tail first and head last, so a parent is always more recent than its
children and the cache stays closed under prefixes (evicting a block never strands a child).
Snapshots live in their own LRU table (``max_snapshots``) and go with their block.

Not modelled: decode-written blocks (never cached by the engine either), the transfer-cache
blocks (dropped after a transfer), and the decode nodes' caches (the DES's decode tier is a pool
of slots; a relayed hybrid decode keeps no snapshot, so the live index says 0 for it too).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.kv.events import KvEventBatch, KvEventLog
from trtllm_prfaas.kv.hashing import CacheKey
from trtllm_prfaas.policy.placement import NodeView
from trtllm_prfaas.router.prefix_index import PrefixIndex
from trtllm_prfaas.sim.pools import PrefillPool
from trtllm_prfaas.sim.traffic import Trace

__all__ = ["SIM_CACHE_KEY", "CacheModel", "NodePrefixCache", "SimPrefixCaches", "caches_for"]

# The key the simulator's traces hash prompts under (``sim/conversations.py``).
SIM_CACHE_KEY = CacheKey("prfaas-sim", "HND", "bfloat16", 0)
_MAX_EVENTS = 1 << 20  # drained after every store: never reached


@dataclass(frozen=True)
class CacheModel:
    """Per-node prefix caches: ``max_blocks`` blocks of ``tokens_per_block`` tokens each, and
    for a hybrid model (``is_hybrid``) up to ``max_snapshots`` state snapshots (``None``: one
    per cached block at most) taken every ``chunk_tokens`` (the engine's prefill chunk)."""

    max_blocks: int
    tokens_per_block: int = 32
    is_hybrid: bool = True
    max_snapshots: int | None = None
    chunk_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_blocks < 1 or self.tokens_per_block < 1:
            raise ConfigError(
                f"CacheModel needs max_blocks >= 1 and tokens_per_block >= 1, got "
                f"{self.max_blocks} and {self.tokens_per_block}"
            )
        if self.chunk_tokens < 1 or self.chunk_tokens % self.tokens_per_block:
            raise ConfigError(
                f"CacheModel.chunk_tokens {self.chunk_tokens} must be a positive multiple of "
                f"tokens_per_block {self.tokens_per_block}"
            )
        if self.max_snapshots is not None and self.max_snapshots < 1:
            raise ConfigError(f"CacheModel.max_snapshots must be >= 1, got {self.max_snapshots}")


class NodePrefixCache:
    """One node's cache: block hashes in LRU order (oldest first), snapshots, and the events."""

    def __init__(self, model: CacheModel) -> None:
        self.model = model
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.snapshots: OrderedDict[int, None] = OrderedDict()
        self.log = KvEventLog(_MAX_EVENTS)
        self.num_evicted_blocks = 0

    def match_blocks(self, chain: Sequence[int]) -> int:
        """Leading blocks of ``chain`` the node could resume from (a hybrid model: only up to
        the last held block that has a snapshot)."""
        held = self._held(chain)
        if self.model.is_hybrid:
            while held and chain[held - 1] not in self.snapshots:
                held -= 1
        return held

    def store(self, chain: Sequence[int]) -> None:
        """A prefill of a prompt whose reusable blocks are ``chain`` finished here: every block
        is cached (new ones reported ``stored`` under their parent), the chain touched tail
        first, snapshots taken at its chunk ends; then evict down to capacity."""
        if not chain:
            return
        resumed = self.match_blocks(chain)  # where the engine's prefill started
        held = self._held(chain)
        tpb = self.model.tokens_per_block
        if held < len(chain):
            parent = chain[held - 1] if held else None
            self.log.record_stored(parent, chain[held:], tpb)
        for block_hash in reversed(chain):
            self.blocks[block_hash] = None
            self.blocks.move_to_end(block_hash)
        if self.model.is_hybrid:
            step = self.model.chunk_tokens // tpb
            for end in [*range(resumed + step, len(chain), step), len(chain)]:
                self._snapshot(chain[end - 1], end * tpb)
        self._evict()

    def _snapshot(self, block_hash: int, num_tokens: int) -> None:
        if block_hash not in self.snapshots:
            self.log.record_state_stored(block_hash, num_tokens)
        self.snapshots[block_hash] = None
        self.snapshots.move_to_end(block_hash)

    def drain(self) -> KvEventBatch:
        """The events recorded since the last drain (what the worker would publish)."""
        return self.log.drain()

    def _held(self, chain: Sequence[int]) -> int:
        held = 0
        for block_hash in chain:  # prefix-closed: the first miss ends the run
            if block_hash not in self.blocks:
                break
            held += 1
        return held

    def _evict(self) -> None:
        limit = self.model.max_snapshots
        while len(self.blocks) > self.model.max_blocks:
            block_hash, _ = self.blocks.popitem(last=False)  # a leaf (see the module doc)
            self.log.record_removed(block_hash)
            self.num_evicted_blocks += 1
            if block_hash in self.snapshots:
                del self.snapshots[block_hash]
                self.log.record_state_removed(block_hash)
        while limit is not None and len(self.snapshots) > limit:
            block_hash, _ = self.snapshots.popitem(last=False)
            self.log.record_state_removed(block_hash)


class SimPrefixCaches:
    """Every prefill node's modelled cache and the one index fed from their events."""

    def __init__(self, model: CacheModel, key: CacheKey = SIM_CACHE_KEY) -> None:
        self.model = model
        self.index = PrefixIndex(key, model.tokens_per_block, requires_states=model.is_hybrid)
        self.nodes: dict[str, NodePrefixCache] = {}

    def add_node(self, node_id: str, cluster_id: str) -> None:
        """A node joins with an empty cache (as a worker's engine starts)."""
        self.nodes[node_id] = NodePrefixCache(self.model)
        self.index.add_node(node_id, cluster_id)

    def prefill_done(self, node_id: str, chain: Sequence[int]) -> None:
        """``node_id`` finished a prefill: it caches the chain, the index applies its events."""
        node = self.nodes[node_id]
        node.store(chain)
        self.index.apply(node_id, node.drain())

    def prefix_tokens(self, node_id: str, chain: Sequence[int], now: float) -> int:
        """What the router would be told: the index's match for this node."""
        return self.index.match(node_id, chain, now).num_tokens

    def views(
        self, nodes: Iterable[tuple[str, float]], chain: Sequence[int], now: float, rate: float
    ) -> tuple[NodeView, ...]:
        """``NodeView``s of ``(node_id, backlog_s)`` pairs with their indexed prefixes, as the
        live router's ``ClusterState.view`` (every node: the route contract holds trivially)."""
        return tuple(
            NodeView(nid, self.prefix_tokens(nid, chain, now), 0, back, prefill_s_per_token=rate)
            for nid, back in nodes
        )

    def pool_views(
        self, pool: PrefillPool, chain: Sequence[int], now: float, rate: float, blind: bool
    ) -> tuple[NodeView, ...]:
        """Every member node of a simulated pool with its backlog and indexed prefix (``blind``:
        every prefix 0, a cache-blind router). A node the rebalancer added since the last call
        joins with an empty cache."""
        for node_id in pool.node_ids:
            if node_id not in self.nodes:
                self.add_node(node_id, pool.prefix)
        nodes = [
            (nid, max(pool.free_at[k] - now, 0.0))
            for k, nid in enumerate(pool.node_ids)
            if pool.is_member[k]
        ]
        if blind:
            return tuple(NodeView(nid, 0, 0, back, prefill_s_per_token=rate) for nid, back in nodes)
        return self.views(nodes, chain, now, rate)

    @property
    def num_evicted_blocks(self) -> int:
        """Blocks evicted on all nodes."""
        return sum(n.num_evicted_blocks for n in self.nodes.values())


def caches_for(model: CacheModel | None, trace: Trace) -> SimPrefixCaches | None:
    """The simulator's caches for ``trace`` (``None`` without a model); the trace must carry
    token identity in the model's block size."""
    if model is None:
        return None
    if trace.prompt_hashes is None or trace.tokens_per_block != model.tokens_per_block:
        has = "none" if trace.prompt_hashes is None else trace.tokens_per_block
        raise ConfigError(
            f"DesConfig.caches needs a trace with prompt_hashes in blocks of "
            f"{model.tokens_per_block} tokens (sim/conversations.py); this trace has {has}"
        )
    return SimPrefixCaches(model)
