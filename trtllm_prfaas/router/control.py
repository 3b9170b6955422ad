"""The router's control loop: online profiles, the threshold controller and the rebalancer.

The orchestrator feeds observations as requests flow (``on_routed``, ``on_prefill``,
``on_relay_wait``, ``on_decode``); a task on the router's event loop calls :meth:`ControlLoop.tick`
every ``period_s``. All clocks and I/O stay here; the decisions are the pure ``policy/`` functions
the simulator calls too (``threshold.targets`` and ``controller.step``, as its ``DYNAMIC`` mode;
``rebalancer.step_rebalancer``). One tick:

1. **Link estimate** (:mod:`~trtllm_prfaas.policy.link_estimate`): each PrfaaS worker's relay
   sender counters (``LoadReport.relay_*``: time link-bound and the bytes handed over meanwhile,
   the kernel's link-bound time from ``TCP_INFO`` and the bytes TCP acknowledged meanwhile, TCP
   retransmits) since the last tick
   update the live estimate of the link's capacity. A slow producer or an idle relay never
   lowers it; it follows a slower link at once and relaxes back to the provisioned rate once
   nothing is link-bound for ``recover_s``. ``link_gbps`` configured is the provisioned rate
   (the estimate starts there and returns there); unconfigured, the estimate is all there is:
   it starts at ``default_link_gbps`` and its prior becomes the highest rate it measured or
   saw carried (configure ``link_gbps`` where the provisioned rate is known).
2. **Signals** over the last period (:class:`~trtllm_prfaas.policy.controller.LinkSignals`):
   PrfaaS egress = relay bytes acknowledged by PrfaaS workers (``LoadReport.relay_bytes_sent``
   deltas) over the period, as a share of the live link estimate; PrfaaS queue depth from their
   reports; TCP retransmit ratio of the relay's connections (0 without ``TCP_INFO``); relay
   queue delay = the larger of the prospective delay (the PrfaaS relay senders' backlog,
   ``LoadReport.relay_bytes_backlog``, over the live link estimate: the simulator's
   ``link_free_s - now``) and the EWMA of (decode node's first token - prefill leg's first
   token) of offloaded requests, decayed towards 0 in a period without any (an idle link has
   no queue; the EWMA alone lags a drop: it measures a transfer once it is through); backlogs =
   queued requests per node x the cluster's mean prefill leg (EWMA).
3. **Targets** (:func:`~trtllm_prfaas.policy.threshold.targets`, the function the simulator's
   ``DYNAMIC`` calls): on the measured profiles (per-cluster prefill latency lines fitted online,
   ``S_kv`` from the workers' ``WorkerInfo``, decode step EWMA) and a histogram of the last
   ``window`` prompt lengths, ``t_opt`` = ``solve_fixed_split`` at the *provisioned* link (never
   re-solved for a degraded one: the simulator showed that re-anchoring loses, 0.84 vs 1.10
   req/s in ``prfaas simulate beyond``); ``t_min`` = ``min_remote_threshold`` at the *live*
   estimate and ``t_max`` = ``max_local_threshold``, both at the arrival-rate EWMA and
   ``local_max_utilisation``. A link drop raises ``t_min`` (the controller takes it up to
   ``t_opt``: it offloads below the optimum only what the live link carries), and the egress
   share of the live estimate and the relay delay raise ``t`` above ``t_opt``.
4. **Controller** ``step`` moves ``t`` with its hysteresis and rate limits; the orchestrator
   routes every request with :attr:`ControlLoop.policy` (the live ``t``, the configured
   ``threshold_tokens`` being only the initial value).
5. Every ``rebalancer.period_s``: ``step_rebalancer`` on PD-P busy time (observed prefill legs)
   and PD-D slot occupancy (reports); DRAIN marks the node draining (no new work), CONVERT calls
   the orchestrator's converter (``SetRole`` to the worker) and ``t`` is re-solved at once.

Replicas (``router/replicas.py``): only the leader among router replicas runs steps 4 and 5 and
publishes the result (``PublishedPolicy``: ``t``, the cache policy, the nodes it drains) through
its :class:`~trtllm_prfaas.router.replicas.Replica` after every tick that changed it (and on its
first tick as leader). A follower runs steps 1 to 3 (its estimators stay warm for the day it
leads) and applies the last published policy instead: it routes with the leader's ``t`` and
sends no new work to the nodes the leader drains; it converts nothing. The replica is asked
before each tick and before each conversion starts, so a leader that lost its lease stops at
once. The default replica is :class:`~trtllm_prfaas.router.replicas.SoleReplica` (always
leader, publishing nowhere): the embedded router of ``prfaas up`` is its own leader. The loop
never imports etcd: ``discovery/leader.py`` provides the etcd replica.

Values: ``period_s = 1`` s (the controller's own period: fast enough to follow a link that
shrinks within seconds, slow enough that a period holds a few requests and ten of every
worker's 0.1 s load reports); EWMA ``alpha = 0.2`` (a ~5-sample memory: a
change shows within a few seconds, one outlier moves an estimate by a fifth); a window of 512
recent prompt lengths in 32 log-spaced bins; nothing moves before ``min_requests = 32`` requests
and ``min_legs = 4`` prefill legs on each cluster (a handful of requests says nothing about a
distribution, and the configured ``t`` stays exact for small runs and tests). A failing tick is
logged and skipped; ``t`` keeps its last value and routing goes on.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from trtllm_prfaas.policy import controller as ctl
from trtllm_prfaas.policy import link_estimate as le
from trtllm_prfaas.policy import rebalancer as rb
from trtllm_prfaas.policy import threshold
from trtllm_prfaas.policy.model import Deployment
from trtllm_prfaas.policy.profile import KvSize
from trtllm_prfaas.policy.route import ClusterView, PolicyState, RequestView, RouteDecision
from trtllm_prfaas.policy.solver import SolverOptions
from trtllm_prfaas.router.cluster import ClusterState, WorkerState
from trtllm_prfaas.router.online import Ewma, OnlineProfiles, ProfileSnapshot
from trtllm_prfaas.router.replicas import (
    PublishedPolicy,
    Replica,
    SoleReplica,
    followed_state,
    next_publication,
)
from trtllm_prfaas.tasks import cancel_and_wait
from trtllm_prfaas.telemetry.logging import get_logger
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.vocabulary import Role
from trtllm_prfaas.worker import protocol as p

__all__ = [
    "ControlConfig",
    "ControlLoop",
    "Converter",
    "RouteRecord",
    "TickRecord",
    "relay_counters",
]

log = get_logger(__name__)

STOP_BOUND_S = 10.0  # how long stop() waits for the tick task and conversions once cancelled

_Inputs = threshold.ThresholdInputs | None
_Snap = ProfileSnapshot | None

Converter = Callable[[str, str], Awaitable[object]]  # (worker name, new role) -> done


@dataclass(frozen=True)
class ControlConfig:
    """The control loop's periods and estimator settings (see the module doc for the values)."""

    period_s: float = 1.0
    controller: ctl.ControllerConfig = field(default_factory=ctl.ControllerConfig)
    rebalancer: rb.RebalancerConfig | None = field(default_factory=rb.RebalancerConfig)
    link_gbps: float | None = None  # provisioned PrfaaS egress (the anchor); None: estimated
    default_link_gbps: float = 10.0  # unconfigured: the estimate before its first sample
    link_estimate: le.LinkEstimateConfig = field(default_factory=le.LinkEstimateConfig)
    ewma_alpha: float = 0.2
    window: int = 512
    num_bins: int = 32
    min_requests: int = 32
    min_legs: int = 4
    local_max_utilisation: float = 0.85
    solver: SolverOptions = field(default_factory=lambda: SolverOptions(grid_size=128))


