"""Short-timescale control of the offload threshold ``t`` and of the cache policy.

Every ``period_s`` the router calls :func:`step` with the signals it measured over that period,
the threshold the solver currently proposes (``t_opt``, re-solved on the live histogram and the
measured link rate) and the bounds ``[t_min, t_max]`` it may move in. The solver owns the
optimum of the fluid model; the controller owns what the fluid model cannot see: queues that
build in a burst, a link that shrinks faster than the histogram moves, TCP loss.

- **Link pressure or a slower remote path** (``delay_gap_s >= balance_band_s``, or any pressure
  signal below): raise ``t`` (offload less), at most up to ``t_max``.
- **A slower local path** (``delay_gap_s <= -balance_band_s``): lower ``t`` (offload more), at
  most down to ``t_min``. The caller chooses ``t_min``; by default it is ``t_opt`` and the
  controller never offloads more than the solver says (the original, raise-only behaviour).
- Otherwise relax back to ``t_opt``: from below as soon as the local path is no longer slower,
  from above slowly once every signal has been healthy for ``settle_s``.

The router should pass ``t_max`` / ``t_min`` that keep the receiving stage out of overload at the
measured arrival rate (``policy.solver.max_local_threshold`` / ``min_remote_threshold``);
without such a ceiling a raise-only controller pushes the whole burst onto PD-P (observed in the
discrete-event simulator: P90 TTFT 5x worse than a static ``t``).

Signals (all averaged over one period) and why they matter:

- ``egress_utilisation``: PrfaaS egress / link capacity. Approaching 1 means KV transfers queue
  at the sender and TTFT of offloaded requests grows without bound.
- ``prfaas_queue_depth``: requests waiting for a PrfaaS prefill instance.
- ``retransmit_ratio``: retransmitted / sent TCP segments on the relay: loss on the WAN.
- ``relay_queue_delay_s``: time a layer's KV waits in the relay's send queue.
- ``prfaas_backlog_s`` / ``pd_backlog_s``: queued prefill work per node (seconds) on each side,
  the router's estimate of how long a new request would wait before its prefill starts.

Default values, and why (see :class:`ControllerConfig`):

- pressure when egress >= 0.85 (keep 15% headroom for bursts: a multi-stream TCP link that runs
  at capacity shows loss and tail latency), queue >= 2 requests per PrfaaS instance (≈ two
  prefill times, ~5 s at 44K tokens, already past a TTFT SLO), retransmits >= 2%, relay queue
  delay >= 0.5 s (a quarter of the case study's mean TTFT);
- healthy only when egress <= 0.60, queue <= 0.5 per instance, retransmits <= 0.5%, relay delay
  <= 0.1 s. The 25-point egress band is wider than the effect of one raise step (x1.25 on t cuts
  egress by roughly 10% around the case study's optimum), so one step cannot flip the state;
- raise fast (x1.25, at most once per 1 s) and lower slowly (/1.05, at most once per 5 s, only
  after 10 s of continuous health): multiplicative-increase / slow-decrease, like AIMD, because
  overload hurts every offloaded request while being conservative costs a little throughput;
- balance band 2 s (``balance_band_s``): about one mean prefill (the case study's mean TTFT is
  2.2 s); smaller backlog differences are Poisson noise and would make ``t`` chatter. Moves in
  either direction use ``raise_factor`` and ``min_raise_interval_s`` (x1.25 per second);
- cache policy: *abundant* bandwidth (use the longer prefix anywhere, moving cache across) when
  egress <= 0.40 for 10 s; back to *scarce* (each cluster's cache on its own) as soon as egress
  >= 0.70. Moving caches adds egress, so it is allowed only with a wide margin.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from trtllm_prfaas.errors import ConfigError

__all__ = [
    "CachePolicy",
    "ControllerConfig",
    "ControllerDecision",
    "ControllerState",
    "LinkSignals",
    "delay_gap_s",
    "initial_state",
    "is_healthy",
    "is_pressure",
    "step",
]


class CachePolicy(Enum):
    """Which prefix-cache rule the router applies (PAPER.md, Routing)."""

    SCARCE = "scarce"  # judge each cluster's cache on its own
    ABUNDANT = "abundant"  # use the longer prefix anywhere; move cache across if needed


@dataclass(frozen=True)
class ControllerConfig:
    """Thresholds (fractions, requests per instance, seconds) and step sizes; see module doc."""

    period_s: float = 1.0
    egress_high: float = 0.85
    egress_low: float = 0.60
    queue_per_instance_high: float = 2.0
    queue_per_instance_low: float = 0.5
    retransmit_high: float = 0.02
    retransmit_low: float = 0.005
    relay_delay_high_s: float = 0.5
    relay_delay_low_s: float = 0.1
    raise_factor: float = 1.25
    lower_factor: float = 1.05
    min_raise_interval_s: float = 1.0
    min_lower_interval_s: float = 5.0
    settle_s: float = 10.0
    abundant_below: float = 0.40
    scarce_above: float = 0.70
    balance_band_s: float = 2.0

    def __post_init__(self) -> None:
        pairs = [
            (self.egress_low, self.egress_high),
            (self.queue_per_instance_low, self.queue_per_instance_high),
            (self.retransmit_low, self.retransmit_high),
            (self.relay_delay_low_s, self.relay_delay_high_s),
            (self.abundant_below, self.scarce_above),
        ]
        if any(not 0 <= lo < hi for lo, hi in pairs):
            raise ConfigError("controller thresholds need 0 <= low < high (hysteresis band)")
        if self.raise_factor <= 1 or self.lower_factor <= 1 or self.period_s <= 0:
            raise ConfigError("raise_factor and lower_factor must be > 1, period_s > 0")


@dataclass(frozen=True)
class LinkSignals:
    """What the router measured over the last period."""

    egress_utilisation: float
    prfaas_queue_depth: int
    prfaas_instances: int
    retransmit_ratio: float
    relay_queue_delay_s: float
    prfaas_backlog_s: float = 0.0
    pd_backlog_s: float = 0.0


@dataclass(frozen=True)
class ControllerState:
    """Controller memory: the threshold in force, when it last moved, health and cache timers."""

    threshold_tokens: float
    cache_policy: CachePolicy
    last_change_s: float
    healthy_since_s: float | None
    low_egress_since_s: float | None


@dataclass(frozen=True)
class ControllerDecision:
    """The new state and a short reason (``raise``, ``lower``, ``snap``, ``hold``, ...)."""

    state: ControllerState
    reason: str


def initial_state(t_opt: float, now_s: float) -> ControllerState:
    """Start at the solver's threshold with the scarce-bandwidth cache policy."""
    return ControllerState(t_opt, CachePolicy.SCARCE, now_s, None, None)


