"""The PrfaaS connector's scheduler half (rank 0; see ``connector/prfaas.py``).

Only what the decode lacks (issue 15 item 4): a plan's ``relay_from_tokens`` (D) is the prefix
the decode node holds itself, pinned with its slot. The prefill's export starts at block D/B,
and for a hybrid model the chunk that ends at ``S = floor((L-1)/B)*B`` (the prefix cache ends
a chunk there) also sends the states after S when S > D, so the decode can resume a follow-up
turn there. The decode claims only when its engine's cached prefix reaches D; otherwise it
claims nothing and computes the prompt itself (counted: ``relay_prefix_missing``).

Cache moves (issue 15 item 5): a prefill runtime with a receiver (``accept_moves``) also claims,
as a decode does, a request whose tokens but the last match a posted plan (a move's receiving
leg: the prefix relayed from the node that held it); its engine then keeps those blocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trtllm_prfaas.connector.base import KvCacheConnectorScheduler, SchedulerOutput
from trtllm_prfaas.connector.plans import Plan
from trtllm_prfaas.connector.prfaas_meta import Drop, LoadPlan, PrfaasMeta, SendPlan, runtime_of
from trtllm_prfaas.connector.prfaas_runtime import Role, transfer_id_for
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.transport import InboundStatus

__all__ = ["PrfaasConnectorScheduler"]

log = get_logger(__name__)


@dataclass
class _Export:
    plan: Plan
    tokens: list[int]
    blocks: list[int] = field(default_factory=list)
    num_sent_blocks: int = 0
    is_announced: bool = False
    is_done: bool = False


class PrfaasConnectorScheduler(KvCacheConnectorScheduler):  # type: ignore[misc]
    """Rank 0 only. No I/O in any method: plans and receiver status are in-process look-ups."""

    def __init__(self, llm_args: Any) -> None:
        super().__init__(llm_args)
        self.runtime = runtime_of(llm_args)
        self.tokens_per_block = int(llm_args.kv_cache_config.tokens_per_block)
        self._exports: dict[int, _Export] = {}
        self._pending_loads: dict[int, LoadPlan] = {}
        self._drops: list[Drop] = []

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int, bool]:
        """Never raises: an exception here ends TensorRT-LLM's executor loop (it runs inside
        ``prepare_resources``), so a failure is logged and counted, and nothing is claimed."""
        try:
            return self._match(request, num_computed_tokens)
        except Exception as exc:
            self.runtime.count("scheduler_errors")
            log.error("prfaas_match_failed", request_id=request.request_id, error=repr(exc))
            return 0, False

    def _match(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        tokens = list(request.get_tokens(0))
        is_prefill = self.runtime.config.role is Role.PREFILL
        claimed = tokens if is_prefill else tokens[:-1]
        can_claim = is_prefill and self.runtime.receiver is not None  # a cache move's target
        plan = self.runtime.plans.take(claimed, count_miss=not can_claim) if claimed else None
        if plan is None and can_claim and len(tokens) > 1:
            plan = self.runtime.plans.take(tokens[:-1])
            if plan is not None:
                return self._claim(request.request_id, plan, tokens[:-1], num_computed_tokens)
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
            return 0, False
        export = _Export(plan, tokens)
        export.num_sent_blocks = self._first_block(request_id, plan)
        self._exports[request_id] = export
        return 0, False

    def _first_block(self, request_id: int, plan: Plan) -> int:
        """D / B; a D that is not a block multiple below L is a router bug: send everything
        (the decode then loads what it lacks, never less), loudly."""
        tpb, start = self.tokens_per_block, plan.relay_from_tokens
        if start % tpb == 0 and 0 <= start < plan.num_tokens:
            return start // tpb
        self.runtime.count("relay_from_refused")
        log.error("prfaas_relay_from_refused", request_id=request_id, relay_from_tokens=start,
                  num_tokens=plan.num_tokens, tokens_per_block=tpb)  # fmt: skip
        return 0

    def _claim(
        self, request_id: int, plan: Plan, tokens: list[int], num_computed_tokens: int
    ) -> tuple[int, bool]:
        """Claim ``L - num_computed_tokens`` tokens if rank 0's transfer is whole in host memory."""
        receiver = self.runtime.receiver
        assert receiver is not None
        status = receiver.status(transfer_id_for(plan.transfer_uuid, tokens, self.runtime.key))
        num_claimed = len(tokens) - num_computed_tokens
        if status is InboundStatus.COMPLETE and num_computed_tokens < plan.relay_from_tokens:
            # The transfer starts at D but the engine holds less (the pin was lost): claiming
            # would leave [num_computed_tokens, D) unwritten. Compute the prompt here instead.
            self.runtime.count("relay_prefix_missing")
            log.warning("prfaas_relay_prefix_missing", request_id=request_id,
                        relay_from_tokens=plan.relay_from_tokens,
                        num_computed_tokens=num_computed_tokens)  # fmt: skip
            self._drops.append(Drop(plan.transfer_uuid, tokens))
            return 0, False
        if status is not InboundStatus.COMPLETE or num_claimed <= 0:
            self.runtime.count("transfers_unclaimed")
            log.warning(
                "prfaas_transfer_unclaimed",
                request_id=request_id,
                status=None if status is None else status.value,
                num_computed_tokens=num_computed_tokens,
            )
            self._drops.append(Drop(plan.transfer_uuid, tokens))
            return 0, False
        skip = num_computed_tokens // self.tokens_per_block
        self._pending_loads[request_id] = LoadPlan(request_id, plan.transfer_uuid, tokens, skip)
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

    def _plan_send(self, request_id: int, export: _Export, end: int) -> SendPlan | None:
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
        boundary = (num_tokens - 1) // tpb * tpb  # S: where the decode's next turn resumes
        snapshot = boundary if end == boundary > plan.relay_from_tokens else 0
        return SendPlan(
            request_id, plan.transfer_uuid, plan.relay_endpoints, tokens, blocks, start, is_last,
            snapshot,
        )  # fmt: skip

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        """True (blocks stay pinned) while a started export may still be reading them."""
        self._pending_loads.pop(request.request_id, None)
        export = self._exports.pop(request.request_id, None)
        return export is not None and export.is_announced