@dataclass(frozen=True)
class RouteRecord:
    """One routing decision and exactly what it was decided on (for replay and parity)."""

    now_s: float
    request: RequestView
    cluster: ClusterView
    policy: PolicyState
    decision: RouteDecision


@dataclass(frozen=True)
class TickRecord:
    """One control tick: its inputs to ``controller.step`` and what came out. ``link_gbps`` is
    the live link estimate; ``inputs`` and ``snapshot`` are what the targets were solved on
    (``None`` while warming up: the targets are then the initial ``t``)."""

    now_s: float
    signals: ctl.LinkSignals
    t_opt: float
    t_min: float
    t_max: float
    state: ctl.ControllerState
    reason: str
    egress_gbps: float
    link_gbps: float
    offload_share: float
    inputs: threshold.ThresholdInputs | None = None
    snapshot: ProfileSnapshot | None = None


class ControlLoop:
    """Live ``t`` and cache policy for the orchestrator; see the module doc for one tick."""

    def __init__(
        self,
        config: ControlConfig,
        cluster: ClusterState,
        initial_threshold: float,
        metrics: RouterMetrics | None = None,
        converter: Converter | None = None,
        clock: Callable[[], float] = time.monotonic,
        replica: Replica | None = None,
    ) -> None:
        self.config, self.cluster, self.metrics = config, cluster, metrics
        self.converter, self.clock = converter, clock
        self.replica: Replica = replica or SoleReplica()  # may be replaced before start()
        self.base_threshold = initial_threshold
        self.state = self.initial_state = ctl.initial_state(initial_threshold, clock())
        self.policy = PolicyState.from_controller(self.state)
        alpha = config.ewma_alpha
        self.profiles = OnlineProfiles(alpha, config.window, config.num_bins)
        self.rate_per_s, self.offload_share = Ewma(alpha), Ewma(alpha)
        self.link = le.initial_estimate(config.link_gbps, config.default_link_gbps)
        self._relay: dict[str, le.RelayCounters] = {}  # each PrfaaS worker's last counters
        self.rebalancer = rb.initial_rebalancer_state()
        self.ticks: deque[TickRecord] = deque(maxlen=3600)
        self.num_conversions = 0
        self._relay_bytes: dict[str, int] = {}
        self._routed = self._offloaded = self._relay_samples = 0
        self._pd_busy_s = 0.0
        self._decode_util: list[float] = []
        self._last_tick_s = self._last_rebalance_s = clock()
        self._task: asyncio.Task[None] | None = None
        self._conversions: set[asyncio.Task[None]] = set()
        self._published: PublishedPolicy | None = None  # this replica's last publication
        self._followed: PublishedPolicy | None = None  # the leader's policy last applied
        self._was_leader = True  # as the embedded default: a follower says so on its 1st tick
        self._export(initial_threshold, initial_threshold, 0.0, self.link.gbps)

    # ------------------------------------------------------------------ observations
    def on_routed(self, decision: RouteDecision, prompt_tokens: int, max_tokens: int) -> None:
        """A request was routed (called by the orchestrator before its legs start)."""
        self.profiles.on_request(prompt_tokens, max_tokens)
        self._routed += 1
        self._offloaded += int(decision.is_remote)

    def on_prefill(self, is_remote: bool, tokens: int, seconds: float) -> None:
        """A prefill leg's submit-to-first-token time."""
        self.profiles.on_prefill(is_remote, tokens, seconds)
        if not is_remote:
            self._pd_busy_s += seconds

    def on_relay_wait(self, seconds: float) -> None:
        """An offloaded request: decode node's first token minus the prefill's first token."""
        self.profiles.relay_wait_s.update(max(seconds, 0.0))
        self._relay_samples += 1

    def on_decode(self, num_tokens: int, seconds: float) -> None:
        """A decode leg: ``num_tokens`` after its first one took ``seconds``."""
        self.profiles.on_decode(num_tokens, seconds)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start ticking on the running event loop (no-op if already started)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop ticking and cancel conversions in flight; wait for them at most ``STOP_BOUND_S``."""
        task, self._task = self._task, None
        await cancel_and_wait([task, *self._conversions], STOP_BOUND_S, "control loop")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.period_s)
            try:
                self.tick(self.clock())
                await self.publish()
            except Exception as exc:  # keep routing on the last t; say why loudly
                log.error("control_tick_failed", error=repr(exc))

    async def publish(self) -> bool:
        """The leader: publish the policy in force if it changed since the last publication
        (or this replica just became leader). True when something was published."""
        replica = self.replica
        if not replica.has_followers or not replica.is_leader():
            return False
        drained = tuple(sorted(w.name for w in self.cluster.workers.values() if w.is_draining))
        policy = next_publication(replica.replica_id, self._published, self.state, drained)
        if policy is None or not await replica.publish(policy):
            return False
        self._published = policy
        t = round(policy.threshold_tokens, 1)
        log.info("policy_published", leader=policy.leader_id, sequence=policy.sequence,
                 threshold=t, draining=list(policy.draining))  # fmt: skip
        return True

    def _follow(self, now: float) -> str:
        """A follower's tick: apply the leader's last publication (if any, and new); returns
        the tick's reason (``follow``, or ``follow-none`` before any publication)."""
        policy = self.replica.followed()
        if policy is None:
            return "follow-none"
        if policy == self._followed:
            return "follow"
        previous, self._followed, before = self._followed, policy, self.state
        self.state = followed_state(policy, before, now)
        self.policy = PolicyState.from_controller(self.state)
        _set_draining(self.cluster, set(previous.draining if previous else ()), False)
        _set_draining(self.cluster, set(policy.draining), True)
        t, t_before = round(policy.threshold_tokens, 1), round(before.threshold_tokens, 1)
        log.info("policy_applied", leader=policy.leader_id, sequence=policy.sequence,
                 threshold=t, previous=t_before, draining=list(policy.draining))  # fmt: skip
        return "follow"

    def _on_leadership(self, is_leader: bool, now: float) -> None:
        """Leadership changed since the last tick. A new leader starts from the policy it
        followed, forgets the drains it only followed (its own rebalancer decides anew) and
        publishes on its first tick; a deposed one follows from its next tick."""
        self._was_leader = is_leader
        role, t = "leader" if is_leader else "follower", round(self.state.threshold_tokens, 1)
        log.info("control_role", role=role, replica=self.replica.replica_id, threshold=t)
        if not is_leader:
            self._followed = None
            return
        self._published = None
        _set_draining(self.cluster, set(self._followed.draining if self._followed else ()), False)
        self.rebalancer = rb.initial_rebalancer_state()
        self._last_rebalance_s = now

    # ------------------------------------------------------------------ one tick
    def tick(self, now: float) -> TickRecord:
        """One control period ending at ``now`` (monotonic seconds); see the module doc."""
        elapsed = max(now - self._last_tick_s, 1e-6)
        self._last_tick_s = now
        signals, egress_gbps, link_gbps = self._signals(elapsed, now)
        self._period_rates(elapsed)
        goal, inputs, snap = self._targets(link_gbps)
        t_opt, t_min, t_max = goal.t_opt, goal.t_min, goal.t_max
        is_leader = self.replica.is_leader()
        if is_leader != self._was_leader:
            self._on_leadership(is_leader, now)
        reason = "warm-up"
        if not is_leader:  # the leader's t and drains; this replica only routes
            reason = self._follow(now)
        elif self.profiles.is_warm(self.config.min_requests, self.config.min_legs):
            step = threshold.control_step(self.config.controller, self.state, signals, goal, now)
            reason = step.reason
            self._apply(step.state, reason, t_opt, signals)
        share = self.offload_share.get(0.0)
        record = TickRecord(now, signals, t_opt, t_min, t_max, self.state, reason, egress_gbps,
                            link_gbps, share, inputs, snap)  # fmt: skip
        self.ticks.append(record)
        self._export(t_opt, t_min, egress_gbps, link_gbps)
        if self.metrics is not None:
            self.metrics.record_control_decision(reason)
        if is_leader:
            self._rebalance(now)
        else:  # the leader's busy and occupancy signals are its own
            self._pd_busy_s, self._decode_util, self._last_rebalance_s = 0.0, [], now
        return record

    def _apply(
        self, state: ctl.ControllerState, reason: str, t_opt: float, s: ctl.LinkSignals
    ) -> None:
        before = self.state
        self.state, self.policy = state, PolicyState.from_controller(state)
        if state.threshold_tokens != before.threshold_tokens or (
            state.cache_policy is not before.cache_policy
        ):
            log.info(
                "threshold_changed",
                threshold=round(state.threshold_tokens, 1),
                previous=round(before.threshold_tokens, 1),
                t_opt=round(t_opt, 1),
                reason=reason,
                cache_policy=state.cache_policy.value,
                egress_utilisation=round(s.egress_utilisation, 3),
                prfaas_queue=s.prfaas_queue_depth,
                relay_delay_s=round(s.relay_queue_delay_s, 3),
            )

    def _signals(self, elapsed: float, now: float) -> tuple[ctl.LinkSignals, float, float]:
        remote = self._pool(prfaas=True, role=Role.PREFILL)
        local = self._pool(prfaas=False, role=Role.PREFILL)
        sent = 0
        for w in remote:
            total = w.report.relay_bytes_sent if w.report else 0
            sent += max(total - self._relay_bytes.get(w.name, total), 0)
            self._relay_bytes[w.name] = total
        link, retransmits = self._estimate_link(remote, now)
        egress = sent * 8 / 1e9 / elapsed
        if self._relay_samples == 0:
            self.profiles.relay_wait_s.update(0.0)  # nothing offloaded: no relay queue
        self._relay_samples = 0
        queue = sum(w.report.queue_depth for w in remote if w.report)
        signals = ctl.LinkSignals(
            egress_utilisation=egress / link,
            prfaas_queue_depth=queue,
            prfaas_instances=len(remote),
            retransmit_ratio=retransmits,
            relay_queue_delay_s=self._relay_delay_s(remote, link),
            prfaas_backlog_s=self._backlog_s(remote, "prfaas"),
            pd_backlog_s=self._backlog_s(local, "pd"),
        )
        return signals, egress, link

    def _relay_delay_s(self, remote: list[WorkerState], link_gbps: float) -> float:
        """The relay delay signal: the larger of the *prospective* delay (the PrfaaS senders'
        backlog now, payload handed over and not yet acknowledged, over the live link
        estimate: how long KV handed over now waits for the link, as the simulator's
        ``link_free_s - now``) and the EWMA of relay waits measured on finished transfers
        (which covers what the backlog cannot see, such as a worker that does not report it,
        but lags: a transfer is measured only once it is through the slow link)."""
        backlog = sum(w.report.relay_bytes_backlog for w in remote if w.report)
        prospective = backlog * 8 / 1e9 / max(link_gbps, 1e-9)
        return max(prospective, self.profiles.relay_wait_s.get(0.0))

    def _estimate_link(self, remote: list[WorkerState], now: float) -> tuple[float, float]:
        """Fold the PrfaaS workers' relay counters since the last tick into the link estimate;
        returns ``(live estimate Gbps, TCP retransmit ratio)``."""
        periods: list[le.RelayPeriod] = []
        for w in remote:
            if w.report is None:
                continue
            counters = relay_counters(w.report, w.reported_at)
            before, self._relay[w.name] = self._relay.get(w.name), counters
            if before is not None and (period := le.period(before, counters)) is not None:
                periods.append(period)
        before_gbps = self.link.gbps
        self.link = le.update(self.config.link_estimate, self.link, periods, now)
        if abs(self.link.gbps - before_gbps) > 0.1 * before_gbps:
            log.info("link_estimate_changed", link_gbps=round(self.link.gbps, 3),
                     previous_gbps=round(before_gbps, 3), is_link_bound=self.link.is_link_bound,
                     sample_gbps=self.link.last_sample_gbps)  # fmt: skip
        return self.link.gbps, le.retransmit_ratio(periods)

    def _period_rates(self, elapsed: float) -> None:
        self.rate_per_s.update(self._routed / elapsed)
        if self._routed:
            self.offload_share.update(self._offloaded / self._routed)
        self._routed = self._offloaded = 0
        decode = self._pool(prfaas=False, role=Role.DECODE)
        slots = sum(w.info.max_num_seqs for w in decode)
        free = sum(w.report.num_free_slots if w.report else w.info.max_num_seqs for w in decode)
        self._decode_util.append(1 - free / slots if slots else 0.0)

    def _pool(self, prfaas: bool, role: Role) -> list[WorkerState]:
        now = self.clock()
        return [
            w
            for w in self.cluster.workers.values()
            if w.is_prfaas == prfaas and w.role == role and w.is_live(now) and not w.draining
        ]

    def _backlog_s(self, pool: list[WorkerState], cluster: str) -> float:
        if not pool:
            return 0.0
        queued = sum(w.report.queue_depth for w in pool if w.report) / len(pool)
        return queued * self.profiles.leg_s[cluster].get(0.0)

    def _deployment(self) -> Deployment:
        return Deployment(
            len(self._pool(prfaas=True, role=Role.PREFILL)),
            len(self._pool(prfaas=False, role=Role.PREFILL)),
            len(self._pool(prfaas=False, role=Role.DECODE)),
        )

    def _targets(
        self, live_gbps: float
    ) -> tuple[
        threshold.ThresholdTargets, threshold.ThresholdInputs | None, ProfileSnapshot | None
    ]:
        """The tick's targets (:func:`~trtllm_prfaas.policy.threshold.targets` on the measured
        profiles, anchored on the provisioned link) and what they were solved on; while not warm,
        the initial ``t`` and no ceiling."""
        max_len = min((w.info.max_seq_len for w in self.cluster.workers.values()), default=2)
        fallback = threshold.ThresholdTargets(
            self.base_threshold, self.base_threshold, float(max_len)
        )
        dep = self._deployment()
        warm = self.profiles.is_warm(self.config.min_requests, self.config.min_legs)
        provisioned = self.link.prior_gbps
        snap = self.profiles.snapshot(self._kv(), self._slots(), provisioned, max_len)
        if not warm or snap is None or min(dep.num_prfaas, dep.num_p, dep.num_d) == 0:
            return fallback, None, None
        inputs = threshold.ThresholdInputs(
            provisioned_gbps=provisioned,
            live_gbps=live_gbps,
            arrival_rate_per_s=self.rate_per_s.get(0.0),
            deployment=dep,
            local_max_utilisation=self.config.local_max_utilisation,
        )
        goal = threshold.targets(snap.system, snap.workload, inputs, self.config.solver)
        return goal, inputs, snap

    def _kv(self) -> KvSize:
        info = next(iter(self.cluster.workers.values())).info
        return KvSize(float(info.kv_state_bytes), float(max(info.kv_bytes_per_token, 1)))

    def _slots(self) -> int:
        decode = self._pool(prfaas=False, role=Role.DECODE)
        return max((w.info.max_num_seqs for w in decode), default=0)

    def _export(self, t_opt: float, t_min: float, egress_gbps: float, link_gbps: float) -> None:
        if self.metrics is not None:
            share = self.offload_share.get(0.0)
            t = self.state.threshold_tokens
            self.metrics.set_control(t, t_opt, share, egress_gbps, link_gbps, t_min)

    # ------------------------------------------------------------------ rebalancing
    def _rebalance(self, now: float) -> None:
        config = self.config.rebalancer
        if config is None or now - self._last_rebalance_s < config.period_s:
            return
        period = now - self._last_rebalance_s
        self._last_rebalance_s = now
        prefill = self._pool(prfaas=False, role=Role.PREFILL)
        decode = self._pool(prfaas=False, role=Role.DECODE)
        signals = self._stage_signals(prefill, decode, period)
        views = [w.view() for w in prefill], [w.view() for w in decode]
        d = rb.step_rebalancer(config, self.rebalancer, signals, *views, now)
        self.rebalancer = d.state
        if d.action is not rb.RebalanceAction.NONE and d.node_id and d.target_role:
            self._act(d.action, d.node_id, d.target_role.value)

    def _stage_signals(
        self, prefill: list[WorkerState], decode: list[WorkerState], period: float
    ) -> rb.StageSignals:
        num_p, num_d = len(prefill), len(decode)
        util_d = sum(self._decode_util) / max(len(self._decode_util), 1)
        busy_p, self._pd_busy_s, self._decode_util = self._pd_busy_s, 0.0, []
        draining = self.rebalancer.draining_node_id
        node = self.cluster.workers.get(draining) if draining else None
        return rb.StageSignals(
            prefill_utilisation=min(busy_p / max(num_p * period, 1e-9), 1.0),
            prefill_queue_per_node=_queued(prefill) / max(num_p, 1),
            decode_utilisation=util_d,
            decode_queue_per_node=sum(w.report.num_pending_decodes for w in decode if w.report)
            / max(num_d, 1),
            num_p=num_p + (node is not None and node.role == Role.PREFILL),
            num_d=num_d + (node is not None and node.role == Role.DECODE),
            is_drain_complete=node is not None and node.is_idle(),
        )

    def _act(self, action: rb.RebalanceAction, node_id: str, role: str) -> None:
        log.info("rebalance", action=action.value, worker=node_id, target_role=role)
        if self.metrics is not None:
            self.metrics.record_rebalance(action.value)
        worker = self.cluster.workers.get(node_id)
        if worker is None:
            return
        worker.is_draining = True
        if not self.replica.is_leader():  # deposed meanwhile: the next leader decides
            return
        if action is rb.RebalanceAction.CONVERT and self.converter is not None:
            task = asyncio.get_running_loop().create_task(self._convert(node_id, role))
            self._conversions.add(task)
            task.add_done_callback(self._conversions.discard)

    async def _convert(self, node_id: str, role: str) -> None:
        assert self.converter is not None
        try:
            await self.converter(node_id, role)
        except Exception as exc:  # the node stays drained; the next rebalance may retry
            log.error("role_conversion_failed", worker=node_id, role=role, error=repr(exc))
            return
        self.num_conversions += 1
        self.on_converted()

    def on_converted(self) -> None:
        """A node changed role: re-solve ``t`` now (the old one was solved for the old split)."""
        t_opt = self._targets(self.link.gbps)[0].t_opt
        self.state = ctl.ControllerState(
            t_opt, self.state.cache_policy, self.clock(), None, self.state.low_egress_since_s
        )
        self.policy = PolicyState.from_controller(self.state)
        log.info("threshold_resolved", threshold=round(t_opt, 1), deployment=self._deployment())


def _set_draining(cluster: ClusterState, names: set[str], is_draining: bool) -> None:
    for name in names:
        if (worker := cluster.workers.get(name)) is not None:
            worker.is_draining = is_draining


def _queued(pool: list[WorkerState]) -> int:
    return sum(w.report.queue_depth for w in pool if w.report)


def relay_counters(report: p.LoadReport, now_s: float) -> le.RelayCounters:
    """The link estimate's view of one worker's report (received at ``now_s``)."""
    return le.RelayCounters(
        now_s=now_s,
        bytes_sent=report.relay_bytes_out,
        bytes_acked=report.relay_bytes_sent,
        link_wait_s=report.relay_link_wait_s,
        link_wait_bytes=report.relay_link_wait_bytes,
        credit_wait_s=report.relay_credit_wait_s,
        tcp_bound_s=report.relay_tcp_bound_s,
        tcp_bound_gbit=report.relay_tcp_bound_gbit,
        tcp_retrans=report.relay_tcp_retrans,
        tcp_segs_out=report.relay_tcp_segs_out,
    )
