"""The PrfaaS KV cache connector: prefill nodes export KV layer by layer, decode nodes import it.

TensorRT-LLM loads it through ``kv_connector_config`` (``connector_module:
trtllm_prfaas.connector.prfaas``, ``PrfaasConnectorScheduler`` / ``PrfaasConnectorWorker``); the
reference engine hosts the same classes on CPUs. One role per process (``Role``).

Prefill side (exports). A request carries ``{"transfer_uuid", "relay_endpoint"}`` in its
connector params. For every prefill chunk, ``save_kv_layer`` sends that layer's newly completed
blocks right after the layer ran (layer-wise pipelining: layer i is on the wire while layer i+1
computes); the chunk that ends at L-1 tokens also sends the partial tail block and every
linear-attention layer's recurrent state (the state for exactly the L-1 tokens the decode side
will claim), closing each layer. ``request_finished`` returns True while the transfer is not
acknowledged; ``get_finished`` reports it once acknowledged, failed, or past its deadline.

Decode side (imports). A request carries ``{"transfer_uuid"}``. ``get_num_new_matched_tokens``
looks the content-bound transfer id up in the local relay receiver's index (a dictionary: no
network I/O); if the transfer is announced it claims L-1 tokens with ``load_async=True``.
``start_load_kv`` starts a loader thread that waits for each layer in turn, copies its blocks into
the pool and its state into the request's state slot, and frees the receive buffers; the
request stays parked until ``get_finished`` reports the load. A failed or late load is reported
through the ``get_failed_loads`` extension, and the engine's policy recomputes or fails it.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from trtllm_prfaas.connector.base import (
    KvCacheConnectorScheduler,
    KvCacheConnectorWorker,
    RecurrentStates,
    SchedulerOutput,
)
from trtllm_prfaas.connector.prfaas_runtime import (
    PrfaasRuntime,
    Role,
    cache_key_of,
    runtime_for,
    transfer_id_for,
)
from trtllm_prfaas.errors import ConfigError, TransferTimeout
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport import InboundStatus, Kind, ReceivedItem, TransferHandle

__all__ = ["PrfaasConnectorScheduler", "PrfaasConnectorWorker", "PrfaasMeta"]

log = get_logger(__name__)
T = TypeVar("T")


@dataclass
class _SendPlan:
    request_id: int
    transfer_id: str
    endpoint: str
    device_blocks: list[int]  # blocks [block_start, block_end) of the request, in order
    block_start: int
    is_last: bool  # this chunk completes the L-1 claimed tokens: close every layer, finish
    has_exact_state: bool = True  # the recurrent states now are those after exactly L-1 tokens


@dataclass
class _LoadPlan:
    request_id: int
    transfer_id: str
    device_blocks: list[int] = field(default_factory=list)


@dataclass
class PrfaasMeta:
    sends: list[_SendPlan]
    loads: list[_LoadPlan]


@dataclass
class _Export:
    transfer_id: str
    endpoint: str
    last: int  # L-1: the tokens the decode side will claim
    blocks: list[int] = field(default_factory=list)
    num_sent_blocks: int = 0
    is_done: bool = False


class _Cancel:
    """Cancellation of one load; ``lock`` is held by the loader while it writes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cancelled = False

    def set(self) -> None:
        with self.lock:
            self.cancelled = True


_POLL_S = 0.05  # how often a waiting loader checks for cancellation


def _wait(wait: Callable[[float], T], deadline: float, cancel: _Cancel) -> T:
    """``wait(timeout)`` in short slices until it returns, the deadline passes, or cancel."""
    while True:
        remaining = deadline - time.monotonic()
        if cancel.cancelled or remaining <= 0:
            raise TransferTimeout("relayed KV load cancelled or past its deadline")
        try:
            return wait(min(remaining, _POLL_S))
        except TransferTimeout:
            continue


