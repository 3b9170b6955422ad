"""The PrfaaS KV cache connector: prefill nodes export KV layer by layer, decode nodes import it.

TensorRT-LLM loads it through ``kv_connector_config`` (``connector_module:
trtllm_prfaas.connector.prfaas``, ``PrfaasConnectorScheduler`` / ``PrfaasConnectorWorker``); the
reference engine hosts the same classes on CPUs. One role per deployment (``Role``); one
:class:`~trtllm_prfaas.connector.prfaas_runtime.PrfaasRuntime` per rank.

The request carrier is a :class:`~trtllm_prfaas.connector.plans.Plan` posted beside the request
(``connector/plans.py``): the scheduler takes it from its rank-0 book by the tokens it would claim
(prefill: the whole prompt; decode: all but the last token, t1). No plan: nothing is exported or
imported, counted (``plans_missed``) and logged (``prfaas_plan_missing``).

Prefill (export). The handoff is prompt plus first token: the prefill runs all L prompt tokens.
For every chunk, ``save_kv_layer`` stages the layer's newly completed blocks (device-to-host into
pinned staging on the hook's stream, with an event) and the send pump relays them once the event
completed, off the executor's thread; the chunk that ends at L also sends the partial tail block
(and, on the reference engine, every linear layer's recurrent state after L) and closes each
layer. Each rank r sends its own shard under its own transfer id to ``plan.relay_endpoints[r]``.
``request_finished`` pins the blocks until ``get_finished`` reports the transfer acknowledged
(or failed).

Decode (import). The worker fronting the engine submits the decode request only once its transfer
is COMPLETE in host memory on every rank. ``get_num_new_matched_tokens`` claims ``L -
num_computed_tokens`` tokens (never more; the C++ ``setPrepopulatedPromptLen`` check needs at
least one uncomputed token) with ``load_async=True``, and only when rank 0's transfer is COMPLETE.
``start_load_kv`` copies every block at or above ``num_computed_tokens // tokens_per_block``
(reused device blocks are never written) from host memory into the pool on the hook's stream, with
an event; ``get_finished`` reports the load once the event completed. A load that fails anyway
(a bug, or a rank whose data vanished) is logged as ``prfaas_load_failed`` and counted; the
reference engine then fails the request (``SupportsLoadFailures``) and the worker resubmits it
without the plan; inside TensorRT-LLM, which has no such call, the load is reported finished so
the request is never parked forever (its output is then not to be trusted: the error says so).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trtllm_prfaas.connector.base import (
    KvCacheConnectorScheduler,
    KvCacheConnectorWorker,
    RecurrentStates,
    SchedulerOutput,
    SupportsCancel,
    SupportsLoadFailures,
    SupportsRecurrentStates,
)
from trtllm_prfaas.connector.device import DONE, DeviceBackend, DeviceEvent, Landing, backend_for
from trtllm_prfaas.connector.plans import Plan
from trtllm_prfaas.connector.prfaas_runtime import (
    PrfaasRuntime,
    Role,
    cache_key_of,
    runtime_for,
    tp_size_of,
    transfer_id_for,
)
from trtllm_prfaas.errors import ConfigError, ConnectorError, PrfaasError, TransportError
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport import InboundStatus, Kind, ReceivedItem, TransferHandle

__all__ = ["PrfaasConnectorScheduler", "PrfaasConnectorWorker", "PrfaasMeta", "hybrid_reason"]

log = get_logger(__name__)


@dataclass
class _SendPlan:
    request_id: int
    transfer_uuid: str
    relay_endpoints: list[str]
    tokens: list[int] | None  # the L tokens: in the request's first send only (ids per rank)
    device_blocks: list[int]  # blocks [block_start, block_start + n) of the request, in order
    block_start: int
    is_last: bool  # this chunk ends at L: send the tail, close every layer, finish


@dataclass
class _LoadPlan:
    request_id: int
    transfer_uuid: str
    tokens: list[int]  # the L claimed tokens (each rank derives its own transfer id)
    skip_blocks: int  # num_computed_tokens // tokens_per_block: reused blocks, never written
    device_blocks: list[int] = field(default_factory=list)


@dataclass
class _Drop:
    """A transfer nobody will load (not complete at claim time, or all reused): every rank
    releases its buffers (a still-receiving transfer is abandoned: its sender is told)."""

    transfer_uuid: str
    tokens: list[int]


@dataclass
class PrfaasMeta:
    """Broadcast unchanged to every rank (picklable: plain dataclasses and lists)."""

    sends: list[_SendPlan] = field(default_factory=list)
    loads: list[_LoadPlan] = field(default_factory=list)
    drops: list[_Drop] = field(default_factory=list)


@dataclass
class _Export:
    plan: Plan
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    num_sent_blocks: int = 0
    is_announced: bool = False
    is_done: bool = False


_HYBRID_KEYS = ("hybrid_override_pattern", "layers_block_type", "layer_types", "mamba_d_state")


def hybrid_reason(model: str) -> str | None:
    """Why ``model`` (a path holding a Hugging Face ``config.json``) is a hybrid model that
    TensorRT-LLM's connector API cannot serve, or None (dense, or no readable config)."""
    path = Path(model) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    model_type = str(config.get("model_type", "")).lower()
    kinds = [str(v).lower() for key in _HYBRID_KEYS[1:3] for v in (config.get(key) or [])]
    is_hybrid = (
        "mamba" in model_type
        or "hybrid" in model_type
        or bool(config.get("hybrid_override_pattern"))
        or config.get("mamba_d_state") is not None
        or any("mamba" in k or "linear" in k or "ssm" in k for k in kinds)
    )
    return f"{path} describes a hybrid model (model_type {model_type!r})" if is_hybrid else None