def _per_instance(s: LinkSignals) -> float:
    return s.prfaas_queue_depth / max(s.prfaas_instances, 1)


def is_pressure(c: ControllerConfig, s: LinkSignals) -> bool:
    """Any signal at or past its high mark."""
    return (
        s.egress_utilisation >= c.egress_high
        or _per_instance(s) >= c.queue_per_instance_high
        or s.retransmit_ratio >= c.retransmit_high
        or s.relay_queue_delay_s >= c.relay_delay_high_s
    )


def is_healthy(c: ControllerConfig, s: LinkSignals) -> bool:
    """Every signal at or below its low mark."""
    return (
        s.egress_utilisation <= c.egress_low
        and _per_instance(s) <= c.queue_per_instance_low
        and s.retransmit_ratio <= c.retransmit_low
        and s.relay_queue_delay_s <= c.relay_delay_low_s
    )


def _next_cache_policy(
    c: ControllerConfig, st: ControllerState, s: LinkSignals, now_s: float
) -> tuple[CachePolicy, float | None]:
    if s.egress_utilisation >= c.scarce_above:
        return CachePolicy.SCARCE, None
    if s.egress_utilisation > c.abundant_below:
        return st.cache_policy, None
    since = now_s if st.low_egress_since_s is None else st.low_egress_since_s
    policy = CachePolicy.ABUNDANT if now_s - since >= c.settle_s else st.cache_policy
    return policy, since


