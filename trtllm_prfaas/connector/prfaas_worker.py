"""The PrfaaS connector's worker half (every rank; see ``connector/prfaas.py``)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from trtllm_prfaas.connector.base import (
    KvCacheConnectorWorker,
    RecurrentStates,
    SupportsCancel,
    SupportsLoadFailures,
    SupportsRecurrentStates,
)
from trtllm_prfaas.connector.device import DONE, DeviceBackend, DeviceEvent, Landing, backend_for
from trtllm_prfaas.connector.prfaas_meta import (
    LoadPlan,
    PrfaasMeta,
    SendPlan,
    is_reference_host,
    runtime_of,
)
from trtllm_prfaas.connector.prfaas_runtime import transfer_id_for
from trtllm_prfaas.errors import ConfigError, ConnectorError, TransportError
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport import InboundStatus, Kind, ReceivedItem, TransferHandle

__all__ = ["PrfaasConnectorWorker"]

_Snapshots = dict[int, dict[int, torch.Tensor]]  # block -> decoder layer -> state bytes

log = get_logger(__name__)


@dataclass
class _Outbound:
    """One request's export on this rank; ``keep`` holds the staged layers until it ends."""

    handle: TransferHandle | None
    error: str | None = None
    keep: list[torch.Tensor] = field(default_factory=list)

    @property
    def is_over(self) -> bool:
        return self.handle is None or self.handle.status.is_terminal