def _refuse_hybrid(llm_args: Any) -> None:
    reason = hybrid_reason(str(getattr(llm_args, "model", "") or ""))
    if reason is not None:
        raise ConfigError(
            f"the PrfaaS connector cannot serve this model on TensorRT-LLM: {reason}. "
            "TensorRT-LLM keeps a hybrid's recurrent state outside the KV pool a connector sees, "
            "refuses KV connectors on Mamba cache managers (PR #13577), and on 1.2 its hybrid "
            "cache managers turn block reuse off, so a decode connector is never asked. Route "
            "this model local-only (prefill and decode on one node), or use TensorRT-LLM's "
            "native generation-only disaggregation (>= 1.3)."
        )


def _is_reference_host(llm_args: Any) -> bool:
    """The reference engine passes its runtime in ``connector_options``; TensorRT-LLM's
    ``TorchLlmArgs`` has no such field."""
    return "prfaas_runtime" in (getattr(llm_args, "connector_options", None) or {})


def _runtime_of(llm_args: Any) -> PrfaasRuntime:
    """The runtime the reference engine passed in, or, inside TensorRT-LLM, this rank's from
    the ``TRTLLM_PRFAAS_*`` variables (a hybrid model is refused first)."""
    if not _is_reference_host(llm_args):
        _refuse_hybrid(llm_args)
        from trtllm_prfaas.config import connector_config_from_env  # the edge: reads the env

        config = connector_config_from_env()
        return runtime_for(config, cache_key_of(llm_args), tp_size_of(llm_args))
    runtime = llm_args.connector_options["prfaas_runtime"]
    if not isinstance(runtime, PrfaasRuntime):
        raise ConfigError("connector_options['prfaas_runtime'] must be a PrfaasRuntime")
    return runtime


