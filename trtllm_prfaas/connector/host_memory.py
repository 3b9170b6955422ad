"""A host-memory KV cache connector: saves blocks and recurrent states, loads them back.

Like TensorRT-LLM's persistent example connector, but over the project's hybrid prefix-cache pool
(:class:`~trtllm_prfaas.kv.pool.HybridPrefixCachePool`) in host memory, and hybrid-aware:

- full prompt blocks are saved layer by layer from ``save_kv_layer`` as prefix-cache blocks
  named by their chained hash, committed in ``wait_for_save``;
- the recurrent state is saved where the engine has it exactly: at every chunk end that is block
  aligned, and at the prompt's end L (with the partial tail block); each entry is reusable only
  on an exact-length match (chunks run as TensorRT-LLM runs them, so no state exists at L-1);
- ``get_num_new_matched_tokens(request, num_computed_tokens=N)`` (no I/O: a dictionary look-up
  in this process) continues from N, the prefix the engine already holds on the device (its own
  block reuse, block aligned; 0 without it): it claims up to the longest M (at most L-1 tokens)
  such that the host holds the full blocks [N/B, M/B) of this prompt's chain and a state
  snapshot of exactly M tokens, pins them, and returns ``(M - N, False)``: ``start_load_kv``
  copies those blocks (and the state) in synchronously, below the device-held ones untouched.
  This is the second tier, as TensorRT-LLM's KVBM offload stacks on its device block reuse:
  what the device evicted (LRU) but the host kept comes back from host memory, not recomputed.
- a save sends each completed block the host does not already hold (device-reused and loaded
  blocks are usually there: they are only touched, refreshing their LRU position, so the host
  keeps the whole chain); a block the host lost meanwhile is saved again from the device.

So a repeat of a prompt computes only what follows its last block-aligned chunk end, and a
follow-up turn that extends an earlier prompt (multi-turn chat) claims that whole earlier prompt;
tokens stay identical to a run without the connector. :class:`HostTierStats` counts queries,
hits and the tokens claimed beyond the device tier.
Both halves share one :class:`HostKVStore` passed in ``llm_args.connector_options["store"]``
(one process, tensor parallelism 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from trtllm_prfaas.connector.base import (
    ConnectorPair,
    KvCacheConnectorScheduler,
    KvCacheConnectorWorker,
    RecurrentStates,
    SchedulerOutput,
    SupportsRecurrentStates,
)
from trtllm_prfaas.engines.engine import ReferenceEngine
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.errors import AdmissionRejected, ConfigError
from trtllm_prfaas.kv.hashing import CacheKey, block_hashes, prefix_hash
from trtllm_prfaas.kv.pool import HybridPrefixCachePool
from trtllm_prfaas.kv.spec import KVSpec
from trtllm_prfaas.telemetry.logging import get_logger

__all__ = [
    "HostKVStore",
    "HostMemoryConnectorScheduler",
    "HostMemoryConnectorWorker",
    "HostMemoryMeta",
    "HostTierStats",
    "host_memory_connector",
]

log = get_logger(__name__)


@dataclass
class HostKVStore:
    """The host pool both halves share. A state entry holds the states, then one tail block."""

    spec: KVSpec
    key: CacheKey
    pool: HybridPrefixCachePool

    @classmethod
    def create(cls, spec: KVSpec, key: CacheKey, num_blocks: int, num_states: int) -> HostKVStore:
        pool = HybridPrefixCachePool(
            num_blocks=num_blocks,
            block_bytes=spec.block_bytes,
            num_state_slots=num_states,
            state_bytes=spec.state_bytes + spec.block_bytes,
        )
        return cls(spec, key, pool)


@dataclass
class HostTierStats:
    """What the host tier supplied. ``num_hit_tokens_beyond_device`` is the part of the claims
    made on top of a device-tier match (``num_computed_tokens > 0``): the second tier's value."""

    num_queries: int = 0
    num_hits: int = 0
    num_hit_tokens: int = 0
    num_hits_beyond_device: int = 0
    num_hit_tokens_beyond_device: int = 0
    num_saved_blocks: int = 0
    num_skipped_blocks: int = 0  # already held by the host when a save reached them


