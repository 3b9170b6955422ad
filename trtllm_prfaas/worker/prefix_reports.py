"""What a worker tells its routers about its prefix cache (issue 15): the mode in its
``WorkerInfo``, the counters in its load reports, and with each report its engine's KV cache
events, or to a router that is new to it or pinged it, the engine's snapshot.

- ``WorkerInfo.prefix_cache``: ``"events"`` (block reuse on: the engine's events are sent),
  ``"approximate"`` (a Triton worker: TensorRT-LLM reuses blocks inside Triton and no events
  reach this process, so routers guess from their own routing), ``""`` (block reuse off).
- Events: drained after each report and split into messages of at most
  ``MAX_KV_EVENTS_PER_MESSAGE`` (the ids run on across them; only the first carries the dropped
  count), sent to every router in sync. A router owed a snapshot (``owe_snapshot``) gets the
  snapshot taken right after that drain instead, so the next batch it gets starts at the
  snapshot's ``next_event_id``.

No I/O here: ``messages`` says what goes to whom and the server sends it, on the thread that
steps the engine (the drain and the snapshot must see the same engine state).
"""

from __future__ import annotations

from collections.abc import Iterator, Set
from typing import Any

from trtllm_prfaas.engines.base import SupportsKvEvents
from trtllm_prfaas.engines.engine import ReferenceEngine
from trtllm_prfaas.engines.prefix_cache import cache_key_for
from trtllm_prfaas.kv.events import KvEventBatch
from trtllm_prfaas.worker import protocol as p
from trtllm_prfaas.worker.assembly import WorkerConfig

__all__ = ["PrefixReporter"]


class PrefixReporter:
    """One worker's prefix-cache reporting; ``owe_snapshot`` from the control plane,
    ``messages`` with each load report."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._unsynced: set[bytes] = set()  # routers owed a snapshot before further events

    def info_fields(self) -> tuple[str, str, str]:
        """``WorkerInfo``'s ``prefix_cache``, ``kv_layout``, ``kv_dtype``."""
        if self.config.triton is not None:
            return "approximate", "", ""
        if not self.config.engine.enable_block_reuse:
            return "", "", ""
        key = cache_key_for(self.config.engine.model)
        return "events", key.layout, key.dtype

    @staticmethod
    def counters(engine: Any) -> dict[str, int]:
        """The load report's prefix-cache counters (none for an engine without that cache)."""
        if not isinstance(engine, ReferenceEngine) or engine.prefix_cache is None:
            return {}
        cache = engine.prefix_cache.stats
        return {
            "num_prefix_queries": cache.num_queries,
            "num_prefix_query_tokens": cache.num_query_tokens,
            "num_prefix_reused_tokens": cache.num_reused_tokens,
            "num_cached_blocks": engine.blocks.num_cached,
            "num_block_evictions": engine.blocks.num_evictions,
        }

    def owe_snapshot(self, identity: bytes) -> None:
        """Router ``identity`` is new to this worker, or pinged it (it joined, reconnected or
        lost events): its next ``KvEvents`` is the snapshot."""
        self._unsynced.add(identity)

    def messages(self, engine: Any, routers: Set[bytes]) -> Iterator[tuple[Set[bytes], p.KvEvents]]:
        """Drain the engine's events: each message and the routers it goes to."""
        unsynced, self._unsynced = self._unsynced, set()
        if not isinstance(engine, SupportsKvEvents) or not self.config.engine.enable_block_reuse:
            return
        worker_id = self.config.worker_id
        batch = engine.drain_kv_events()
        synced = routers - unsynced
        step = p.MAX_KV_EVENTS_PER_MESSAGE
        for start in range(0, max(len(batch.events), 1 if batch.dropped else 0), step):
            part = KvEventBatch(batch.events[start : start + step], 0 if start else batch.dropped)
            yield synced, p.KvEvents(worker_id, batch=part)
        if unsynced:
            yield unsynced, p.KvEvents(worker_id, snapshot=engine.kv_events_snapshot())