class PrfaasConnectorScheduler(KvCacheConnectorScheduler):  # type: ignore[misc]
    """Rank 0 only. No I/O in any method: plans and receiver status are in-process look-ups."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.runtime = _runtime_of(llm_args)
        self.tokens_per_block = int(llm_args.kv_cache_config.tokens_per_block)
        self._exports: dict[int, _Export] = {}
        self._pending_loads: dict[int, _LoadPlan] = {}
        self._drops: list[_Drop] = []

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        tokens = list(request.get_tokens(0))
        is_prefill = self.runtime.config.role is Role.PREFILL
        claimed = tokens if is_prefill else tokens[:-1]
        plan = self.runtime.plans.take(claimed) if claimed else None
        if plan is None:
            self.runtime.count("plans_missed")
            log.info("prfaas_plan_missing", request_id=request.request_id, num_tokens=len(claimed))
            return 0, False
        if is_prefill:
            return self._export(request.request_id, plan, claimed)
        return self._claim(request.request_id, plan, claimed, num_computed_tokens)

    def _export(self, request_id: int, plan: Plan, tokens: list[int]) -> tuple[int, bool]:
        reason = self.runtime.refusal(plan)
        if reason is not None:
            self.runtime.count("plans_refused")
            log.error("prfaas_plan_refused", request_id=request_id, reason=reason)
        else:
            self._exports[request_id] = _Export(plan, tokens)
        return 0, False

    def _claim(
        self, request_id: int, plan: Plan, tokens: list[int], num_computed_tokens: int
    ) -> tuple[int, bool]:
        """Claim ``L - num_computed_tokens`` tokens if rank 0's transfer is whole in host memory."""
        receiver = self.runtime.receiver
        assert receiver is not None
        status = receiver.status(transfer_id_for(plan.transfer_uuid, tokens, self.runtime.key))
        num_claimed = len(tokens) - num_computed_tokens
        if status is not InboundStatus.COMPLETE or num_claimed <= 0:
            self.runtime.count("transfers_unclaimed")
            log.warning(
                "prfaas_transfer_unclaimed",
                request_id=request_id,
                status=None if status is None else status.value,
                num_computed_tokens=num_computed_tokens,
            )
            self._drops.append(_Drop(plan.transfer_uuid, tokens))
            return 0, False
        skip = num_computed_tokens // self.tokens_per_block
        self._pending_loads[request_id] = _LoadPlan(request_id, plan.transfer_uuid, tokens, skip)
        return num_claimed, True

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        load = self._pending_loads.get(request.request_id)
        if load is not None:
            load.device_blocks = list(block_ids)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> PrfaasMeta:
        meta = PrfaasMeta(loads=list(self._pending_loads.values()), drops=self._drops)
        self._pending_loads, self._drops = {}, []
        for data in scheduler_output.new_requests + scheduler_output.cached_requests:
            export = self._exports.get(data.request_id)
            if export is None:
                continue
            export.blocks += data.new_block_ids
            end = data.computed_position + data.num_scheduled_tokens
            plan = self._plan_send(data.request_id, export, end)
            if plan is not None:
                meta.sends.append(plan)
        return meta

    def _plan_send(self, request_id: int, export: _Export, end: int) -> _SendPlan | None:
        """Blocks completed by a chunk ending at ``end``; the chunk that ends at L also sends the
        partial tail block and closes every layer."""
        if export.is_done:
            return None
        tpb, num_tokens = self.tokens_per_block, export.plan.num_tokens
        is_last = end >= num_tokens
        stop = -(-num_tokens // tpb) if is_last else end // tpb
        start = export.num_sent_blocks
        if stop <= start:
            if not is_last:
                return None
            start = stop - 1  # every layer needs a closing item: resend the last block
        tokens = None if export.is_announced else export.tokens
        export.num_sent_blocks, export.is_done, export.is_announced = stop, is_last, True
        blocks = export.blocks[start:stop]
        plan = export.plan
        return _SendPlan(
            request_id, plan.transfer_uuid, plan.relay_endpoints, tokens, blocks, start, is_last
        )

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        """True (blocks stay pinned) while a started export may still be reading them."""
        self._pending_loads.pop(request.request_id, None)
        export = self._exports.pop(request.request_id, None)
        return export is not None and export.is_announced


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
        self.runtime = _runtime_of(llm_args)
        self._reports_failures = _is_reference_host(llm_args)  # SupportsLoadFailures is used
        self.kv_pool: Any = None
        self.backend: DeviceBackend | None = None
        self.states: RecurrentStates | None = None
        self._outbound: dict[int, _Outbound] = {}
        self._landing: dict[int, list[Landing]] = {}  # enqueued loads by request
        self._draining: list[Landing] = []  # cancelled loads whose copies may still run
        self._saving: set[int] = set()  # passed in finished_gen_req_ids, not yet returned
        self._loading: set[int] = set()
        self._loaded: set[int] = set()  # finished before their id was passed in
        self._failed: list[tuple[int, str]] = []
        self.transfer_errors: dict[int, str | None] = {}  # request id -> outcome, for the host

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
        receiver = self.runtime.receiver
        for drop in meta.drops:
            if receiver is not None:
                receiver.release(transfer_id_for(drop.transfer_uuid, drop.tokens, self.runtime.key))
        for load in meta.loads:
            self._start_load(load, stream)

    def _start_load(self, load: _LoadPlan, stream: Any) -> None:
        """Enqueue every layer's copy into the pool; the receiver's buffers go back at once (an
        async backend has copied them into pinned staging)."""
        receiver = self.runtime.receiver
        tid = transfer_id_for(load.transfer_uuid, load.tokens, self.runtime.key)
        try:
            if receiver is None:
                raise ConfigError("a load planned on a runtime without a relay receiver")
            status = receiver.status(tid)
            if status is not InboundStatus.COMPLETE:
                raise TransportError(
                    f"transfer {tid} is {status.value if status else 'unknown'} on rank "
                    f"{self.runtime.rank}: only whole transfers are loaded"
                )
            self._landing[load.request_id] = [
                landing
                for layer in sorted(receiver.completed_layers(tid))
                for item in receiver.layer_items(tid, layer)
                for landing in self._place(load, layer, item, stream)
            ]
        except Exception as exc:  # never park the request: report it (see module docstring)
            self._fail_load(load.request_id, exc)
        finally:
            if receiver is not None:
                receiver.release(tid)

    def _place(self, load: _LoadPlan, layer: int, item: ReceivedItem, stream: Any) -> list[Landing]:
        if item.key.kind is Kind.STATE:
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

    def _fail_load(self, request_id: int, exc: BaseException) -> None:
        self.runtime.count("loads_failed")
        recovery = "host fails it" if self._reports_failures else "reported loaded: output suspect"
        log.error("prfaas_load_failed", request_id=request_id, error=repr(exc), recovery=recovery)
        if self._reports_failures:
            self._failed.append((request_id, str(exc)))
        else:
            self._landing[request_id] = []

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        return None  # async loads: requests stay parked until their copies completed

    def get_failed_loads(self) -> list[tuple[int, str]]:
        """Capability ``SupportsLoadFailures``: loads that failed since the last call."""
        failed, self._failed = self._failed, []
        return failed

    def cancel_load(self, request_id: int) -> None:
        """Capability ``SupportsCancel``: the host gave up on this load."""
        self._draining += self._landing.pop(request_id, [])
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
            if out.handle is None:
                continue
            if pool_layer is not None:
                self._send_blocks(plan, out, layer_idx, pool_layer, stream)
            elif plan.is_last:  # a linear layer: its state after L tokens, once
                self._send_state(plan, out, layer_idx)

    def _send_blocks(
        self, plan: _SendPlan, out: _Outbound, layer_idx: int, pool_layer: int, stream: Any
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

    def _send_state(self, plan: _SendPlan, out: _Outbound, layer_idx: int) -> None:
        states = self.states
        assert states is not None and out.handle is not None
        slot = states.slot_of(plan.request_id)
        state = states.tensor[slot, states.state_layer_of[layer_idx]].clone()  # host memory
        out.keep.append(state)
        send = functools.partial(out.handle.send, Kind.STATE, layer_idx, (0, 0), state)
        self.runtime.pump.submit(DONE, send)

    def _outbound_for(self, plan: _SendPlan) -> _Outbound:
        """This rank's export of the request, opened on its first send plan."""
        out = self._outbound.get(plan.request_id)
        if out is not None:
            return out
        try:
            out = _Outbound(self._open(plan))
        except PrfaasError as exc:
            self.runtime.count("sends_failed")
            log.error("prfaas_send_failed", request_id=plan.request_id, error=str(exc))
            out = _Outbound(None, str(exc))
        self._outbound[plan.request_id] = out
        return out

    def _open(self, plan: _SendPlan) -> TransferHandle:
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
            handle = self._outbound[plan.request_id].handle
            if plan.is_last and handle is not None:
                self.runtime.pump.submit(DONE, handle.finish)  # after the queued sends

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
        self._draining = [d for d in self._draining if not d.event.query()]
        return self._finished_saves(), self._finished_loads()

    def _finished_saves(self) -> list[int]:
        done = []
        for rid in sorted(self._saving):
            out = self._outbound.get(rid)
            if out is not None and not out.is_over:
                continue
            error = out.error if out is not None else None
            if out is not None and out.handle is not None and out.handle.error is not None:
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
        done = sorted(self._loaded & self._loading)
        self._loaded -= set(done)
        self._loading -= set(done)
        return done


def _complete(event: DeviceEvent) -> bool:
    return event.query()