def _runtime_of(llm_args: Any) -> PrfaasRuntime:
    """The runtime the host passed in ``connector_options`` (the reference engine), or, inside
    TensorRT-LLM (no such option), this process's one from the ``TRTLLM_PRFAAS_*`` variables."""
    runtime = (getattr(llm_args, "connector_options", None) or {}).get("prfaas_runtime")
    if runtime is None:
        from trtllm_prfaas.config import connector_config_from_env  # the edge: reads the env

        return runtime_for(connector_config_from_env(), cache_key_of(llm_args))
    if not isinstance(runtime, PrfaasRuntime):
        raise ConfigError("connector_options['prfaas_runtime'] must be a PrfaasRuntime")
    return runtime


def _params_of(request: Any) -> dict[str, Any]:
    """``request.connector_params`` (reference engine) or the params TensorRT-LLM carries in
    ``py_disaggregated_params.opaque_state`` (see ``engines/trtllm.py``)."""
    from trtllm_prfaas.engines.trtllm import connector_params_of

    return connector_params_of(request)


class PrfaasConnectorScheduler(KvCacheConnectorScheduler):  # type: ignore[misc]
    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.runtime = _runtime_of(llm_args)
        self.tokens_per_block = int(llm_args.kv_cache_config.tokens_per_block)
        self._exports: dict[int, _Export] = {}
        self._pending_loads: dict[int, _LoadPlan] = {}

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        params, prompt = _params_of(request), list(request.get_tokens(0))
        uuid = params.get("transfer_uuid")
        if uuid is None or len(prompt) < 2:
            return 0, False
        transfer_id = transfer_id_for(uuid, prompt, self.runtime.key)
        if self.runtime.config.role is Role.PREFILL:
            endpoint = params["relay_endpoint"]
            self._exports[request.request_id] = _Export(transfer_id, endpoint, len(prompt) - 1)
            return 0, False
        receiver = self.runtime.receiver
        assert receiver is not None
        status = receiver.status(transfer_id)  # an in-process look-up, never network I/O
        if status not in (InboundStatus.RECEIVING, InboundStatus.COMPLETE):
            return 0, False
        self._pending_loads[request.request_id] = _LoadPlan(request.request_id, transfer_id)
        return len(prompt) - 1, True

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        load = self._pending_loads.get(request.request_id)
        if load is not None:
            load.device_blocks = list(block_ids)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PrfaasMeta:
        loads = list(self._pending_loads.values())
        self._pending_loads.clear()
        sends = []
        for data in scheduler_output.new_requests + scheduler_output.cached_requests:
            export = self._exports.get(data.request_id)
            if export is None:
                continue
            export.blocks += data.new_block_ids
            plan = self._plan_send(
                data.request_id, export, data.computed_position + data.num_scheduled_tokens
            )
            if plan is not None:
                sends.append(plan)
        return PrfaasMeta(sends, loads)

    def _plan_send(self, request_id: int, export: _Export, end: int) -> _SendPlan | None:
        """Blocks completed by a chunk ending at ``end``; the chunk that completes the L-1
        claimed tokens also sends the partial tail block and closes every layer.

        The reference engine computes the last prompt token alone, so that chunk ends exactly at
        L-1 and the recurrent states are those after L-1 tokens. An engine whose chunk runs on
        to L (TensorRT-LLM) yields the blocks but not that state (``has_exact_state=False``)."""
        if export.is_done:
            return None
        tpb = self.tokens_per_block
        is_last = end >= export.last
        stop = -(-export.last // tpb) if is_last else end // tpb
        start = export.num_sent_blocks
        if stop <= start:
            if not is_last:
                return None
            start = stop - 1  # every layer needs a closing item: resend the last block
        export.num_sent_blocks, export.is_done = stop, is_last
        return _SendPlan(
            request_id,
            export.transfer_id,
            export.endpoint,
            export.blocks[start:stop],
            start,
            is_last,
            end == export.last,
        )

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        self._pending_loads.pop(request.request_id, None)
        return self._exports.pop(request.request_id, None) is not None


class PrfaasConnectorWorker(KvCacheConnectorWorker):  # type: ignore[misc]
    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.runtime = _runtime_of(llm_args)
        self.kv_pool: torch.Tensor | None = None
        self.states: RecurrentStates | None = None
        self._handles: dict[int, TransferHandle] = {}
        self._saving: set[int] = set()  # passed in finished_gen_req_ids, not yet returned
        self._loading: set[int] = set()
        self._loaded: set[int] = set()  # finished before their id was passed in
        self._failed: list[tuple[int, str]] = []
        self._cancelled: dict[int, _Cancel] = {}
        self.transfer_errors: dict[int, str | None] = {}  # request id -> outcome, for the host

    # ---- registration ---------------------------------------------------------------------
    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        self.kv_pool = kv_cache_tensor

    def register_recurrent_states(self, states: RecurrentStates) -> None:
        self.states = states

    # ---- decode side: loads ------------------------------------------------------------------
    def start_load_kv(self, stream: Any) -> None:
        meta: PrfaasMeta = self._metadata
        for load in meta.loads:
            cancel = self._cancelled.setdefault(load.request_id, _Cancel())
            self.runtime.start_load(load.request_id, functools.partial(self._load, load, cancel))

    def _load(self, plan: _LoadPlan, cancel: _Cancel) -> None:
        """Loader thread: each layer as it arrives, into the pool or the state slot.

        Writes happen under ``cancel.lock`` after checking it, so once ``cancel_load`` returns
        this thread never touches the request's blocks or state slot again (the engine may hand
        them to another request at once)."""
        receiver, states = self.runtime.receiver, self.states
        assert receiver is not None and states is not None and self.kv_pool is not None
        deadline = time.monotonic() + self.runtime.config.load_timeout_s
        tid = plan.transfer_id
        try:
            for layer in range(len(states.pool_layer_of) + len(states.state_layer_of)):
                wait_layer = functools.partial(receiver.wait_layer, tid, layer)
                items = _wait(wait_layer, deadline, cancel)
                with cancel.lock:
                    if cancel.cancelled:
                        raise TransferTimeout(f"load of {tid} cancelled")
                    for item in items:
                        self._place_item(plan, layer, item)
                receiver.release_layer(tid, layer)
            # Keep the transfer until its COMPLETE arrives, so the receiver can acknowledge it
            # (the last layer may be consumed before the sender's COMPLETE message lands).
            _wait(functools.partial(receiver.wait_transfer, tid), deadline, cancel)
        finally:
            receiver.release(tid)

    def _place_item(self, plan: _LoadPlan, layer: int, item: ReceivedItem) -> None:
        """Place one received item. Blocks arrive as several chunks; when every chunk covers
        whole blocks (chunk_bytes a multiple of a block's bytes, the usual case) each chunk
        goes straight from its ZeroMQ frame into the pool, saving the copy that assembling
        the item into one buffer would cost."""
        start, end = item.key.block_start, item.key.block_end
        pool_layer = self.states.pool_layer_of.get(layer) if self.states else None
        chunks = item.chunks
        if pool_layer is None or len(chunks) == 1 or end <= start or item.nbytes % (end - start):
            self._place(plan, layer, start, end, item.buffer)
            return
        block_bytes = item.nbytes // (end - start)
        if any(off % block_bytes or piece.nbytes % block_bytes for off, piece in chunks):
            self._place(plan, layer, start, end, item.buffer)
            return
        for offset, piece in chunks:
            first = start + offset // block_bytes
            self._place(plan, layer, first, first + piece.nbytes // block_bytes, piece)

    def _place(self, plan: _LoadPlan, layer: int, start: int, end: int, buffer: Any) -> None:
        assert self.kv_pool is not None and self.states is not None
        data = torch.frombuffer(buffer, dtype=torch.uint8)
        pool_layer = self.states.pool_layer_of.get(layer)
        if pool_layer is None:  # a linear-attention layer: the recurrent state after L-1 tokens
            slot = self.states.slot_of(plan.request_id)
            target = self.states.tensor[slot, self.states.state_layer_of[layer]]
            target.copy_(data.view(target.dtype).view(target.shape))
            return
        rows = self.kv_pool.shape[1:]  # (num_full_layers, 2, row)
        blocks = data.view(self.kv_pool.dtype).view(end - start, *rows[1:])
        ids = torch.tensor(plan.device_blocks[start:end], dtype=torch.int64)
        self.kv_pool[ids, pool_layer] = blocks

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        return None  # async loads: requests stay parked until every layer is in place

    def cancel_load(self, request_id: int) -> None:
        """Extension: the engine gave up on this load (deadline or abort)."""
        self._cancelled.setdefault(request_id, _Cancel()).set()  # no write to its blocks after
        self._loading.discard(request_id)

    def get_failed_loads(self) -> list[tuple[int, str]]:
        """Extension: loads that failed since the last call, as (request id, reason)."""
        failed, self._failed = self._failed, []
        return failed

    # ---- prefill side: sends ---------------------------------------------------------------
    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        meta: PrfaasMeta = self._metadata
        if not meta.sends:
            return
        assert self.kv_pool is not None and self.states is not None
        pool_layer = self.states.pool_layer_of.get(layer_idx)
        for plan in meta.sends:
            handle = self._handle_for(plan)
            if pool_layer is not None:
                ids = torch.tensor(plan.device_blocks, dtype=torch.int64)
                payload = self.kv_pool[ids, pool_layer]  # a gathered copy: (n, 2, row)
                span = (plan.block_start, plan.block_start + len(plan.device_blocks))
                handle.send(Kind.FULL_BLOCK, layer_idx, span, payload, last_in_layer=plan.is_last)
            elif plan.is_last and plan.has_exact_state:
                slot = self.states.slot_of(plan.request_id)
                state = self.states.tensor[slot, self.states.state_layer_of[layer_idx]].clone()
                handle.send(Kind.STATE, layer_idx, (0, 0), state, last_in_layer=True)
            elif plan.is_last:  # never ship a state for the wrong length: the decode recomputes
                log.warning(
                    "relay_state_unavailable",
                    request_id=plan.request_id,
                    reason="the engine computed token L-1 inside a chunk",
                )
                handle.cancel()

    def _handle_for(self, plan: _SendPlan) -> TransferHandle:
        handle = self._handles.get(plan.request_id)
        if handle is None:
            sender = self.runtime.sender_for(plan.endpoint)
            handle = sender.open_transfer(
                plan.transfer_id, str(plan.request_id), self.runtime.config.transfer_timeout_s
            )
            self._handles[plan.request_id] = handle
        return handle

    def wait_for_save(self, stream: Any) -> None:
        meta: PrfaasMeta = self._metadata
        for plan in meta.sends:
            if plan.is_last:
                self._handles[plan.request_id].finish()

    def cancel_save(self, request_id: int) -> None:
        """Extension: the engine gave up on this save (deadline or abort)."""
        handle = self._handles.pop(request_id, None)
        if handle is not None:
            handle.cancel()
        self._saving.discard(request_id)

    # ---- both ------------------------------------------------------------------------------
    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        self._saving.update(finished_gen_req_ids)
        self._loading.update(started_loading_req_ids)
        return self._finished_saves(), self._finished_loads()

    def _finished_saves(self) -> list[int]:
        done = []
        for rid in list(self._saving):
            handle = self._handles.get(rid)
            if handle is not None and not handle.status.is_terminal:
                continue
            error = handle.error if handle is not None else None
            self.transfer_errors[rid] = None if error is None else str(error)
            if error is not None:
                log.warning("relay_send_failed", request_id=rid, error=str(error))
            self._handles.pop(rid, None)
            self._saving.discard(rid)
            done.append(rid)
        return done

    def _finished_loads(self) -> list[int]:
        for result in self.runtime.take_results():
            cancelled = self._cancelled.pop(result.request_id, _Cancel()).cancelled
            if cancelled:
                continue
            if result.error is not None:
                self._failed.append((result.request_id, str(result.error)))
                self._loading.discard(result.request_id)
            else:
                self._loaded.add(result.request_id)
        done = sorted(self._loaded & self._loading)
        self._loaded -= set(done)
        self._loading -= set(done)
        return done
