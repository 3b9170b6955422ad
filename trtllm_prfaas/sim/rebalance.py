"""Adapter from the simulator's pools to the pure long-timescale rebalancer.

Every ``config.period_s`` it turns the pools' counters into
:class:`~trtllm_prfaas.policy.rebalancer.StageSignals`, calls
:func:`~trtllm_prfaas.policy.rebalancer.step_rebalancer`, and carries out its decision: DRAIN
removes the node from its pool (it finishes its queue), CONVERT adds it to the other pool.
"""

from __future__ import annotations

from trtllm_prfaas.policy.placement import NodeView
from trtllm_prfaas.policy.rebalancer import (
    RebalanceAction,
    RebalancerConfig,
    Role,
    StageSignals,
    initial_rebalancer_state,
    step_rebalancer,
)
from trtllm_prfaas.sim.pools import DecodeSlots, PrefillPool

__all__ = ["Rebalancing"]


class Rebalancing:
    """Rebalancer state for one run; :meth:`step` returns True when a node changed role."""

    def __init__(self, config: RebalancerConfig) -> None:
        self.config = config
        self.state = initial_rebalancer_state()
        self.next_s = config.period_s
        self.drained_at_s = 0.0
        self.draining: tuple[Role, int] | None = None  # (donor role, index in donor pool)
        self.num_conversions = 0

    def _signals(self, pd: PrefillPool, decode: DecodeSlots, now: float) -> StageSignals:
        period, num_p, num_d = self.config.period_s, pd.num_active, decode.num_active
        slots = max(num_d * decode.slots_per_node, 1)
        return StageSignals(
            prefill_utilisation=pd.counters.take_busy_s() / (max(num_p, 1) * period),
            prefill_queue_per_node=pd.counters.waiting(now) / max(num_p, 1),
            decode_utilisation=decode.counters.take_busy_s() / (slots * period),
            decode_queue_per_node=decode.counters.waiting(now) / max(num_d, 1),
            num_p=num_p,
            num_d=num_d,
            is_drain_complete=self.draining is not None and now >= self.drained_at_s,
        )

    @staticmethod
    def _prefill_views(pd: PrefillPool, now: float) -> list[NodeView]:
        return [
            NodeView(nid, backlog_s=max(pd.free_at[k] - now, 0.0))
            for k, nid in enumerate(pd.node_ids)
            if pd.is_member[k]
        ]

    @staticmethod
    def _decode_views(decode: DecodeSlots, now: float) -> list[NodeView]:
        return [
            NodeView(f"decode-{k}", backlog_s=max(decode.busy_until[k] - now, 0.0))
            for k, member in enumerate(decode.is_member)
            if member
        ]

    def step(self, pd: PrefillPool, decode: DecodeSlots, now: float) -> bool:
        """Run one rebalancing period if one is due at ``now``."""
        if now < self.next_s:
            return False
        self.next_s += self.config.period_s
        signals = self._signals(pd, decode, now)
        d = step_rebalancer(
            self.config,
            self.state,
            signals,
            self._prefill_views(pd, now),
            self._decode_views(decode, now),
            now,
        )
        self.state = d.state
        if d.action is RebalanceAction.DRAIN and d.node_id is not None:
            k = int(d.node_id.rsplit("-", 1)[1])
            donor = Role.DECODE if d.target_role is Role.PREFILL else Role.PREFILL
            self.drained_at_s = decode.remove(k) if donor is Role.DECODE else pd.remove(k)
            self.draining = (donor, k)
        elif d.action is RebalanceAction.CONVERT:
            if d.target_role is Role.PREFILL:
                pd.add_node(now)
            else:
                decode.add_node(now)
            self.draining, self.num_conversions = None, self.num_conversions + 1
            return True
        return False
