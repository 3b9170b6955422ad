"""A fake TensorRT-LLM PyTorch executor that drives a KV cache connector with the real one's
semantics, as read from ``tensorrt_llm/_torch/pyexecutor/kv_cache_connector.py`` and
``py_executor.py`` (1.x): no model, deterministic KV bytes, TensorRT-LLM's pool shape.

Per iteration (``step``), like ``PyExecutor._executor_loop``:
  prepare_resources: new requests -> ``get_num_new_matched_tokens`` (async ones recorded as
      new async loads; every match recorded as an external load) -> blocks for the whole prompt
      -> ``update_state_after_alloc``; the scheduler output is built like
      ``KvCacheConnectorSchedulerOutputManager``: context requests that are new async loads are
      skipped, ``computed_position`` is ``context_current_position`` minus this iteration's
      external load, first appearance -> ``new_requests``, later -> ``cached_requests``;
      generation requests: ``computed_position = len(tokens) - 1``, 1 scheduled token.
  ``_kv_connector_start_batch``: new async loads leave the batch (parked), then
      ``build_connector_meta`` -> ``bind_connector_meta`` -> ``start_load_kv``.
  forward (only when the batch is not empty): per layer ``wait_for_layer_load`` / write /
      ``save_kv_layer``, then ``wait_for_save``.
  responses: finished requests -> ``request_finished`` (True pins their blocks).
  ``get_finished``: ids passed in once (new -> pending), results accepted only for pending ids
      (anything else is a contract violation), loads rejoin as context, saves free their blocks.

Hybrid layout: linear-attention layers keep a per-request state outside the pool, handed to the
connector through the project's ``register_recurrent_states`` extension (on GPUs this needs a
hook into TensorRT-LLM's Mamba/linear cache manager: unverified). Chunking: ``split_last_token``
computes prompt tokens ``[0, L-1)`` in block-aligned chunks and the last one alone (the project's
rule); False is TensorRT-LLM's plain chunking (chunks of ``chunk_size`` up to ``L``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from trtllm_prfaas.connector.base import RecurrentStates, RequestData, SchedulerOutput

__all__ = ["FakeExecutor", "FakeRequest", "Layout", "Recorder", "kv_rows", "state_after"]


@dataclass(frozen=True)
class Layout:
    layer_kinds: tuple[str, ...] = ("linear", "full", "linear", "full")
    num_blocks: int = 64
    tokens_per_block: int = 16
    num_kv_heads: int = 2
    head_dim: int = 8
    state_shape: tuple[int, int, int] = (2, 4, 4)  # (heads, d_k, d_v)
    num_slots: int = 4

    @property
    def full(self) -> list[int]:
        return [i for i, k in enumerate(self.layer_kinds) if k == "full"]

    @property
    def linear(self) -> list[int]:
        return [i for i, k in enumerate(self.layer_kinds) if k == "linear"]

    @property
    def pool_shape(self) -> tuple[int, int, int, int]:
        """TensorRT-LLM's: [num_blocks, num_layers, kv_factor, heads * tokens_per_block * dim]."""
        row = self.num_kv_heads * self.tokens_per_block * self.head_dim
        return (self.num_blocks, len(self.full), 2, row)


def _gen(*key: Any) -> torch.Generator:
    return torch.Generator().manual_seed(hash(key) & 0x7FFFFFFF)


def kv_rows(layout: Layout, tokens: list[int], pos: int, layer: int) -> torch.Tensor:
    """(2, heads, dim): the fake K/V of token ``pos`` in ``layer`` (depends on the prefix)."""
    shape = (2, layout.num_kv_heads, layout.head_dim)
    return torch.randn(shape, generator=_gen(tuple(tokens[: pos + 1]), layer))


def state_after(layout: Layout, tokens: list[int], n: int, layer: int) -> torch.Tensor:
    """The fake recurrent state of ``layer`` after the first ``n`` tokens."""
    return torch.randn(layout.state_shape, generator=_gen(tuple(tokens[:n]), layer, "state"))


class Recorder:
    """Wraps a connector half: every public call is logged (name) before it runs."""

    def __init__(self, target: Any, log: list[str]) -> None:
        self._target, self._log = target, log

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._target, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        def call(*args: Any) -> Any:
            self._log.append(name)
            return attr(*args)

        return call