@dataclass
class _Load:
    request_id: int
    host_blocks: list[int]  # blocks [first_block, first_block + len) of the prompt's chain
    state_slot: int
    num_tokens: int  # M: the state entry's length, where the request resumes
    first_block: int = 0  # N / B: blocks below are the engine's own (device reuse), untouched
    device_blocks: list[int] = field(default_factory=list)


@dataclass
class _Save:
    request_id: int
    device_blocks: list[int]  # full blocks completed by this chunk that the host lacks
    host_blocks: list[int]
    state_slot: int | None  # host state entry to fill, when the chunk ends at a snapshot point
    tail_device_block: int | None  # partial last block saved with the state at L-1 tokens


@dataclass
class HostMemoryMeta:
    loads: list[_Load]
    saves: list[_Save]


@dataclass
class _Tracked:
    prompt_len: int
    matched: int  # tokens claimed from the host
    resume: int = 0  # N + matched: where the request's own computation starts
    tokens: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_saved_blocks: int = 0


def _store_of(llm_args: Any) -> HostKVStore:
    store = getattr(llm_args, "connector_options", {}).get("store")
    if not isinstance(store, HostKVStore):
        raise ConfigError("host-memory connector needs llm_args.connector_options['store']")
    return store


class HostMemoryConnectorScheduler(KvCacheConnectorScheduler):  # type: ignore[misc]
    load_async = False  # loads are host-memory copies: done inside start_load_kv

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.store = _store_of(llm_args)
        self._tracked: dict[int, _Tracked] = {}
        self._pending_loads: dict[int, _Load] = {}
        self.stats = HostTierStats()

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        tokens = list(request.get_tokens(0))
        load = self._match(request.request_id, tokens, num_computed_tokens)
        matched = load.num_tokens - num_computed_tokens if load else 0
        self._tracked[request.request_id] = _Tracked(
            len(tokens), matched, num_computed_tokens + matched
        )
        self.stats.num_queries += 1
        if load is not None:
            self._pending_loads[request.request_id] = load
            self.stats.num_hits += 1
            self.stats.num_hit_tokens += matched
            if num_computed_tokens:
                self.stats.num_hits_beyond_device += 1
                self.stats.num_hit_tokens_beyond_device += matched
            log.debug(
                "host_tier_hit",
                request_id=request.request_id,
                device_tokens=num_computed_tokens,
                host_tokens=matched,
            )
        return matched, self.load_async and matched > 0

    def _match(self, request_id: int, tokens: list[int], computed: int) -> _Load | None:
        """Longest M (``computed`` < M <= L-1) with the full blocks [computed/B, M/B) held here
        and an exact-length state entry at M; pinned. Candidates: exactly L-1 (a snapshot at an
        earlier prompt's end, e.g. the prompt before its first token), then block boundaries
        (what the engine allows). ``computed`` (the device tier's match) is block aligned; a
        count that is not cannot be continued (cached + claimed must be aligned), so no claim."""
        pool, key, tpb = self.store.pool, self.store.key, self.store.spec.tokens_per_block
        last = len(tokens) - 1
        if computed % tpb or computed >= last:
            return None
        first = computed // tpb
        hashes = block_hashes(tokens[:last], tpb, key)
        num_cached = first + pool.num_cached_prefix_blocks(hashes[first:])
        candidates = [last] if num_cached == len(hashes) else []
        candidates += [j * tpb for j in range(num_cached, first, -1) if j * tpb < last]
        for num_tokens in candidates:
            slot = pool.match_state(prefix_hash(tokens[:num_tokens], key), num_tokens)
            if slot is not None:
                host_blocks = pool.match_prefix(hashes[first : num_tokens // tpb])
                return _Load(request_id, host_blocks, slot, num_tokens, first)
        return None

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        load = self._pending_loads.get(request.request_id)
        if load is not None:
            load.device_blocks = list(block_ids)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> HostMemoryMeta:
        loads = list(self._pending_loads.values())
        self._pending_loads.clear()
        saves = []
        for data in scheduler_output.new_requests + scheduler_output.cached_requests:
            tracked = self._tracked.get(data.request_id)
            if tracked is None:
                continue
            tracked.tokens += data.new_tokens
            tracked.blocks += data.new_block_ids
            is_new = any(data is new for new in scheduler_output.new_requests)
            # TensorRT-LLM leaves a synchronous match out of a new request's computed_position.
            sync_match = tracked.matched if is_new and not self.load_async else 0
            start = data.computed_position + sync_match
            save = self._plan_save(data.request_id, tracked, start + data.num_scheduled_tokens)
            if save is not None:
                saves.append(save)
        return HostMemoryMeta(loads, saves)

    def _plan_save(self, request_id: int, tracked: _Tracked, end: int) -> _Save | None:
        """What a chunk ending at ``end`` adds to the store: its full blocks the store lacks, and
        the state if ``end`` is a snapshot point (block aligned, or the prompt's end).

        The first chunk after a device-tier match also reaches the blocks below it, which the
        device reused: those the host still holds (and those just loaded from it) are touched,
        not copied (a reference taken across the allocation so it cannot evict them, then
        dropped: they become recently used), and any the host lost are saved again from the
        device blocks, so the host ends up holding the whole chain. Host-pool exhaustion skips
        the save (logged)."""
        spec, pool, key = self.store.spec, self.store.pool, self.store.key
        prompt_len, tpb = tracked.prompt_len, spec.tokens_per_block
        if end > prompt_len or end <= tracked.resume:
            return None  # decode steps add nothing to the store
        hashes = block_hashes(tracked.tokens[:end], tpb, key)
        indices = range(tracked.num_saved_blocks, len(hashes))
        touched = [b for i in indices for b in pool.match_prefix([hashes[i]])]
        held = {i for i in indices if pool.num_cached_prefix_blocks([hashes[i]])}
        missing = [i for i in indices if i not in held]
        state_point = end % tpb == 0 or end == prompt_len
        try:
            host_blocks = pool.allocate_prefix_blocks([hashes[i] for i in missing])
            try:
                slot = (
                    pool.put_state(prefix_hash(tracked.tokens[:end], key), end)
                    if state_point
                    else None
                )
            except AdmissionRejected:
                pool.release(host_blocks)  # pending: freed, nothing half-saved stays
                raise
        except AdmissionRejected as exc:
            log.warning("host_store_full", request_id=request_id, error=str(exc))
            return None
        finally:
            pool.release(touched)
        tracked.num_saved_blocks = len(hashes)
        self.stats.num_saved_blocks += len(missing)
        self.stats.num_skipped_blocks += len(held)
        tail = tracked.blocks[end // tpb] if end % tpb and slot is not None else None
        device_blocks = [tracked.blocks[i] for i in missing]
        return _Save(request_id, device_blocks, host_blocks, slot, tail)

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        self._tracked.pop(request.request_id, None)
        load = self._pending_loads.pop(request.request_id, None)
        if load is not None:  # matched but never loaded (aborted): unpin
            self.store.pool.release(load.host_blocks)
            self.store.pool.release_state(load.state_slot)
        return False  # saves complete inside the forward pass (wait_for_save)


class HostMemoryConnectorWorker(KvCacheConnectorWorker, SupportsRecurrentStates):  # type: ignore[misc]
    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.store = _store_of(llm_args)
        self.kv_pool: torch.Tensor | None = None
        self.states: RecurrentStates | None = None

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        self.kv_pool = kv_cache_tensor

    def register_recurrent_states(self, states: RecurrentStates) -> None:
        if states.state_bytes != self.store.spec.state_bytes:
            raise ConfigError(f"state bytes {states.state_bytes} != {self.store.spec.state_bytes}")
        self.states = states

    def _device_block(self, block_id: int) -> torch.Tensor:
        assert self.kv_pool is not None
        return self.kv_pool[block_id].reshape(-1).view(torch.uint8)

    def _device_state(self, request_id: int) -> torch.Tensor:
        assert self.states is not None
        return self.states.tensor[self.states.slot_of(request_id)].reshape(-1).view(torch.uint8)

    def start_load_kv(self, stream: Any) -> None:
        meta: HostMemoryMeta = self._metadata
        pool, state_bytes = self.store.pool, self.store.spec.state_bytes
        tpb = self.store.spec.tokens_per_block
        for load in meta.loads:
            targets = load.device_blocks[load.first_block :]
            for device, host in zip(targets, load.host_blocks, strict=False):
                self._device_block(device).copy_(pool.block_view(host))
            entry = pool.state_view(load.state_slot)
            self._device_state(load.request_id).copy_(entry[:state_bytes])
            if load.num_tokens % tpb:
                self._device_block(load.device_blocks[load.num_tokens // tpb]).copy_(
                    entry[state_bytes:]
                )
            pool.release(load.host_blocks)
            pool.release_state(load.state_slot)

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        return None  # loads are synchronous in start_load_kv

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        meta: HostMemoryMeta = self._metadata
        assert self.states is not None and self.kv_pool is not None
        pool_layer = self.states.pool_layer_of.get(layer_idx)
        for save in meta.saves:
            if pool_layer is not None:
                self._save_blocks_layer(save, pool_layer)
            elif save.state_slot is not None:
                self._save_state_layer(save, self.states.state_layer_of[layer_idx])

    def _save_blocks_layer(self, save: _Save, pool_layer: int) -> None:
        """One full-attention layer of the chunk's new blocks (and the tail) to the store."""
        assert self.kv_pool is not None
        store, layer_shape = self.store, self.kv_pool.shape[1:]
        pairs = [
            (d, store.pool.block_view(h))
            for d, h in zip(save.device_blocks, save.host_blocks, strict=True)
        ]
        if save.tail_device_block is not None and save.state_slot is not None:
            tail = store.pool.state_view(save.state_slot)[store.spec.state_bytes :]
            pairs.append((save.tail_device_block, tail))
        for device, host in pairs:
            host_rows = host.view(self.kv_pool.dtype).view(layer_shape)
            host_rows[pool_layer].copy_(self.kv_pool[device, pool_layer])

    def _save_state_layer(self, save: _Save, state_layer: int) -> None:
        assert self.states is not None and save.state_slot is not None
        device = self.states.tensor[self.states.slot_of(save.request_id), state_layer]
        entry = self.store.pool.state_view(save.state_slot)[: self.store.spec.state_bytes]
        entry.view(torch.float32).view(self.states.tensor.shape[1:])[state_layer].copy_(device)

    def wait_for_save(self, stream: Any) -> None:
        """Every layer of this iteration's saves is written: make them matchable, unpin."""
        meta: HostMemoryMeta = self._metadata
        pool = self.store.pool
        for save in meta.saves:
            for host in save.host_blocks:
                pool.commit_prefix_block(host)
            pool.release(save.host_blocks)
            if save.state_slot is not None:
                pool.commit_state(save.state_slot)
                pool.release_state(save.state_slot)

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        return [], []  # nothing is asynchronous here


def host_memory_connector(
    model: ModelConfig,
    *,
    num_blocks: int = 1024,
    num_states: int = 64,
    scheduler_cls: type[HostMemoryConnectorScheduler] = HostMemoryConnectorScheduler,
    worker_cls: type[HostMemoryConnectorWorker] = HostMemoryConnectorWorker,
) -> tuple[ConnectorPair, HostKVStore]:
    """Both halves over a fresh store sized for ``model`` (the key mixes model id and dtype)."""
    key = CacheKey(model.model_id, "HND", model.dtype, tp_rank=0)
    store = HostKVStore.create(model.kv_spec, key, num_blocks=num_blocks, num_states=num_states)
    args = ReferenceEngine.llm_args_for(model, store=store)
    return ConnectorPair(scheduler_cls(args), worker_cls(args)), store
