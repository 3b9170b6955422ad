"""Discrete-event simulator of a PrfaaS-PD deployment, driven by the pure ``policy/`` functions.

Stages (each a queue): PrfaaS prefill nodes and PD-P prefill nodes (per-node FIFO, the node
picked by :func:`~trtllm_prfaas.policy.route.route`), the PrfaaS egress link (one FIFO whose
bandwidth follows a :class:`~trtllm_prfaas.sim.link.LinkSchedule`), and the PD-D decode slots
(one FCFS pool; a request holds a slot for ``output_tokens * decode_step_s``).

A request's TTFT is ``decode admission - arrival``: queueing for prefill, prefill, queueing on
the link and the KV transfer (remote only), and waiting for a decode slot. With an infinite link
and no queueing it is exactly the prefill latency the fluid model uses.

The transfer is modelled store-and-forward from the end of prefill (the relay streams layer by
layer, so this is conservative by at most ``S_kv / B``: 77 ms for a 44K prompt at 100 Gbps).

Every ``period_s`` a control tick measures what the live router measures (egress utilisation,
PrfaaS queue depth, relay backlog, per-side prefill backlog) and, in the dynamic modes, steps
the short-timescale controller; with a rebalancer configured it also steps the long-timescale
rebalancer every ``rebalancer.period_s``. The targets come from
:func:`~trtllm_prfaas.policy.threshold.targets`, the function the live router's control loop
calls: bounds ``[t_min, t_max]`` solved at the live link rate and the measured arrival rate,
anchor ``t_opt`` the optimum for the provisioned link in ``DYNAMIC`` (what the router runs) and
re-solved for the live link in ``DYNAMIC_LIVE``. The live rate here is the schedule's own (an
oracle); the router uses its estimate from the relay's counters (``policy/link_estimate.py``).
Why ``DYNAMIC`` does not re-anchor (docs/simulation.md has the figures): the fluid optimum for
a degraded link is the best split if the degradation lasted forever; a link drop is transient,
and a backlog queued on the link drains ~10x faster once the link recovers than work moved to
the H20 prefill nodes, so re-anchoring over-shifts. The live rate still acts through ``t_min``
(the least ``t`` the degraded link can carry) and through the measured relay delay.

Prefix caches: by default a request's cached prefix and its holder come from the trace
(``PrefixModel``: stationary hits). With ``DesConfig.caches`` every prefill node keeps a
modelled prefix cache (``sim/caches.py``) whose KV events feed the router's ``PrefixIndex``, the
trace carries token identity (``sim/conversations.py``), and each arrival's ``ClusterView``
holds every member node with the prefix the index gives it, as the live router's view does
(O(nodes) per request: meant for deployments of tens of nodes). The prefill node stores the
prompt's blocks when its prefill ends.

Events live in one heap (O(log n)); arrivals, lengths and per-request service times are numpy
arrays made up front.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field, replace
from enum import Enum

import numpy as np
import numpy.typing as npt

from trtllm_prfaas.policy import controller as ctl
from trtllm_prfaas.policy import threshold
from trtllm_prfaas.policy.model import Deployment, Workload
from trtllm_prfaas.policy.placement import CacheMove, Cluster, NodeView
from trtllm_prfaas.policy.profile import FloatArray, SystemProfile
from trtllm_prfaas.policy.rebalancer import RebalancerConfig
from trtllm_prfaas.policy.route import ClusterView, PolicyState, RequestView, route
from trtllm_prfaas.sim.caches import CacheModel, caches_for
from trtllm_prfaas.sim.link import LinkSchedule
from trtllm_prfaas.sim.pools import DecodeSlots, PrefillPool
from trtllm_prfaas.sim.rebalance import Rebalancing
from trtllm_prfaas.sim.traffic import Trace

__all__ = ["DesConfig", "DesResult", "ThresholdMode", "Timeline", "simulate"]

_LINK, _READY = 0, 1


class ThresholdMode(Enum):
    """How ``t`` evolves during a run."""

    STATIC = "static"  # the configured t throughout (re-solved only after a role conversion)
    DYNAMIC = "dynamic"  # short-timescale controller around the provisioned-link optimum
    DYNAMIC_LIVE = "dynamic-live"  # the same, but anchored on t re-solved for the live link


@dataclass(frozen=True)
class DesConfig:
    """One simulated deployment. ``workload`` supplies the length distribution the solver uses
    and the output length; ``threshold_tokens`` is the starting (static) ``t``."""

    system: SystemProfile
    workload: Workload
    deployment: Deployment
    link: LinkSchedule
    threshold_tokens: float
    mode: ThresholdMode = ThresholdMode.STATIC
    controller: ctl.ControllerConfig = field(default_factory=ctl.ControllerConfig)
    rebalancer: RebalancerConfig | None = None
    period_s: float = 1.0
    local_max_utilisation: float = 0.85
    offload_below_opt: bool = True
    rate_window_s: float = 10.0
    # Modelled prefix caches (``sim/caches.py``; the trace needs ``prompt_hashes``) and the
    # cache policy routing starts with (the dynamic modes' controller switches it).
    caches: CacheModel | None = None
    cache_policy: ctl.CachePolicy = ctl.CachePolicy.SCARCE
    # With ``caches``: route as a cache-blind router (every node's prefix counts as 0), while
    # the node that prefills still reuses what it holds (the live ``prefix_routing: false``).
    cache_blind: bool = False
    # Scales the per-token prefill cost routing weighs a prefix with (NodeView.prefill_s_per_token):
    # 1 weighs it against load in seconds; a huge value is longest-prefix-first however loaded
    # (the rule before 2026-12-06, for comparison); 0 is least loaded, the prefix a tie-break.
    prefix_weight: float = 1.0


@dataclass(frozen=True)
class Timeline:
    """One row per control tick."""

    time_s: FloatArray
    threshold_tokens: FloatArray
    link_gbps: FloatArray
    egress_utilisation: FloatArray
    prfaas_waiting: FloatArray
    num_p: FloatArray


@dataclass(frozen=True)
class DesResult:
    """Per-request TTFT (s) and whether prefill ran remotely, the tick timeline, wall time."""

    arrival_s: FloatArray
    ttft_s: FloatArray
    is_remote: npt.NDArray[np.bool_]
    timeline: Timeline
    wall_s: float
    num_conversions: int
    computed_tokens: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.zeros(0, dtype=np.int64)
    )  # prefill tokens each request computed (prompt minus the prefix it reused)
    prefix_tokens: npt.NDArray[np.int64] = field(
        default_factory=lambda: np.zeros(0, dtype=np.int64)
    )  # the prefix it reused
    num_cache_moves: int = 0  # prefixes moved across the link first (abundant policy)
    prefill_node_ids: tuple[str, ...] = ()  # where each request prefilled


class _Sim:
    """The mutable state of one run (see :func:`simulate`)."""

    def __init__(self, config: DesConfig, trace: Trace) -> None:
        self.c, self.tr = config, trace
        dep = config.deployment
        self.prfaas = PrefillPool("prfaas", dep.num_prfaas)
        self.pd = PrefillPool("pd-p", dep.num_p)
        self.decode = DecodeSlots(dep.num_d, config.system.pd.decode_slots)
        self.index = {
            Cluster.PRFAAS: {nid: k for k, nid in enumerate(self.prfaas.node_ids)},
            Cluster.PD: {nid: k for k, nid in enumerate(self.pd.node_ids)},
        }
        self.hold_s = config.workload.output_tokens * config.system.pd.decode_step_s
        self.events: list[tuple[float, int]] = []
        self.link_free_s, self.egress_gb = 0.0, 0.0
        self.num_arrived, self.rate_ewma = 0, 0.0
        self.ttft = np.full(trace.num_requests, math.nan)
        self.remote = np.zeros(trace.num_requests, dtype=np.bool_)
        self.computed = np.zeros(trace.num_requests, dtype=np.int64)
        self.reused = np.zeros(trace.num_requests, dtype=np.int64)
        self.node_of: list[str] = [""] * trace.num_requests
        self.num_moves = 0
        self.caches = caches_for(config.caches, trace)
        self._precompute()
        self.base_t = config.threshold_tokens
        self.t_cache: dict[tuple[float, int, int], float] = {}
        self.bound_cache: dict[tuple[float, float, int, int], tuple[float, float]] = {}
        self.ctrl = ctl.initial_state(self.base_t, 0.0)
        self.policy = PolicyState(self.base_t, config.cache_policy)
        self.rows: list[tuple[float, float, float, float, float, float]] = []
        self.rebal = Rebalancing(config.rebalancer) if config.rebalancer else None

    def _precompute(self) -> None:
        sysp, tr = self.c.system, self.tr
        full = tr.prompt_tokens.astype(np.float64)
        part = np.maximum(full - tr.prefix_tokens, 1.0)
        self.t_full = (sysp.prfaas.prefill.seconds(full), sysp.pd.prefill.seconds(full))
        self.t_part = (sysp.prfaas.prefill.seconds(part), sysp.pd.prefill.seconds(part))
        kv = sysp.prfaas.kv
        pd_pfx = np.where(tr.prefix_in_pd, tr.prefix_tokens, 0)
        self.xfer_gb = ((kv.fixed_bytes + kv.per_token_bytes * (full - pd_pfx)) * 8 / 1e9).tolist()
        self.prompts = tr.prompt_tokens.tolist()
        self.pfx = tr.prefix_tokens.tolist()
        self.pfx_pd = tr.prefix_in_pd.tolist()
        self.pfx_node = tr.prefix_node.tolist()

    # ---- per-request path ---------------------------------------------------------------

    def _reused(self, i: int, node_id: str, routed_prefix: int, now: float) -> int:
        """The prefix the prefill node reuses: what routing counted, or for a cache-blind
        router what the node holds anyway."""
        if self.caches is None or not self.c.cache_blind:
            return routed_prefix
        assert self.tr.prompt_hashes is not None
        held = self.caches.prefix_tokens(node_id, self.tr.prompt_hashes[i], now)
        return min(held, int(self.prompts[i]) - 1)

    def _service_s(self, i: int, remote: bool, computed: int) -> float:
        """Prefill seconds of request ``i`` computing ``computed`` tokens."""
        side = 0 if remote else 1
        if computed >= self.prompts[i]:
            return float(self.t_full[side][i])
        if self.caches is None:
            return float(self.t_part[side][i])
        profile = (self.c.system.prfaas if remote else self.c.system.pd).prefill
        return float(profile.seconds(np.asarray([max(computed, 1)], dtype=np.float64))[0])

    def _views(
        self, pool: PrefillPool, holder: int, pfx: int, now: float, rate: float
    ) -> tuple[NodeView, ...]:
        """The least-loaded node and the prefix holder; ``rate``: prefill s/token here."""
        views = []
        k = pool.least_loaded()
        if k is not None:
            back = max(pool.free_at[k] - now, 0.0)
            views.append(NodeView(pool.node_ids[k], 0, 0, back, prefill_s_per_token=rate))
        if holder >= 0 and holder < len(pool.node_ids) and pool.is_member[holder]:
            back = max(pool.free_at[holder] - now, 0.0)
            views.append(NodeView(pool.node_ids[holder], pfx, 0, back, prefill_s_per_token=rate))
        return tuple(views)

    def _arrive(self, i: int, now: float) -> None:
        pfx, holder, in_pd = self.pfx[i], self.pfx_node[i], self.pfx_pd[i]
        prompt = self.prompts[i]
        weight = self.c.prefix_weight / prompt
        rates = (self.t_full[0][i] * weight, self.t_full[1][i] * weight)
        if self.caches is not None and self.tr.prompt_hashes is not None:
            chain, blind = self.tr.prompt_hashes[i], self.c.cache_blind
            view = ClusterView(
                self.caches.pool_views(self.prfaas, chain, now, rates[0], blind),
                self.caches.pool_views(self.pd, chain, now, rates[1], blind),
            )
        else:
            view = ClusterView(
                self._views(self.prfaas, -1 if in_pd else holder, pfx, now, rates[0]),
                self._views(self.pd, holder if in_pd else -1, pfx, now, rates[1]),
            )
        d = route(RequestView(str(i), prompt), view, self.policy, now)
        remote = d.cluster is Cluster.PRFAAS
        pool = self.prfaas if remote else self.pd
        k = self.index[d.cluster][d.prefill_node_id]
        ready = self._move_cache(d.cache_move, now) if d.cache_move else now
        self.num_moves += d.cache_move is not None
        reused = self._reused(i, d.prefill_node_id, d.prefix_tokens, now)
        service = self._service_s(i, remote, prompt - reused)
        end = pool.dispatch(k, now, ready, service) + service
        self.computed[i], self.reused[i] = prompt - reused, reused
        self.node_of[i] = d.prefill_node_id
        self.remote[i] = remote
        self.num_arrived += 1
        heapq.heappush(self.events, (end, 2 * i + (_LINK if remote else _READY)))

    def _move_cache(self, move: CacheMove, now: float) -> float:
        """A prefix move: PrfaaS -> PD shares the egress FIFO; PD -> PrfaaS uses the idle
        reverse direction at the current rate. Returns when the prefix is in place."""
        gb = self.c.system.prfaas.kv.gigabits(move.tokens)
        if move.target is Cluster.PD:
            return self._send(gb, now)
        return now + gb / self.c.link.rate_at(now)

    def _send(self, gb: float, now: float) -> float:
        start = max(now, self.link_free_s)
        self.link_free_s = self.c.link.finish_s(start, gb)
        self.egress_gb += gb
        return self.link_free_s

    def _on_event(self, code: int, now: float) -> None:
        i, kind = code >> 1, code & 1
        if self.caches is not None and (kind == _LINK or not self.remote[i]):
            assert self.tr.prompt_hashes is not None
            self.caches.prefill_done(self.node_of[i], self.tr.prompt_hashes[i])  # prefill ended
        if kind == _LINK:
            heapq.heappush(self.events, (self._send(self.xfer_gb[i], now), 2 * i + _READY))
            return
        start = self.decode.admit(now, self.hold_s)
        self.ttft[i] = start - self.tr.arrival_s[i]

    # ---- control ticks ------------------------------------------------------------------

    def _deployment(self) -> Deployment:
        return Deployment(self.c.deployment.num_prfaas, self.pd.num_active, self.decode.num_active)

    def _t_opt(self, link_gbps: float) -> float:
        """:func:`~trtllm_prfaas.policy.threshold.anchor` at ``link_gbps`` and the current
        split (cached per split)."""
        dep = self._deployment()
        key = (link_gbps, dep.num_p, dep.num_d)
        if key not in self.t_cache:
            self.t_cache[key] = threshold.anchor(self.c.system, self.c.workload, dep, link_gbps)
        return self.t_cache[key]

    def _anchor(self, live_gbps: float) -> float:
        """The controller's ``t_opt``: solved for the provisioned link (``DYNAMIC_LIVE``: for the
        live rate) at the current split."""
        live = self.c.mode is ThresholdMode.DYNAMIC_LIVE and not math.isinf(live_gbps)
        return self._t_opt(live_gbps if live else self.c.system.link_gbps)

    def _inputs(self, live_gbps: float) -> threshold.ThresholdInputs:
        """The tick's plain inputs to the shared policy, as the live router builds them."""
        c = self.c
        provisioned = live_gbps if c.mode is ThresholdMode.DYNAMIC_LIVE else c.system.link_gbps
        return threshold.ThresholdInputs(
            provisioned_gbps=provisioned,
            live_gbps=live_gbps,
            arrival_rate_per_s=self.rate_ewma,
            deployment=self._deployment(),
            local_max_utilisation=c.local_max_utilisation,
            offload_below_opt=c.offload_below_opt,
        )

    def _bounds(self, inputs: threshold.ThresholdInputs) -> tuple[float, float]:
        """``(t_min, t_max)`` from :func:`~trtllm_prfaas.policy.threshold.bounds`, cached per
        2% rate bucket, live link and split."""
        bucket = threshold.bucket_rate(inputs.arrival_rate_per_s)
        dep = inputs.deployment
        key = (bucket, inputs.live_gbps, dep.num_p, dep.num_d)
        if key not in self.bound_cache:
            self.bound_cache[key] = threshold.bounds(self.c.system, self.c.workload, inputs)
        return self.bound_cache[key]

    def _targets(self, live_gbps: float) -> threshold.ThresholdTargets:
        """:func:`~trtllm_prfaas.policy.threshold.targets`, through the caches above."""
        inputs = self._inputs(live_gbps)
        t_opt = self._t_opt(inputs.provisioned_gbps)
        t_min, t_max = self._bounds(inputs)
        t_min = t_min if inputs.offload_below_opt else t_opt
        return threshold.ThresholdTargets(t_opt, t_min, t_max)

    @staticmethod
    def _backlog_s(pool: PrefillPool, now: float) -> float:
        free = np.asarray(pool.free_at)[np.asarray(pool.is_member, dtype=np.bool_)]
        return float(np.maximum(free - now, 0.0).mean()) if len(free) else 0.0

    def _signals(self, now: float, egress: float, waiting: int) -> ctl.LinkSignals:
        """What the live router measures, read off the simulated queues."""
        return ctl.LinkSignals(
            egress_utilisation=egress,
            prfaas_queue_depth=waiting,
            prfaas_instances=self.prfaas.num_active,
            retransmit_ratio=0.0,
            relay_queue_delay_s=max(self.link_free_s - now, 0.0),
            prfaas_backlog_s=self._backlog_s(self.prfaas, now),
            pd_backlog_s=self._backlog_s(self.pd, now),
        )

    def _control(
        self, now: float, signals: ctl.LinkSignals, live_gbps: float
    ) -> threshold.ThresholdTargets:
        """One controller step on a tick's signals and live link rate, with the policy calls
        the live router makes (``tests/router/test_parity_link.py`` replays the router's
        recorded ticks through here); returns the targets it stepped on."""
        if math.isinf(live_gbps):  # an unconstrained link: nothing to solve against
            goal = threshold.ThresholdTargets(self.base_t, self.base_t, self.base_t)
        else:
            goal = self._targets(live_gbps)
        self.ctrl = threshold.control_step(self.c.controller, self.ctrl, signals, goal, now).state
        self.policy = PolicyState.from_controller(self.ctrl)
        return goal

    def _tick(self, now: float) -> None:
        c, link = self.c, self.c.link
        cap = link.capacity_gb(now) - link.capacity_gb(now - c.period_s)
        egress = self.egress_gb / cap if cap > 0 and not math.isinf(cap) else 0.0
        self.egress_gb = 0.0
        waiting = self.prfaas.counters.waiting(now)
        rate = link.rate_at(now)
        alpha = min(c.period_s / c.rate_window_s, 1.0)
        self.rate_ewma += alpha * (self.num_arrived / c.period_s - self.rate_ewma)
        self.num_arrived = 0
        if c.mode is not ThresholdMode.STATIC:
            self._control(now, self._signals(now, egress, waiting), rate)
        if self.rebal is not None and self.rebal.step(self.pd, self.decode, now):
            self.index[Cluster.PD] = {nid: k for k, nid in enumerate(self.pd.node_ids)}
            self.base_t = self._anchor(rate)
            self.ctrl = replace(self.ctrl, threshold_tokens=self.base_t)
            self.policy = PolicyState(self.base_t, self.policy.cache_policy)
        pol_t = self.policy.threshold_tokens
        self.rows.append((now, pol_t, rate, egress, float(waiting), float(self.pd.num_active)))

    # ---- main loop ----------------------------------------------------------------------

    def run(self) -> DesResult:
        started = time.perf_counter()
        arrivals, n = self.tr.arrival_s.tolist(), self.tr.num_requests
        events, inf, period = self.events, math.inf, self.c.period_s
        i, next_tick = 0, period
        while True:
            ta = arrivals[i] if i < n else inf
            te = events[0][0] if events else inf
            now = ta if ta <= te else te
            if now == inf:
                break
            if now >= next_tick:
                self._tick(next_tick)
                next_tick += period
            elif ta <= te:
                self._arrive(i, ta)
                i += 1
            else:
                self._on_event(heapq.heappop(events)[1], te)
        return self._result(time.perf_counter() - started)

    def _result(self, wall_s: float) -> DesResult:
        cols = np.asarray(self.rows, dtype=np.float64).reshape(-1, 6).T
        timeline = Timeline(*(np.asarray(col) for col in cols))
        conversions = self.rebal.num_conversions if self.rebal else 0
        return DesResult(
            self.tr.arrival_s, self.ttft, self.remote, timeline, wall_s, conversions,
            self.computed, self.reused, self.num_moves, tuple(self.node_of),
        )  # fmt: skip


def simulate(config: DesConfig, trace: Trace) -> DesResult:
    """Run ``trace`` through the deployment until every request has been admitted to decode.

    Every request finishes (no admission control, queues are unbounded), so ``ttft_s`` has no
    NaN. Deterministic for a given trace.
    """
    return _Sim(config, trace).run()
