"""The reference engine: continuous batching over the hybrid model, hosting a KV cache connector.

One ``step()`` is one TensorRT-LLM executor iteration, in TensorRT-LLM's order::

    admit:    match (get_num_new_matched_tokens) -> allocate -> update_state_after_alloc
              -> async-loading requests are parked (leave the batch)
    schedule: decode tokens of running requests + prefill chunks within the token budget
    connector: build_connector_meta -> bind_connector_meta -> start_load_kv
    forward:  per layer wait_for_layer_load / layer / save_kv_layer; then wait_for_save
    finish:   sample; finished requests -> request_finished (True pins blocks)
    poll:     get_finished -> parked loads rejoin, pinned saves release their blocks

Prefill chunk rule: TensorRT-LLM's plain chunking. Chunks start where the computed prefix ends
(on a block boundary, or after a connector's claim) and run for ``chunk_size`` tokens, the last one
ending at the prompt's end. Every route chunks a prompt the same way, so its KV and the
linear-attention state after it are bit-identical. The remote handoff is TensorRT-LLM's own: the
prefill runs the whole prompt (L tokens) and samples t1; the decode request is the prompt followed
by t1, whose connector claims the L relayed tokens and computes t1 alone. A connector may claim a
block-aligned prefix, or exactly all but the last prompt token; any other count is refused.

Block reuse (``EngineConfig.enable_block_reuse``, see ``prefix_cache.py``): admission first
matches the prompt against the engine's own cached blocks (whole blocks of the first L-1 tokens,
ending at a recurrent-state snapshot for a hybrid model); those tokens are computed, and the
connector is asked with ``num_computed_tokens`` = that count, as TensorRT-LLM asks it after its
own reuse. Stored and evicted blocks are recorded as KV cache events, drained with
``drain_kv_events()``.

Every wait has a deadline: a request not admitted within ``admission_timeout_s`` fails with
AdmissionRejected; a connector load or save not reported within ``connector_timeout_s`` fails
the request (loads) or force-releases its blocks (saves), logged as errors.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import torch

from trtllm_prfaas.connector.base import (
    ConnectorPair,
    RecurrentStates,
    SupportsRecurrentStates,
)
from trtllm_prfaas.connector.host import ConnectorHost
from trtllm_prfaas.engines.batch import SequenceChunk
from trtllm_prfaas.engines.blocks import BlockManager, SlotAllocator
from trtllm_prfaas.engines.config import (
    EngineConfig,
    EngineStats,
    KvCacheConfigArgs,
    ReferenceLlmArgs,
)
from trtllm_prfaas.engines.prefix_cache import PrefixCache, PrefixPin
from trtllm_prfaas.engines.reference import HybridModel, LayerKind, ModelConfig
from trtllm_prfaas.engines.request import (
    LlmRequest,
    RequestOutput,
    RequestState,
    SamplingParams,
)
from trtllm_prfaas.engines.sampling import sample_next, seeded_generator
from trtllm_prfaas.engines.tokenizer import ByteTokenizer, validate_token_ids
from trtllm_prfaas.errors import (
    AdmissionRejected,
    ConnectorError,
    EngineError,
    InvalidRequestError,
    PrfaasError,
)
from trtllm_prfaas.kv.events import KvEventBatch, KvEventLog, KvSnapshot
from trtllm_prfaas.telemetry.logging import get_logger

if TYPE_CHECKING:
    from trtllm_prfaas.connector.plans import Plan, PlanBook

__all__ = ["ConnectorPair", "EngineConfig", "EngineStats", "ReferenceEngine"]

log = get_logger(__name__)


class ReferenceEngine(ConnectorHost):
    """Owns the model, the KV pool, the state tensor, the queues, and an optional connector."""

    def __init__(
        self,
        config: EngineConfig,
        connector: ConnectorPair | None = None,
        plans: PlanBook | None = None,
    ) -> None:
        torch.set_num_threads(config.num_threads)
        self.config, self.cfg = config, config.model
        self.model = HybridModel(self.cfg)
        self.tokenizer = ByteTokenizer()
        cfg = self.cfg
        self.pool = torch.zeros(
            (config.num_blocks, cfg.num_full_layers, 2, cfg.block_row_elems), dtype=cfg.torch_dtype
        )
        self.states = torch.zeros((config.max_num_seqs, *cfg.state_shape), dtype=torch.float32)
        self.kv_events = KvEventLog(config.max_kv_events)
        self.blocks = BlockManager(
            config.num_blocks, config.max_cached_blocks, self.kv_events.record_removed
        )
        self.prefix_cache: PrefixCache | None = None
        if config.enable_block_reuse:
            self.prefix_cache = PrefixCache(
                cfg, self.blocks, self.states, config.num_state_snapshots, self.kv_events
            )
            self.kv_events.record_created(config.num_blocks)
        self._pins: dict[int, PrefixPin] = {}  # pin id -> a reserved decode slot's prefix
        self._pin_ids = itertools.count(1)
        self.slots = SlotAllocator(config.max_num_seqs)
        self.waiting: deque[LlmRequest] = deque()
        self.running: dict[int, LlmRequest] = {}  # admitted: loading, context, generation, saving
        self.connector = connector
        self.plans = plans  # where add_request posts a request's PrfaaS plan for the connector
        self._ids = itertools.count(1)
        self.stats = EngineStats()
        self._init_connector_host()
        if connector is not None:
            self._register_connector(connector)

    @staticmethod
    def llm_args_for(cfg: ModelConfig, **options: Any) -> ReferenceLlmArgs:
        """The ``llm_args`` object both connector halves are constructed with."""
        return ReferenceLlmArgs(
            KvCacheConfigArgs(cfg.tokens_per_block), cfg.model_id, cfg.dtype, dict(options)
        )

    def _register_connector(self, connector: ConnectorPair) -> None:
        connector.worker.register_kv_caches(self.pool)
        if isinstance(connector.worker, SupportsRecurrentStates):
            kinds = self.cfg.layer_kinds
            full = [i for i, k in enumerate(kinds) if k is LayerKind.FULL]
            linear = [i for i, k in enumerate(kinds) if k is LayerKind.LINEAR]
            connector.worker.register_recurrent_states(
                RecurrentStates(
                    tensor=self.states,
                    slot_of=lambda rid: self.running[rid].state_slot,
                    state_layer_of={layer: j for j, layer in enumerate(linear)},
                    pool_layer_of={layer: j for j, layer in enumerate(full)},
                    store_snapshot=self._store_relayed_snapshot,
                )
            )

    # ----------------------------------------------------------------- submission and queries
    def add_request(
        self,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        request_id: int | None = None,
        plan: Plan | None = None,
    ) -> int:
        """Validate and queue a request; returns its id. Raises InvalidRequestError /
        AdmissionRejected at once for input that can never run; the engine is unaffected.

        ``plan`` (a PrfaaS transfer plan) is posted to the connector's plan book, where the
        connector's scheduler finds it by the request's tokens, as it does inside TensorRT-LLM."""
        if not prompt_token_ids:
            raise InvalidRequestError("prompt is empty: at least one token is required")
        validate_token_ids(prompt_token_ids, self.cfg.vocab_size)  # the model's, not the bytes'
        total = len(prompt_token_ids) + sampling.max_tokens
        if total > self.cfg.max_seq_len:
            raise InvalidRequestError(
                f"prompt of {len(prompt_token_ids)} tokens + max_tokens {sampling.max_tokens} "
                f"exceeds the max sequence length {self.cfg.max_seq_len}"
            )
        if self._blocks_for(total) > self.config.num_blocks:
            raise AdmissionRejected(
                f"request needs {self._blocks_for(total)} KV blocks; the pool has "
                f"{self.config.num_blocks}"
            )
        if len(self.waiting) >= self.config.max_waiting:
            raise AdmissionRejected(f"waiting queue is full ({self.config.max_waiting})")
        rid = next(self._ids) if request_id is None else request_id
        if rid in self.running or any(r.request_id == rid for r in self.waiting):
            raise InvalidRequestError(f"request id {rid} is already in use")
        deadline = time.monotonic() + self.config.admission_timeout_s
        request = LlmRequest(rid, list(prompt_token_ids), sampling, deadline)
        if plan is not None:
            if self.plans is None:
                raise InvalidRequestError("this engine has no connector to take a PrfaaS plan")
            self.plans.post(plan)
        self.waiting.append(request)
        return rid

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.tokens_per_block)

    # ------------------------------------------------------------------------- the iteration
    def step(self) -> list[RequestOutput]:
        outputs = self._expire_waiting()
        outputs += self._admit()
        chunks, scheduled = self._schedule()
        try:
            if self.connector is not None:
                self._bind_meta(scheduled, chunks)
            logits = self._forward(chunks) if chunks else None
            outputs += self._postprocess(scheduled, chunks, logits)
        except ConnectorError as exc:  # the iteration is lost: end its requests, keep serving
            log.error("iteration_failed", error=str(exc))
            outputs += [self._fail(req, exc) for req in scheduled if req.request_id in self.running]
        if self.connector is not None:
            outputs += self._poll_connector()
        self._update_cache_stats()
        return outputs

    def _update_cache_stats(self) -> None:
        stats = self.stats
        stats.num_block_evictions = self.blocks.num_evictions
        stats.num_kv_events_dropped = self.kv_events.num_dropped
        if self.prefix_cache is not None:
            cache = self.prefix_cache.stats
            stats.num_prefix_queries, stats.num_prefix_hits = cache.num_queries, cache.num_hits
            stats.num_reused_tokens = cache.num_reused_tokens
            stats.num_snapshot_evictions = cache.num_snapshot_evictions

    def drain_kv_events(self) -> KvEventBatch:
        """The KV cache events recorded since the last drain (stored and removed block hashes,
        TensorRT-LLM's shape; see ``kv/events.py``), and how many overflowed the buffer. Empty
        with block reuse off. Call from the thread that steps the engine; never blocks."""
        return self.kv_events.drain()

    def kv_events_snapshot(self) -> KvSnapshot:
        """What the prefix cache holds, as of the next event (``kv/events.py``): for a router
        that starts following this engine late. Take it right after a drain, on the same
        thread; never blocks."""
        return self.kv_events.snapshot()

    # ------------------------------------------------------------- pinned prefixes (issue 15)
    def pin_prefix(self, block_hashes: list[int]) -> tuple[int, int]:
        """Hold the cached prefix of a prompt whose chained block hashes are ``block_hashes``
        (the router's, under the same ``CacheKey``) until :meth:`unpin_prefix`, matched exactly
        as admission will match it (snapshot rule included). Returns (pin id, tokens held):
        the tokens are block aligned, 0 with block reuse off or nothing cached (pin id 0)."""
        if self.prefix_cache is None or not block_hashes:
            return 0, 0
        pin = self.prefix_cache.pin(block_hashes)
        if not pin.num_tokens:
            self.prefix_cache.unpin(pin)
            return 0, 0
        pin_id = next(self._pin_ids)
        self._pins[pin_id] = pin
        return pin_id, pin.num_tokens

    def unpin_prefix(self, pin_id: int) -> None:
        """Give back what :meth:`pin_prefix` held. Idempotent; 0 and unknown ids are no-ops."""
        pin = self._pins.pop(pin_id, None)
        if pin is not None and self.prefix_cache is not None:
            self.prefix_cache.unpin(pin)

    def _store_relayed_snapshot(
        self, request_id: int, num_tokens: int, state: torch.Tensor
    ) -> None:
        """The connector's hook (``RecurrentStates.store_snapshot``): a relayed snapshot."""
        req = self.running.get(request_id)
        if self.prefix_cache is None or req is None:
            return
        if not self.prefix_cache.store_relayed_snapshot(req, num_tokens, state):
            log.warning("relayed_snapshot_refused", request_id=request_id, num_tokens=num_tokens)

    def _expire_waiting(self) -> list[RequestOutput]:
        now, outputs = time.monotonic(), []
        while self.waiting and self.waiting[0].deadline < now:
            req = self.waiting.popleft()
            err = AdmissionRejected(
                f"request {req.request_id} not admitted within {self.config.admission_timeout_s}s"
            )
            outputs.append(RequestOutput(req.request_id, [], True, "error", err))
        return outputs

    def _admit(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while self.waiting and self.slots.num_free:
            req = self.waiting[0]
            if not self._reserve(req):
                break  # FIFO: wait for blocks to come back
            self.waiting.popleft()
            try:
                outputs += self._admit_one(req)
            except PrfaasError as exc:
                if req.request_id not in self.running:  # refused before it held a slot
                    self._unreserve(req)
                outputs.append(self._fail(req, exc))
        return outputs

    def _unreserve(self, req: LlmRequest) -> None:
        self.blocks.release(req.block_ids, req.num_reserved_blocks - len(req.block_ids))
        if self.prefix_cache is not None:
            self.prefix_cache.release_snapshot(req)
        req.block_ids, req.num_reserved_blocks = [], 0

    def _reserve(self, req: LlmRequest) -> bool:
        """Reference the cached prefix (block reuse on) and reserve the rest of the worst case;
        False (nothing held) when the pool cannot supply it yet."""
        total = self._blocks_for(req.num_tokens_total())
        if self.prefix_cache is not None:
            self.prefix_cache.acquire(req)
        if not self.blocks.can_reserve(total - len(req.block_ids)):
            if self.prefix_cache is not None:
                self.prefix_cache.release_match(req)
            return False
        self.blocks.reserve(total - len(req.block_ids))
        req.num_reserved_blocks = total
        return True

    def _admit_one(self, req: LlmRequest) -> list[RequestOutput]:
        cached = req.num_cached_tokens
        matched, load_async = 0, False
        if self.connector is not None:
            matched, load_async = self._connector_call(
                self.connector.scheduler.get_num_new_matched_tokens, req, cached
            )
            self._check_match(req, cached, matched, load_async)
        req.block_ids += self.blocks.take(self._blocks_for(req.prompt_len) - len(req.block_ids))
        req.state_slot = self.slots.take()
        if self.prefix_cache is not None:
            self.prefix_cache.admitted(req)
        else:
            self.states[req.state_slot].zero_()
        req.num_computed_tokens = cached + matched
        req.num_connector_tokens = matched
        self.stats.num_connector_tokens += matched
        if not load_async:
            self._record_sync_match(req.request_id, matched)
        if req.sampling.temperature > 0:
            req.generator = seeded_generator(
                req.sampling.seed, self.cfg.vocab_size, req.sampling.num_skipped_draws
            )
        self.running[req.request_id] = req
        if self.connector is not None:
            self._connector_call(
                self.connector.scheduler.update_state_after_alloc, req, list(req.block_ids)
            )
        if load_async:
            self._park(req, RequestState.LOADING, self._new_loading)
        else:
            req.state = RequestState.CONTEXT
        return []

    def _check_match(self, req: LlmRequest, cached: int, matched: int, load_async: bool) -> None:
        tpb, last, total = self.cfg.tokens_per_block, req.prompt_len - 1, cached + matched
        if matched == 0 and load_async:
            raise ConnectorError("connector returned (0, True): load_async needs tokens to load")
        if matched < 0 or total > last or (total % tpb and total != last):
            raise ConnectorError(
                f"connector claimed {matched} tokens of a {req.prompt_len}-token prompt after "
                f"{cached} cached; cached + claimed must be a multiple of {tpb} up to {last}, "
                f"or exactly {last}"
            )

    def _schedule(self) -> tuple[list[SequenceChunk], list[LlmRequest]]:
        """Decode tokens first (one per running request), then prefill chunks within budget."""
        chunks: list[SequenceChunk] = []
        scheduled: list[LlmRequest] = []
        budget = self.config.max_num_tokens
        for req in self.running.values():
            if req.state is RequestState.GENERATION:
                pos = req.prompt_len + len(req.output_token_ids) - 1
                self._grow_blocks(req, pos + 1)
                chunks.append(
                    SequenceChunk([req.output_token_ids[-1]], pos, req.block_ids, req.state_slot)
                )
                scheduled.append(req)
                budget -= 1
        for req in self.running.values():
            if req.state is RequestState.CONTEXT and budget > 0:
                start = req.num_computed_tokens
                end = min(start + self.config.chunk_size, req.prompt_len)
                if self.prefix_cache is not None:
                    end = self.prefix_cache.chunk_end(req, start, end)
                if end - start > budget and chunks:
                    break
                chunks.append(
                    SequenceChunk(
                        req.prompt_token_ids[start:end], start, req.block_ids, req.state_slot
                    )
                )
                scheduled.append(req)
                budget -= end - start
        return chunks, scheduled

    def _grow_blocks(self, req: LlmRequest, num_tokens: int) -> None:
        missing = self._blocks_for(num_tokens) - len(req.block_ids)
        if missing > 0:
            req.block_ids += self.blocks.take(missing)

    def _forward(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        if self.connector is None:
            logits: torch.Tensor = self.model(chunks, self.pool, self.states)
            return logits
        worker = self.connector.worker
        logits = self.model(
            chunks,
            self.pool,
            self.states,
            before_layer=lambda i: self._connector_call(worker.wait_for_layer_load, i, None),
            after_layer=lambda i: self._connector_call(worker.save_kv_layer, i, None),
        )
        return logits

    def _postprocess(
        self, scheduled: list[LlmRequest], chunks: list[SequenceChunk], logits: Any
    ) -> list[RequestOutput]:
        if self.connector is not None:
            self._connector_call(self.connector.worker.wait_for_save, None)
        outputs: list[RequestOutput] = []
        self.stats.num_iterations += 1
        for row, (req, chunk) in enumerate(zip(scheduled, chunks, strict=True)):
            req.num_computed_tokens = chunk.start_pos + len(chunk.token_ids)
            if req.state is RequestState.CONTEXT:
                self.stats.num_prompt_tokens_computed += len(chunk.token_ids)
                if self.prefix_cache is not None:
                    self.prefix_cache.after_chunk(req, chunk.start_pos, req.num_computed_tokens)
            if req.num_computed_tokens < req.prompt_len:
                continue  # a prefill chunk that does not reach the last prompt token
            token = sample_next(logits[row], req.sampling.temperature, req.generator)
            req.output_token_ids.append(token)
            self.stats.num_generated_tokens += 1
            req.state = RequestState.GENERATION
            outputs.append(self._maybe_finish(req, token))
        return outputs

    def _maybe_finish(self, req: LlmRequest, token: int) -> RequestOutput:
        reason = None
        if token == self.cfg.eos_id and not req.sampling.ignore_eos:
            reason = "stop"
        elif len(req.output_token_ids) >= req.sampling.max_tokens:
            reason = "length"
        if reason is None:
            return RequestOutput(req.request_id, [token])
        self._finish(req)
        return RequestOutput(
            req.request_id,
            [token],
            True,
            reason,
            None,
            req.num_connector_tokens,
            req.num_cached_tokens,
        )

    def _finish(self, req: LlmRequest) -> None:
        """End of generation: ask the connector whether blocks stay pinned for a save."""
        pinned = False
        if self.connector is not None:
            pinned = bool(
                self._connector_call(
                    self.connector.scheduler.request_finished, req, list(req.block_ids)
                )
            )
        if pinned:
            self._park(req, RequestState.SAVING, self._new_saving)
        else:
            self._free(req, RequestState.FINISHED)

    def _park(self, req: LlmRequest, state: RequestState, newly: list[int]) -> None:
        """Hand ``req`` to the connector (async load or save) under the connector deadline."""
        req.state = state
        newly.append(req.request_id)
        self._deadlines[req.request_id] = time.monotonic() + self.config.connector_timeout_s

    def _free(self, req: LlmRequest, state: RequestState) -> None:
        req.state = state
        self.running.pop(req.request_id, None)
        self._deadlines.pop(req.request_id, None)
        self.blocks.release(req.block_ids, req.num_reserved_blocks - len(req.block_ids))
        if self.prefix_cache is not None:
            self.prefix_cache.release_snapshot(req)
        self.slots.release(req.state_slot)
        req.block_ids, req.num_reserved_blocks = [], 0
        self._forget(req.request_id)

    def _recompute(self, req: LlmRequest) -> None:
        """Forget what the connector supplied; the engine's own cached prefix stays."""
        self.stats.num_connector_tokens -= req.num_connector_tokens
        req.num_connector_tokens = 0
        req.num_computed_tokens = req.num_cached_tokens
        if self.prefix_cache is not None:
            self.prefix_cache.restore_state(req)
        else:
            self.states[req.state_slot].zero_()
        req.state = RequestState.CONTEXT

    def _fail(self, req: LlmRequest, error: PrfaasError) -> RequestOutput:
        log.warning("request_failed", request_id=req.request_id, error=str(error))
        self.stats.num_failed_requests += 1
        if req.request_id in self.running:
            self._free(req, RequestState.FAILED)
        return RequestOutput(req.request_id, [], True, "error", error)

    # ------------------------------------------------------------------ control and checks
    def abort(self, request_id: int) -> RequestOutput | None:
        """Cancel a request wherever it is; its blocks are freed (or stay pinned while the
        connector still saves them). Returns its final output, or None if it is unknown."""
        for req in list(self.waiting):
            if req.request_id == request_id:
                self.waiting.remove(req)
                return RequestOutput(request_id, [], True, "aborted")
        req_or_none = self.running.get(request_id)
        if req_or_none is None or req_or_none.state is RequestState.SAVING:
            return None
        if req_or_none.state is RequestState.LOADING:
            self._cancel_load(req_or_none)
        if self.connector is not None:  # let the connector forget it and stop its transfers
            self._connector_call(self.connector.scheduler.request_finished, req_or_none, [])
            self._cancel_hook("cancel_save", request_id)
        self._free(req_or_none, RequestState.FAILED)
        return RequestOutput(request_id, [], True, "aborted")

    def generate(
        self, prompts: list[list[int]], sampling: SamplingParams, timeout_s: float = 300.0
    ) -> list[list[int]]:
        """Run prompts to completion (a convenience for tests, the demo and benchmarks)."""
        ids = [self.add_request(p, sampling) for p in prompts]
        tokens: dict[int, list[int]] = {rid: [] for rid in ids}
        deadline = time.monotonic() + timeout_s
        pending = set(ids)
        while pending:
            if time.monotonic() > deadline:
                for rid in pending:
                    self.abort(rid)
                raise EngineError(f"generate() did not finish within {timeout_s}s")
            for out in self.step():
                if out.request_id in tokens:
                    tokens[out.request_id] += out.new_token_ids
                    if out.finished:
                        pending.discard(out.request_id)
                        if out.error is not None:
                            raise out.error
        while self.has_unfinished():  # let pinned saves drain so nothing is left behind
            if time.monotonic() > deadline:
                raise EngineError(f"connector saves did not drain within {timeout_s}s")
            self.step()
        return [tokens[rid] for rid in ids]

    def leak_report(self) -> list[str]:
        """Everything still held; empty when the engine is idle and nothing leaked."""
        problems = [f"request {rid} still {r.state.value}" for rid, r in self.running.items()]
        problems += [f"request {r.request_id} still waiting" for r in self.waiting]
        blocks = self.blocks.leak_report()
        if blocks:
            problems.append(blocks)
        if self.slots.num_free != self.slots.num_slots:
            problems.append(f"{self.slots.num_slots - self.slots.num_free} state slots in use")
        if self._pins:
            problems.append(f"prefix pins {sorted(self._pins)} still held")
        if self.prefix_cache is not None:
            problems += self.prefix_cache.leak_report()
        return problems
