"""Which workers' prefix caches the router follows, and how: the live side of the prefix index.

``router/prefix_index.py`` answers "how much of this prompt does node N hold" for one
``CacheKey`` and block size. This module decides what goes into it, from each worker's
``WorkerInfo.prefix_cache`` (``worker/protocol.py``):

- ``"events"``: the worker's engine reports its KV cache events (``KvEvents``); it is an exact
  node, fed by ``apply``. Its blocks' key is ``CacheKey(model_id, kv_layout, kv_dtype, 0)`` with
  its ``tokens_per_block``: the router hashes prompts under the same key, so the hashes match the
  worker's by construction (tested). The first such worker fixes the index's key; a worker
  whose key or block size differs is not followed (logged once; it counts as holding nothing).
  A hybrid model (``kv_state_bytes > 0``: recurrent state) makes the index require a state
  snapshot where a match ends (``PrefixIndex(requires_states=True)``), as the engine does.
- ``"approximate"``: the worker reuses blocks but reports nothing (TensorRT-LLM inside Triton);
  the index keeps what the router sent it (``record_routed``) for ``ttl_s`` and says so.
- ``""``: no prefix cache (block reuse off): it reuses nothing, so it is not followed and its
  prefix is 0 for every prompt.

Membership follows the cluster state: a worker is followed from ``add`` (it joined, or came back
with a new ``WorkerInfo`` after a role change or a restart: its cache starts empty, as the
engine's does) until ``remove`` (it left, or was lost). Until the first followed worker joins
there is no index, and a prompt is not hashed (``hashes_for`` returns ``[]``).

Cache-blind (``is_blind``, the router's ``prefix_routing: false``): everything above still
runs (the index follows the workers, its metrics count), but ``prefix_tokens`` answers 0 for
every node, so routing is what a router that knows nothing of caches would do, in front of
workers whose caches stay on. ``bench/prefix.py`` measures cache-aware against it.

Plain data, time passed in, no I/O; the router's event loop owns it.
"""

from __future__ import annotations

from collections.abc import Sequence

from trtllm_prfaas.kv.hashing import CacheKey
from trtllm_prfaas.router.prefix_index import PrefixIndex, PrefixIndexStats
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.worker import protocol as p

__all__ = ["APPROXIMATE", "EVENTS", "PrefixTracker", "cache_key_of"]

log = get_logger(__name__)

EVENTS = "events"
APPROXIMATE = "approximate"
_APPROX_LAYOUT = "approximate"  # an index of approximate nodes only: the router's own key


def cache_key_of(info: p.WorkerInfo) -> CacheKey:
    """The key an ``"events"`` worker names its blocks under (``engines.prefix_cache``)."""
    return CacheKey(info.model_id, info.kv_layout, info.kv_dtype, tp_rank=0)