def delay_gap_s(s: LinkSignals) -> float:
    """Expected extra wait of the remote path over the local one (seconds): PrfaaS backlog plus
    relay send-queue delay, minus PD-P backlog. Positive means offloading is the slower path."""
    return s.prfaas_backlog_s + s.relay_queue_delay_s - s.pd_backlog_s


def _wants_less_offload(c: ControllerConfig, s: LinkSignals, gap: float) -> bool:
    """Link trouble, a slower remote path, or a deep PrfaaS queue while PD-P is no worse off
    (in a burst that loads both sides, moving work to PD-P only moves the queue)."""
    link = (
        s.egress_utilisation >= c.egress_high
        or s.retransmit_ratio >= c.retransmit_high
        or s.relay_queue_delay_s >= c.relay_delay_high_s
    )
    queue = _per_instance(s) >= c.queue_per_instance_high and gap >= 0
    return link or queue or gap >= c.balance_band_s


def _up(c: ControllerConfig, t: float, waited: float, t_max: float) -> tuple[float, str]:
    if waited < c.min_raise_interval_s or t >= t_max:
        return t, "hold-pressure"
    return min(t * c.raise_factor, t_max), "raise"


def _down(c: ControllerConfig, t: float, waited: float, t_min: float) -> tuple[float, str]:
    if waited < c.min_raise_interval_s or t <= t_min:
        return t, "hold-local"
    return max(t / c.raise_factor, t_min), "shed-local"


def _relax(
    c: ControllerConfig, st: ControllerState, gap: float, t_opt: float, now_s: float
) -> tuple[float, str]:
    t, waited = st.threshold_tokens, now_s - st.last_change_s
    if t < t_opt:  # below the optimum only while PD-P is the slower path
        return _up(c, t, waited, t_opt) if gap <= 0 else (t, "hold")
    healthy_for = None if st.healthy_since_s is None else now_s - st.healthy_since_s
    if healthy_for is None or healthy_for < c.settle_s or t <= t_opt:
        return t, "hold"
    if waited < c.min_lower_interval_s:
        return t, "hold-rate-limit"
    return max(t / c.lower_factor, t_opt), "lower"


def _next_threshold(
    c: ControllerConfig,
    st: ControllerState,
    s: LinkSignals,
    bounds: tuple[float, float, float],
    now_s: float,
) -> tuple[float, str]:
    t_min, t_opt, t_max = bounds
    t, waited = st.threshold_tokens, now_s - st.last_change_s
    if t < t_min:
        return t_min, "snap"  # the floor moved up: follow at once (the safe direction)
    if t > t_max:
        return max(t_max, t_min), "clip"
    gap = delay_gap_s(s)
    if gap <= -c.balance_band_s:  # PD-P is the slower path: offload more (down to t_min)
        return _down(c, t, waited, t_min)
    if _wants_less_offload(c, s, gap):
        return _up(c, t, waited, t_max)
    return _relax(c, st, gap, t_opt, now_s)


def step(
    config: ControllerConfig,
    state: ControllerState,
    signals: LinkSignals,
    t_opt: float,
    t_max: float,
    now_s: float,
    t_min: float | None = None,
) -> ControllerDecision:
    """One control period: returns the new state (threshold in ``[t_min, t_max]``) and why.

    ``t_min`` defaults to ``t_opt`` (the controller then only ever offloads less than the
    solver's optimum). Pure: ``now_s`` is passed in, nothing is read from clocks. Call once per
    ``period_s``.
    """
    healthy_since: float | None = None
    if is_healthy(config, signals):
        healthy_since = now_s if state.healthy_since_s is None else state.healthy_since_s
    st = replace(state, healthy_since_s=healthy_since)
    floor = t_opt if t_min is None else min(t_min, t_opt)
    bounds = (floor, t_opt, max(t_max, t_opt))
    t, reason = _next_threshold(config, st, signals, bounds, now_s)
    policy, low_since = _next_cache_policy(config, st, signals, now_s)
    moved = t != state.threshold_tokens
    new = replace(
        st,
        threshold_tokens=t,
        cache_policy=policy,
        last_change_s=now_s if moved else state.last_change_s,
        low_egress_since_s=low_since,
    )
    return ControllerDecision(new, reason)
