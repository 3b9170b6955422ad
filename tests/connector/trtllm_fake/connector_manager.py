"""The executor's side of the KV connector (``KvCacheConnectorManager`` and the loop's calls into
it): ``_call``/``_leader``, which every connector call goes through, and the phases of one
iteration that are connector calls around the forward pass.

``prepare_resources`` (``resource_manager.py`` 3501434665 ``KVCacheManager.prepare_resources``):
    a context request's first chunk adds its sequence, unless it has finished an async load
    (``kv_cache_connector.py`` 3277953 ``should_add_sequence``). Adding follows
    ``kvCacheManager.cpp`` 126178160 ``WindowBlockManager::addSequence``/``loadOrAllocateBlocks``:
    the prompt minus its last token is cut into blocks and matched against the reuse tree
    (``BlockManager`` in ``blocks``: full blocks, then one partial match with partial reuse on),
    then ``get_num_new_matched_tokens(request, num_computed_tokens=matched)`` runs on the leader
    and its result is broadcast; ``setPrepopulatedPromptLen(matched + n)`` enforces
    ``prepopulatedPromptLen < promptLen`` (``llmRequest.h`` 786144818; raised here as
    ``TllmCheckError``, which kills the loop as the unwrapped C++ exception does) and moves the
    chunk start. ``update_state_after_alloc(request, block_ids)`` runs on rank 0 only. A
    generation request adds a token (a new block when a block fills). Then the scheduler output
    is built (``KvCacheConnectorSchedulerOutputManager``): new async loads are skipped; context
    requests report ``computed_position`` = context position, minus this iteration's external
    load; generation requests ``len(tokens) - 1`` and one token. Generation-only requests raise
    as ``KvCacheConnectorManager.get_num_new_matched_tokens`` does.
``_kv_connector_start_batch`` (``py_executor.py`` 736889464): new async loads leave the batch
    (parked), the leader's ``build_connector_meta`` is broadcast (a pickle round trip per rank)
    and bound on every rank, then ``start_load_kv(stream)``.
``_kv_connector_terminate_requests`` (``kv_cache_connector.py`` 3277953
    ``KvCacheConnectorManager.get_finished``): each rank passes its new async ids in once,
    ``extract_by_id`` raises KeyError for an id never passed in, results are allgathered and
    only the intersection acts: loads return the request to the context state, saves unpin.

Versions (see the package docstring): the prepopulated check is the one both ``llmRequest.h``
(786144818) and the older ``addSequence`` (1277673704, "There must be at least one uncomputed
token in the prompt!") enforce.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from tests.connector.trtllm_fake.blocks import TllmCheckError
from tests.connector.trtllm_fake.ranks import Rank, as_rank, broadcast
from tests.connector.trtllm_fake.requests import (
    CppRequestView,
    FakeLlmRequest,
    RequestData,
    SchedulerOutput,
    State,
)
from tests.connector.trtllm_fake.state import ExecutorState


class ConnectorManagerSteps(ExecutorState):
    """The loop's connector calls (a layer of ``FakeExecutor``; see ``state``)."""

    # ---- calls into the connector ----
    def _call(self, rank: Rank, name: str, *args: Any) -> Any:
        """``rank``'s worker half: ``name(*args)``, logged, with ``mpi_rank()`` = its rank."""
        rank.log.append(name)
        with as_rank(rank.rank):
            return getattr(rank.worker, name)(*args)

    def _leader(self, name: str, *args: Any) -> Any:
        """``_run_on_leader``: the scheduler half on rank 0, its result broadcast."""
        self.ranks[0].log.append(name)
        with as_rank(0):
            result = getattr(self.scheduler, name)(*args)
        return broadcast(result)

    # ---- prepare_resources ----
    def _prepare_resources(self, batch: list[FakeLlmRequest]) -> None:
        for req in batch:
            rid = req.request_id
            if req.state is State.GENERATION_IN_PROGRESS:
                self._seq_tokens[rid] += 1
                self.blocks.add_token(rid, self._seq_tokens[rid])
            elif (
                req.is_first_context_chunk
                and rid not in self._finished_loading
                and rid not in self.blocks.blocks
            ):
                self._add_sequence(req)

    def _add_sequence(self, req: FakeLlmRequest) -> None:
        rid = req.request_id
        matched = self.blocks.add_sequence(rid, req.tokens, req.prompt_len)
        self._seq_tokens[rid] = req.prompt_len
        if req.is_generation_only_request:
            raise RuntimeError("Connector API is not supported for generation-only requests!")
        num_tokens, load_async = self._leader(
            "get_num_new_matched_tokens", CppRequestView(req), matched
        )
        if num_tokens == 0 and load_async:
            raise RuntimeError("load_kv_async must be False when num_tokens is 0!")
        if load_async:
            for rank in self.ranks:
                rank.new.loading[rid] = req
        self._external_loads[rid] = num_tokens
        self.claims[rid] = (matched, num_tokens, bool(load_async))
        self._set_prepopulated(req, matched + num_tokens)
        self.ranks[0].log.append("update_state_after_alloc")
        with as_rank(0):
            self.scheduler.update_state_after_alloc(req, list(self.blocks.blocks[rid]))

    def _set_prepopulated(self, req: FakeLlmRequest, prepopulated: int) -> None:
        """``LlmRequest::setPrepopulatedPromptLen``: the check, then the chunk moves."""
        if not prepopulated < req.prompt_len:
            raise TllmCheckError(
                f"Invalid state: prepopulatedPromptLen ({prepopulated}) >= promptLen "
                f"({req.prompt_len}) for request {req.request_id}"
            )
        req.prepopulated_prompt_len = prepopulated
        if prepopulated > 0:
            tpb, chunk = self.model.tokens_per_block, req.context_chunk_size
            if prepopulated + chunk < req.prompt_len:
                chunk = (prepopulated + chunk) // tpb * tpb - prepopulated
            req.context_current_position = prepopulated
            req.context_chunk_size = min(chunk, req.prompt_len - prepopulated)

    # ---- _kv_connector_start_batch ----
    def _start_batch(self, batch: list[FakeLlmRequest]) -> list[FakeLlmRequest]:
        output = self._scheduler_output(batch)
        kept = []
        for req in batch:
            if req.request_id in self.ranks[0].new.loading and req.state is State.CONTEXT_INIT:
                req.state = State.LOADING  # take_scheduled_requests_pending_load
                self.parked_at[req.request_id] = time.monotonic()
                self.ever_parked.add(req.request_id)
            else:
                kept.append(req)
        meta = self._leader("build_connector_meta", output)
        for rank in self.ranks:
            self._call(rank, "bind_connector_meta", broadcast(meta))
            self._call(rank, "start_load_kv", rank.stream)
        return kept

    def _scheduler_output(self, batch: list[FakeLlmRequest]) -> SchedulerOutput:
        out = SchedulerOutput()
        for req in batch:
            rid = req.request_id
            if req.state is State.CONTEXT_INIT:
                if rid in self.ranks[0].new.loading:
                    continue
                is_new = rid not in self._reported
                data = self._request_data(req)
                data.computed_position -= self._external_loads.get(rid, 0)
                (out.new_requests if is_new else out.cached_requests).append(data)
            else:
                out.cached_requests.append(self._request_data(req))
        self._external_loads = {}
        return out

    def _request_data(self, req: FakeLlmRequest) -> RequestData:
        rid, tokens = req.request_id, list(req.tokens)
        block_ids = self.blocks.blocks[rid]
        num_tokens, num_blocks = self._reported.get(rid, (0, 0))
        self._reported[rid] = (len(tokens), len(block_ids))
        if req.state is State.CONTEXT_INIT:
            computed = req.context_current_position
            scheduled = min(req.context_remaining_length, req.context_chunk_size)
        else:
            computed, scheduled = len(tokens) - 1, 1
        return RequestData(
            rid, tokens[num_tokens:], list(block_ids[num_blocks:]), computed, scheduled
        )

    # ---- _kv_connector_terminate_requests ----
    def _get_finished(self) -> None:
        for rank in self.ranks:
            started, finished_gen = list(rank.new.loading), list(rank.new.saving)
            rank.new.move_to(rank.pending)
            saving, loading = broadcast(self._call(rank, "get_finished", finished_gen, started))
            rank.pending.extract(list(saving), list(loading)).move_to(rank.local_done)
        all_saving = set.intersection(*(set(r.local_done.saving) for r in self.ranks))
        all_loading = set.intersection(*(set(r.local_done.loading) for r in self.ranks))
        for rank in self.ranks:
            rank.local_done.extract(sorted(all_saving), sorted(all_loading))
        for rid in sorted(all_loading):
            req = self.requests[rid]
            self.loaded_snapshots[rid] = [self._snapshot(r, rid) for r in self.ranks]
            self.parked_at.pop(rid, None)
            if req.state is State.LOADING:
                req.state = State.CONTEXT_INIT
                self._finished_loading.add(rid)
        for rid in sorted(all_saving):
            self.blocks.unpin(rid)
            self.requests[rid].state = State.GENERATION_COMPLETE

    def _snapshot(self, rank: Rank, rid: int) -> torch.Tensor:
        """The request's blocks holding prepopulated tokens, as the pool has them right when
        the load is reported (before any forward): ``(blocks, layers, kv_factor, row)``."""
        req, tpb = self.requests[rid], self.model.tokens_per_block
        ids = self.blocks.blocks.get(rid, [])[: -(-req.prepopulated_prompt_len // tpb)]
        return torch.stack([
            torch.stack([self.device.read_block(rank.pool, b, layer)
                         for layer in range(self.model.num_layers)])
            for b in ids
        ]) if ids else torch.empty(0)  # fmt: skip