class PrefixTracker:
    """One ``PrefixIndex`` for the router's model, its members, and its counters."""

    def __init__(self, ttl_s: float = 300.0, is_blind: bool = False) -> None:
        self.ttl_s = ttl_s
        self.is_blind = is_blind  # route as if no node held any prefix (the index still runs)
        if is_blind:
            log.info("prefix_routing_off", why="cache-blind: every node's prefix counts as 0")
        self.index: PrefixIndex | None = None
        self._modes: dict[str, tuple[str, str]] = {}  # followed worker -> (mode, cluster)
        self.num_events_ignored = 0  # KvEvents from workers not followed (a key mismatch)
        self.wants_snapshot: set[str] = set()  # exact workers whose events were lost since

    def __contains__(self, name: str) -> bool:
        return name in self._modes

    def add(self, name: str, info: p.WorkerInfo) -> bool:
        """Follow worker ``name`` from now on, its view empty; True if it is followed."""
        self.remove(name)
        mode = info.prefix_cache
        if mode not in (EVENTS, APPROXIMATE):
            return False
        if not self._fits(name, info):
            return False
        assert self.index is not None
        self.index.add_node(name, info.cluster, approximate=mode == APPROXIMATE)
        self._modes[name] = (mode, info.cluster)
        return True

    def remove(self, name: str) -> None:
        self.wants_snapshot.discard(name)
        if self._modes.pop(name, None) is not None and self.index is not None:
            self.index.remove_node(name)

    def _fits(self, name: str, info: p.WorkerInfo) -> bool:
        """Make or keep the index so that it can hold ``info``'s worker."""
        index = self.index
        exact = info.prefix_cache == EVENTS
        if index is None or (exact and not self._has_exact()):
            self._rebuild(info if exact else None, info.model_id, info.tokens_per_block)
            return True
        if not exact:
            return True  # its entries are the router's own hashes, under whatever key
        if cache_key_of(info) == index.key and info.tokens_per_block == index.tokens_per_block:
            return True
        log.warning("prefix_cache_not_followed", worker=name, key=str(cache_key_of(info)),
                    tokens_per_block=info.tokens_per_block, index_key=str(index.key),
                    index_tokens_per_block=index.tokens_per_block)  # fmt: skip
        return False

    def _has_exact(self) -> bool:
        return any(mode == EVENTS for mode, _ in self._modes.values())

    def _rebuild(self, info: p.WorkerInfo | None, model_id: str, tokens_per_block: int) -> None:
        """A new index: the first exact worker's key (approximate members restart empty)."""
        key = cache_key_of(info) if info else CacheKey(model_id, _APPROX_LAYOUT, "", 0)
        hybrid = info is not None and info.kv_state_bytes > 0  # resumes only at a snapshot
        self.index = PrefixIndex(key, tokens_per_block, ttl_s=self.ttl_s, requires_states=hybrid)
        for name, (mode, cluster) in self._modes.items():
            self.index.add_node(name, cluster, approximate=mode == APPROXIMATE)

    # ---- feeding -------------------------------------------------------------------------------

    def apply(self, name: str, message: p.KvEvents) -> bool:
        """Apply a worker's snapshot, then its events; False (counted) if it is not followed as
        an exact node."""
        mode = self._modes.get(name)
        if (
            mode is None
            or mode[0] != EVENTS
            or (message.batch is None and message.snapshot is None)
        ):
            self.num_events_ignored += 1
            return False
        assert self.index is not None
        if message.snapshot is not None:
            self.index.load_snapshot(name, message.snapshot)
            self.wants_snapshot.discard(name)
        if message.batch is not None and self.index.apply(name, message.batch):
            self.wants_snapshot.add(name)  # events were lost: the router asks for a snapshot
        return True

    def record_routed(self, names: Sequence[str], hashes: Sequence[int], now: float) -> None:
        """The router sent a prompt with these hashes to ``names`` (approximate nodes keep it)."""
        if self.index is None or not hashes:
            return
        for name in dict.fromkeys(names):
            if name in self._modes:
                self.index.record_routed(name, hashes, now)

    # ---- queries -------------------------------------------------------------------------------

    def hashes_for(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The prompt's reusable block hashes (all but its last token), or [] with no index.
        Costs one xxh64 per block (8.5 ms at 128K tokens): call it once per request."""
        if self.index is None or not self._modes:
            return []
        return self.index.hashes_for(prompt_token_ids)

    def prefix_tokens(self, name: str, hashes: Sequence[int], now: float) -> int:
        """How many leading prompt tokens worker ``name`` holds (0 if it is not followed, and
        for every node when the router is cache-blind)."""
        if self.is_blind or not hashes or name not in self._modes:
            return 0
        assert self.index is not None
        return self.index.match(name, hashes, now).num_tokens

    def is_approximate(self, name: str) -> bool:
        mode = self._modes.get(name)
        return mode is not None and mode[0] == APPROXIMATE

    def stats(self) -> PrefixIndexStats | None:
        return self.index.stats() if self.index is not None else None