class PrfaasConnectorWorker(  # type: ignore[misc]
    KvCacheConnectorWorker, SupportsRecurrentStates, SupportsLoadFailures, SupportsCancel
):
    """Every rank. Hooks never wait on the network: sends go through the runtime's pump."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.runtime = runtime_of(llm_args)
        self._reports_failures = is_reference_host(llm_args)  # SupportsLoadFailures is used
        self.kv_pool: Any = None
        self.backend: DeviceBackend | None = None
        self.states: RecurrentStates | None = None
        self._outbound: dict[int, _Outbound] = {}
        self._waiting: dict[int, tuple[LoadPlan, float]] = {}  # still arriving here; deadline
        self._stream: Any = None  # the last hook stream: where waiting loads are enqueued
        self._landing: dict[int, list[Landing]] = {}  # enqueued loads by request
        self._draining: list[Landing] = []  # cancelled loads whose copies may still run
        self._saving: set[int] = set()  # passed in finished_gen_req_ids, not yet returned
        self._loading: set[int] = set()
        self._loaded: set[int] = set()  # finished before their id was passed in
        self._load_uuid: dict[int, str] = {}  # enqueued, not failed: request id -> transfer
        self._failed: list[tuple[int, str]] = []
        self.transfer_errors: dict[int, str | None] = {}  # request id -> outcome, for the host
        self.tokens_per_block = int(llm_args.kv_cache_config.tokens_per_block)

    # ---- registration ---------------------------------------------------------------------
    def register_kv_caches(self, kv_cache_tensor: Any) -> None:
        self.kv_pool, self.backend = kv_cache_tensor, backend_for(kv_cache_tensor)

    def register_recurrent_states(self, states: RecurrentStates) -> None:
        self.states = states

    def _pool_layer(self, layer_idx: int) -> int | None:
        """The pool layer of a decoder layer (None: a linear-attention layer). Without the
        hybrid capability every decoder layer is a pool layer (dense, pipeline parallelism 1)."""
        if self.states is None:
            return layer_idx
        return self.states.pool_layer_of.get(layer_idx)

    # ---- decode side: loads ------------------------------------------------------------------
    def start_load_kv(self, stream: Any) -> None:
        meta: PrfaasMeta = self._metadata
        self._stream = stream
        receiver = self.runtime.receiver
        for drop in meta.drops:
            if receiver is not None:
                receiver.release(transfer_id_for(drop.transfer_uuid, drop.tokens, self.runtime.key))
        deadline = time.monotonic() + self.runtime.config.load_timeout_s
        for load in meta.loads:
            self._waiting[load.request_id] = (load, deadline)
        self._start_waiting_loads(stream)

    def _start_waiting_loads(self, stream: Any) -> None:
        """Rank 0 claimed only a whole transfer, but this rank's may still be arriving (the
        worker should have waited for every rank): such a load waits, without blocking, until
        its transfer is whole or ``load_timeout_s`` passed."""
        for rid, (load, deadline) in list(self._waiting.items()):
            if self._start_load(load, deadline, stream):
                del self._waiting[rid]

    def _start_load(self, load: LoadPlan, deadline: float, stream: Any) -> bool:
        """Enqueue every layer's copy into the pool and give the receiver's buffers back (an
        async backend has copied them into pinned staging). False: not whole yet, try later."""
        receiver = self.runtime.receiver
        tid = transfer_id_for(load.transfer_uuid, load.tokens, self.runtime.key)
        try:
            if receiver is None:
                raise ConfigError("a load planned on a runtime without a relay receiver")
            status = receiver.status(tid)
            arriving = status is None or status is InboundStatus.RECEIVING
            if arriving and time.monotonic() < deadline:
                return False
            if status is not InboundStatus.COMPLETE:
                raise TransportError(
                    f"transfer {tid} is {status.value if status else 'unknown'} on rank "
                    f"{self.runtime.rank}: only whole transfers are loaded"
                )
            snapshots: _Snapshots = {}  # block -> decoder layer -> its state after the block
            self._landing[load.request_id] = [
                landing
                for layer in sorted(receiver.completed_layers(tid))
                for item in receiver.layer_items(tid, layer)
                for landing in self._place(load, layer, item, stream, snapshots)
            ]
            self._load_uuid[load.request_id] = load.transfer_uuid
            for block, layers in snapshots.items():
                self._store_snapshot(load, block, layers)
        except Exception as exc:  # never park the request: report it (see module docstring)
            self._fail_load(load, exc)
        if receiver is not None:
            receiver.release(tid)
        return True

    def _place(
        self,
        load: LoadPlan,
        layer: int,
        item: ReceivedItem,
        stream: Any,
        snapshots: _Snapshots | None = None,
    ) -> list[Landing]:
        """Copy one received item where it goes: blocks into the pool (async, skipping reused
        ones), the state after L into the request's slot. States at a block boundary go into
        ``snapshots`` too (kept by ``_store_snapshot`` once every layer is placed): the states
        after S (block range (S/B, S/B)), and the state after L when L is block aligned."""
        if item.key.kind is Kind.STATE:
            if snapshots is not None:
                self._keep_snapshot(len(load.tokens), layer, item, snapshots)
            if not item.key.block_start:  # the state after L (the others are snapshots only)
                self._place_state(load.request_id, layer, item)
            return []
        pool_layer = self._pool_layer(layer)
        if pool_layer is None:
            raise ConnectorError(f"KV blocks arrived for linear-attention layer {layer}")
        assert self.backend is not None
        landings = []
        for first, rows in self._pieces(item):
            skip = max(0, load.skip_blocks - first)  # reused device blocks stay as they are
            if skip >= len(rows):
                continue
            ids = load.device_blocks[first + skip : first + len(rows)]
            landings.append(
                self.backend.write_blocks(self.kv_pool, pool_layer, ids, rows[skip:], stream)
            )
        return landings

    def _pieces(self, item: ReceivedItem) -> list[tuple[int, torch.Tensor]]:
        """``(first request block, rows)`` host views of an item, chunk by chunk when every
        chunk covers whole blocks (no assembly copy), else the assembled item."""
        start, end = item.key.block_start, item.key.block_end
        block_bytes = item.nbytes // max(1, end - start)
        chunks = item.chunks
        if len(chunks) > 1 and all(
            off % block_bytes == 0 and piece.nbytes % block_bytes == 0 for off, piece in chunks
        ):
            return [(start + off // block_bytes, self._rows(piece)) for off, piece in chunks]
        return [(start, self._rows(item.buffer))]

    def _rows(self, buffer: memoryview) -> torch.Tensor:
        rows = self.kv_pool.shape[2:]  # (kv_factor, row)
        data = torch.frombuffer(buffer, dtype=torch.uint8).view(self.kv_pool.dtype)
        return data.view(-1, *rows)

    def _place_state(self, request_id: int, layer: int, item: ReceivedItem) -> None:
        """Reference engine only: the recurrent state after L tokens, into the request's slot."""
        states = self.states
        if states is None or layer not in states.state_layer_of:
            raise ConnectorError(f"a recurrent state arrived for layer {layer}; none is held")
        target = states.tensor[states.slot_of(request_id), states.state_layer_of[layer]]
        data = torch.frombuffer(item.buffer, dtype=torch.uint8)
        target.copy_(data.view(target.dtype).view(target.shape))

    def _keep_snapshot(
        self, num_tokens: int, layer: int, item: ReceivedItem, snapshots: _Snapshots
    ) -> None:
        """A state item that ends at a block boundary: the states after S, or the state after
        L when L (``num_tokens``) is block aligned."""
        tpb = self.tokens_per_block
        block = item.key.block_start or (0 if num_tokens % tpb else num_tokens // tpb)
        if block:
            data = torch.frombuffer(item.buffer, dtype=torch.uint8).clone()  # outlives release
            snapshots.setdefault(block, {})[layer] = data

    def _store_snapshot(self, load: LoadPlan, block: int, layers: dict[int, torch.Tensor]) -> None:
        """Relayed states after ``block`` blocks (every linear layer) to the engine's prefix
        cache, when it keeps snapshots. A partial set (cannot happen over a whole transfer) is
        logged and dropped: the next turn resumes earlier, never wrongly."""
        states = self.states
        if states is None or states.store_snapshot is None:
            return
        if set(layers) != set(states.state_layer_of):
            log.warning("prfaas_snapshot_incomplete", request_id=load.request_id, block=block,
                        layers=sorted(layers))  # fmt: skip
            return
        full = torch.empty_like(states.tensor[0])  # (num_linear_layers, heads, d_k, d_v)
        for layer, data in layers.items():
            target = full[states.state_layer_of[layer]]
            target.copy_(data.view(target.dtype).view(target.shape))
        states.store_snapshot(load.request_id, block * self.tokens_per_block, full)

    def _fail_load(self, load: LoadPlan, exc: BaseException) -> None:
        """Count, log, and report: to the reference engine as a failed load; inside TensorRT-LLM
        (which cannot fail a parked request) as loaded, and as ``load_failed`` to the worker's
        status queries, so it can fail or retry the response."""
        rid = load.request_id
        self.runtime.note_load_failed(load.transfer_uuid, str(exc))
        recovery = "host fails it" if self._reports_failures else "reported loaded: output suspect"
        log.error("prfaas_load_failed", request_id=rid, error=repr(exc), recovery=recovery)
        if self._reports_failures:
            self._failed.append((rid, str(exc)))
        else:
            self._landing[rid] = []

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        return None  # async loads: requests stay parked until their copies completed

    def get_failed_loads(self) -> list[tuple[int, str]]:
        """Capability ``SupportsLoadFailures``: loads that failed since the last call."""
        failed, self._failed = self._failed, []
        return failed

    def cancel_load(self, request_id: int) -> None:
        """Capability ``SupportsCancel``: the host gave up on this load."""
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None and self.runtime.receiver is not None:
            load = waiting[0]
            tid = transfer_id_for(load.transfer_uuid, load.tokens, self.runtime.key)
            self.runtime.receiver.release(tid)
        self._draining += self._landing.pop(request_id, [])
        self._load_uuid.pop(request_id, None)
        self._loading.discard(request_id)
        self._loaded.discard(request_id)

    # ---- prefill side: sends ---------------------------------------------------------------
    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        meta: PrfaasMeta = self._metadata
        if not meta.sends:
            return
        pool_layer = self._pool_layer(layer_idx)
        for plan in meta.sends:
            out = self._outbound_for(plan)
            if out.handle is None or out.error is not None:
                continue
            try:
                if pool_layer is not None:
                    self._send_blocks(plan, out, layer_idx, pool_layer, stream)
                elif plan.snapshot_tokens:  # a linear layer: its state after S (chunk end)
                    self._send_state(plan, out, layer_idx, plan.snapshot_tokens)
                elif plan.is_last:  # a linear layer: its state after L tokens, once
                    self._send_state(plan, out, layer_idx)
            except Exception as exc:  # a hook exception would end every active request
                self._fail_send(plan.request_id, out, exc)

    def _fail_send(self, request_id: int, out: _Outbound, exc: BaseException) -> None:
        """End this request's export with the error; the executor and other requests go on."""
        log.error("prfaas_send_failed", request_id=request_id, error=repr(exc))
        out.error = f"send failed: {exc!r}"
        if out.handle is not None:
            out.handle.cancel()

    def _send_blocks(
        self, plan: SendPlan, out: _Outbound, layer_idx: int, pool_layer: int, stream: Any
    ) -> None:
        assert self.backend is not None and out.handle is not None
        staged = self.backend.stage_blocks(self.kv_pool, pool_layer, plan.device_blocks, stream)
        out.keep.append(staged.host)  # zero-copy send: alive until the transfer ends
        span = (plan.block_start, plan.block_start + len(plan.device_blocks))
        send = functools.partial(
            out.handle.send, Kind.FULL_BLOCK, layer_idx, span, staged.host,
            last_in_layer=plan.is_last,
        )  # fmt: skip
        self.runtime.pump.submit(staged.event, send)

    def _send_state(
        self, plan: SendPlan, out: _Outbound, layer_idx: int, snapshot_tokens: int = 0
    ) -> None:
        """The layer's state now: after L (the closing item, block range (0, 0)), or after the
        snapshot boundary S (block range (S/B, S/B), not closing the layer: the state after L
        follows in a later chunk)."""
        states = self.states
        assert states is not None and out.handle is not None
        slot = states.slot_of(plan.request_id)
        state = states.tensor[slot, states.state_layer_of[layer_idx]].clone()  # host memory
        out.keep.append(state)
        block = snapshot_tokens // self.tokens_per_block
        send = functools.partial(
            out.handle.send, Kind.STATE, layer_idx, (block, block), state,
            last_in_layer=not snapshot_tokens,
        )  # fmt: skip
        self.runtime.pump.submit(DONE, send)

    def _outbound_for(self, plan: SendPlan) -> _Outbound:
        """This rank's export of the request, opened on its first send plan."""
        out = self._outbound.get(plan.request_id)
        if out is not None:
            return out
        try:
            out = _Outbound(self._open(plan))
        except Exception as exc:  # a hook exception would end every active request
            log.error("prfaas_send_failed", request_id=plan.request_id, error=str(exc))
            out = _Outbound(None, str(exc))
        self._outbound[plan.request_id] = out
        return out

    def _open(self, plan: SendPlan) -> TransferHandle:
        rank, size = self.runtime.rank, self.runtime.tp_size
        if len(plan.relay_endpoints) != size:
            raise ConfigError(
                f"{len(plan.relay_endpoints)} decode relay endpoint(s) for a prefill "
                f"deployment of tensor-parallel size {size}: the sizes must be equal"
            )
        if plan.tokens is None:
            raise ConnectorError(f"request {plan.request_id}: first send plan without tokens")
        tid = transfer_id_for(plan.transfer_uuid, plan.tokens, self.runtime.key)
        sender = self.runtime.sender_for(plan.relay_endpoints[rank])
        timeout_s = self.runtime.config.transfer_timeout_s
        return sender.open_transfer(tid, str(plan.request_id), timeout_s)

    def wait_for_save(self, stream: Any) -> None:
        meta: PrfaasMeta = self._metadata
        for plan in meta.sends:
            out = self._outbound.get(plan.request_id)
            if plan.is_last and out and out.handle is not None and out.error is None:
                self.runtime.pump.submit(DONE, out.handle.finish)  # after the queued sends

    def cancel_save(self, request_id: int) -> None:
        """Capability ``SupportsCancel``: the host gave up on this save."""
        out = self._outbound.pop(request_id, None)
        if out is not None and out.handle is not None:
            out.handle.cancel()
        self._saving.discard(request_id)

    # ---- both ------------------------------------------------------------------------------
    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list[int], list[int]]:
        self._saving.update(finished_gen_req_ids)
        self._loading.update(started_loading_req_ids)
        self._start_waiting_loads(self._stream)
        self._draining = [d for d in self._draining if not d.event.query()]
        return self._finished_saves(), self._finished_loads()

    def _finished_saves(self) -> list[int]:
        done = []
        for rid in sorted(self._saving):
            out = self._outbound.get(rid)
            if out is not None and not out.is_over:
                continue
            error = out.error if out is not None else None  # ours first: it says why
            if error is None and out is not None and out.handle and out.handle.error is not None:
                error = str(out.handle.error)
            self.transfer_errors[rid] = error
            if error is not None:
                self.runtime.count("sends_failed")
                log.warning("relay_send_failed", request_id=rid, error=error)
            self._outbound.pop(rid, None)
            self._saving.discard(rid)
            done.append(rid)
        return done

    def _finished_loads(self) -> list[int]:
        for rid, landings in list(self._landing.items()):
            if all(_complete(landing.event) for landing in landings):
                del self._landing[rid]  # the staging may be reused now
                self._loaded.add(rid)
                uuid = self._load_uuid.pop(rid, None)
                if uuid is not None:  # the worker fronting the engine asks for this
                    self.runtime.note_loaded(uuid)
        done = sorted(self._loaded & self._loading)
        self._loaded -= set(done)
        self._loading -= set(done)
        return done


def _complete(event: DeviceEvent) -> bool:
    return event.query()