@dataclass
class FakeRequest:
    """The slice of TensorRT-LLM's ``LlmRequest`` connectors read."""

    request_id: int
    prompt: list[int]
    max_tokens: int
    connector_params: dict[str, Any] | None = None
    state: str = "waiting"  # waiting, context, loading, generation, saving, done
    output: list[int] = field(default_factory=list)
    context_current_position: int = 0
    block_ids: list[int] = field(default_factory=list)
    slot: int = -1
    is_generation_only_request: bool = False

    @property
    def py_request_id(self) -> int:
        return self.request_id

    def get_tokens(self, beam: int) -> list[int]:
        return self.prompt + self.output


class FakeExecutor:
    """Drives one connector pair (tensor parallelism 1) over a CPU pool of TensorRT-LLM's shape."""

    def __init__(self, layout: Layout, scheduler: Any, worker: Any, *, chunk_size: int = 32,
                 split_last_token: bool = True) -> None:  # fmt: skip
        self.layout, self.chunk_size, self.split_last_token = layout, chunk_size, split_last_token
        self.log: list[str] = []
        self.scheduler, self.worker = Recorder(scheduler, self.log), Recorder(worker, self.log)
        self.pool = torch.zeros(layout.pool_shape, dtype=torch.float32)
        self.states = torch.zeros((layout.num_slots, len(layout.linear), *layout.state_shape))
        self.free_blocks = list(range(layout.num_blocks))
        self.free_slots = list(range(layout.num_slots))
        self.waiting: list[FakeRequest] = []
        self.active: dict[int, FakeRequest] = {}
        self.new_loading: dict[int, FakeRequest] = {}  # AsyncRequests, not yet passed in
        self.new_saving: dict[int, FakeRequest] = {}
        self.pending_loading: dict[int, FakeRequest] = {}  # passed in, not yet returned
        self.pending_saving: dict[int, FakeRequest] = {}
        self.reported: dict[int, tuple[int, int]] = {}  # rid -> (tokens, blocks) reported
        self.external_loads: dict[int, int] = {}
        self.iterations: list[list[str]] = []
        self.loaded_events: list[int] = []
        self._ids = itertools.count(1)
        self.worker.register_kv_caches(self.pool)
        self.worker.register_recurrent_states(RecurrentStates(
            tensor=self.states, slot_of=lambda rid: self.active[rid].slot,
            state_layer_of={layer: j for j, layer in enumerate(layout.linear)},
            pool_layer_of={layer: j for j, layer in enumerate(layout.full)},
        ))  # fmt: skip
        self.log.clear()

    def add_request(self, prompt: list[int], max_tokens: int, params: dict[str, Any] | None) -> int:
        rid = next(self._ids)
        self.waiting.append(FakeRequest(rid, list(prompt), max_tokens, params))
        return rid

    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    # -------------------------------------------------------------------------- iteration
    def step(self) -> None:
        start = len(self.log)
        batch = self._prepare_resources()
        if batch:
            output = self._build_scheduler_output(batch)
            batch = [r for r in batch if r.request_id not in self.new_loading]
            for req in self.new_loading.values():
                req.state = "loading"  # parked until get_finished reports the load
            meta = self.scheduler.build_connector_meta(output)
            self.worker.bind_connector_meta(meta)
            self.worker.start_load_kv(None)
            if batch:
                chunks = [self._chunk(req) for req in batch]
                self._forward(batch, chunks)
                self._responses(batch, chunks)
        self._get_finished()
        self.iterations.append(self.log[start:])

    def _prepare_resources(self) -> list[FakeRequest]:
        while self.waiting and self.free_slots:
            req = self.waiting.pop(0)
            n, load_async = self.scheduler.get_num_new_matched_tokens(req, 0)
            assert not (n == 0 and load_async), "load_kv_async must be False when num_tokens is 0"
            if load_async:
                self.new_loading[req.request_id] = req
            self.external_loads[req.request_id] = n
            req.context_current_position = n
            num = -(-len(req.prompt) // self.layout.tokens_per_block)
            req.block_ids = [self.free_blocks.pop(0) for _ in range(num)]
            req.slot, req.state = self.free_slots.pop(0), "context"
            self.active[req.request_id] = req
            self.scheduler.update_state_after_alloc(req, list(req.block_ids))
        return [r for r in self.active.values() if r.state in ("context", "generation")]

    def _chunk(self, req: FakeRequest) -> tuple[int, int]:
        tokens = req.get_tokens(0)
        if req.state == "generation":
            return len(tokens) - 1, len(tokens)
        begin, length = req.context_current_position, len(req.prompt)
        if not self.split_last_token:
            return begin, min(begin + self.chunk_size, length)
        if begin >= length - 1:
            return begin, length
        return begin, min(begin + self.chunk_size, length - 1)

    def _build_scheduler_output(self, batch: list[FakeRequest]) -> SchedulerOutput:
        out = SchedulerOutput()
        for req in batch:
            rid = req.request_id
            if req.state == "context" and rid in self.new_loading:
                continue
            is_new = rid not in self.reported
            tokens = req.get_tokens(0)
            n_tok, n_blk = self.reported.get(rid, (0, 0))
            begin, end = self._chunk(req)
            if req.state == "context":
                computed, scheduled = begin - self.external_loads.get(rid, 0), end - begin
            else:
                computed, scheduled = len(tokens) - 1, 1
            data = RequestData(rid, tokens[n_tok:], req.block_ids[n_blk:], computed, scheduled)
            self.reported[rid] = (len(tokens), len(req.block_ids))
            if req.state == "context" and is_new:
                out.new_requests.append(data)
            else:
                out.cached_requests.append(data)
        self.external_loads = {}
        return out

    def _forward(self, batch: list[FakeRequest], chunks: list[tuple[int, int]]) -> None:
        lay, tpb = self.layout, self.layout.tokens_per_block
        for layer, kind in enumerate(lay.layer_kinds):
            self.worker.wait_for_layer_load(layer, None)
            for req, (begin, end) in zip(batch, chunks, strict=True):
                tokens = req.get_tokens(0)
                if kind == "linear":
                    j = lay.linear.index(layer)
                    self.states[req.slot, j] = state_after(lay, tokens, end, layer)
                    continue
                j = lay.full.index(layer)
                for pos in range(begin, end):
                    view = self.pool[req.block_ids[pos // tpb], j].view(
                        2, lay.num_kv_heads, tpb, lay.head_dim
                    )
                    view[:, :, pos % tpb, :] = kv_rows(lay, tokens, pos, layer)
            self.worker.save_kv_layer(layer, None)
        self.worker.wait_for_save(None)

    def _responses(self, batch: list[FakeRequest], chunks: list[tuple[int, int]]) -> None:
        tpb = self.layout.tokens_per_block
        for req, (_, end) in zip(batch, chunks, strict=True):
            req.context_current_position = end
            if end < len(req.get_tokens(0)):
                continue  # a context chunk short of the prompt's end
            req.state = "generation"
            req.output.append(sum(req.get_tokens(0)) % 256)
            if len(req.block_ids) * tpb < len(req.get_tokens(0)):
                req.block_ids.append(self.free_blocks.pop(0))
            if len(req.output) >= req.max_tokens:
                if self.scheduler.request_finished(req, list(req.block_ids)):
                    req.state = "saving"  # blocks pinned until the save is reported
                    self.new_saving[req.request_id] = req
                else:
                    self._free(req)

    def _get_finished(self) -> None:
        started, finished_gen = list(self.new_loading), list(self.new_saving)
        self.pending_loading.update(self.new_loading)
        self.pending_saving.update(self.new_saving)
        self.new_loading, self.new_saving = {}, {}
        done_saving, done_loading = self.worker.get_finished(finished_gen, started)
        for rid in done_loading:  # extract_by_id: KeyError unless it was passed in
            req = self.pending_loading.pop(rid)
            req.state = "context"
            self.loaded_events.append(rid)
        for rid in done_saving:
            self._free(self.pending_saving.pop(rid))

    def _free(self, req: FakeRequest) -> None:
        req.state = "done"
        self.free_blocks += req.block_ids
        self.free_slots.append(req.slot)
        req.block_ids = []
        del self.active[req.request_id]
        self.reported.pop(req.request_id, None)
