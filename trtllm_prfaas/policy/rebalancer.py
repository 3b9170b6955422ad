"""Long-timescale rebalancing of the local PD cluster's prefill (PD-P) and decode (PD-D) roles.

Every ``period_s`` the caller passes per-stage utilisation and queue depth averaged over that
period (:class:`StageSignals`) and the candidate nodes of each role. :func:`step` returns a
:class:`RebalanceDecision` whose ``action`` is one of:

- ``NONE``: nothing to do;
- ``DRAIN``: stop giving new work to ``node_id`` (it keeps finishing what it has);
- ``CONVERT``: the drain the caller reported finished (``signals.is_drain_complete``); switch
  ``node_id`` to ``target_role`` and re-solve ``t`` for the new split ``(new_num_p, new_num_d)``
  (e.g. :func:`~trtllm_prfaas.policy.solver.solve_fixed_split`).

Direction: PD-P is *short* when its utilisation >= ``busy`` or it has >= ``queue_busy`` waiting
requests per node, and PD-D can give a node up when its utilisation spread over one fewer node,
``u_d * N_d / (N_d - 1)``, stays <= ``after_cap``; symmetrically for PD-D short. Both short means
the cluster needs hardware, not a different split: nothing happens.

Values, and why:

- ``period_s = 10``: the signals are averages; a role change is a minutes-scale decision, and a
  10 s average already smooths the Poisson noise of a few requests per second.
- ``busy = 0.90`` utilisation or ``queue_busy = 2`` waiting per node: above 90% an M/G/c queue's
  wait grows steeply; two queued prefills per node is already a TTFT SLO miss on long prompts.
- ``after_cap = 0.80`` (< ``busy``): the stage that gives a node up must stay clearly below the
  busy mark afterwards, so the conversion cannot make the donor short and trigger the reverse
  conversion (the hysteresis band is ``busy - after_cap`` = 10 points).
- ``persist_s = 60``: the imbalance must hold for six consecutive periods; bursts shorter than a
  minute are the short-timescale controller's job (it moves ``t``, which is cheap).
- ``cooldown_s = 300`` after a conversion: a decode node drains in about one output's decode time
  (1024 tokens x 25 ms = 26 s) and the new ``t`` needs a few minutes of traffic before the
  signals mean something again; 300 s is about ten decode lifetimes.
- ``min_nodes_per_role = 1``: a role is never emptied (decode must always exist; an empty PD-P
  would leave short prompts nowhere to go when the link fails).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.placement import NodeView
from trtllm_prfaas.vocabulary import Role

__all__ = [
    "RebalanceAction",
    "RebalanceDecision",
    "RebalancerConfig",
    "RebalancerState",
    "Role",
    "StageSignals",
    "choose_node_to_drain",
    "imbalance",
    "initial_rebalancer_state",
    "step_rebalancer",
]


class RebalanceAction(Enum):
    """What :func:`step_rebalancer` asks the caller to do."""

    NONE = "none"
    DRAIN = "drain"
    CONVERT = "convert"


@dataclass(frozen=True)
class RebalancerConfig:
    """Marks (fractions, requests per node) and timers (seconds); see the module doc."""

    period_s: float = 10.0
    busy: float = 0.90
    queue_busy: float = 2.0
    after_cap: float = 0.80
    persist_s: float = 60.0
    cooldown_s: float = 300.0
    min_nodes_per_role: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.after_cap < self.busy <= 1:
            raise ConfigError("rebalancer needs 0 < after_cap < busy <= 1 (hysteresis band)")
        if self.period_s <= 0 or self.persist_s < 0 or self.cooldown_s < 0:
            raise ConfigError("rebalancer periods must be positive")
        if self.min_nodes_per_role < 1 or self.queue_busy <= 0:
            raise ConfigError("min_nodes_per_role >= 1 and queue_busy > 0 required")


@dataclass(frozen=True)
class StageSignals:
    """Per-stage averages over the last period and the current split.

    Utilisations are busy fractions in [0, 1] (prefill: busy node-seconds over node-seconds;
    decode: occupied slot-seconds over slot-seconds); queues are waiting requests per node.
    ``is_drain_complete`` reports whether the node being drained has no work left.
    """

    prefill_utilisation: float
    prefill_queue_per_node: float
    decode_utilisation: float
    decode_queue_per_node: float
    num_p: int
    num_d: int
    is_drain_complete: bool = False


@dataclass(frozen=True)
class RebalancerState:
    """Memory: when the current imbalance started, the drain in progress, the last conversion."""

    short_role: Role | None
    short_since_s: float | None
    draining_node_id: str | None
    target_role: Role | None
    last_conversion_s: float | None


@dataclass(frozen=True)
class RebalanceDecision:
    """New state, what to do, and the split after the action (unchanged unless CONVERT)."""

    state: RebalancerState
    action: RebalanceAction
    node_id: str | None
    target_role: Role | None
    new_num_p: int
    new_num_d: int
    reason: str


def initial_rebalancer_state() -> RebalancerState:
    """No imbalance seen, nothing draining, no conversion yet."""
    return RebalancerState(None, None, None, None, None)


def _is_short(c: RebalancerConfig, utilisation: float, queue_per_node: float) -> bool:
    return utilisation >= c.busy or queue_per_node >= c.queue_busy


def _can_give(c: RebalancerConfig, utilisation: float, num_nodes: int) -> bool:
    if num_nodes - 1 < c.min_nodes_per_role:
        return False
    return utilisation * num_nodes / (num_nodes - 1) <= c.after_cap


def imbalance(c: RebalancerConfig, s: StageSignals) -> Role | None:
    """The role that is short of nodes and can get one from the other, or ``None``."""
    p_short = _is_short(c, s.prefill_utilisation, s.prefill_queue_per_node)
    d_short = _is_short(c, s.decode_utilisation, s.decode_queue_per_node)
    if p_short and not d_short and _can_give(c, s.decode_utilisation, s.num_d):
        return Role.PREFILL
    if d_short and not p_short and _can_give(c, s.prefill_utilisation, s.num_p):
        return Role.DECODE
    return None


def choose_node_to_drain(nodes: Sequence[NodeView]) -> NodeView | None:
    """The node with the least work (fastest drain): least backlog, most free slots, then id."""
    usable = [n for n in nodes if not n.is_draining]
    if not usable:
        return None
    return min(usable, key=lambda n: (n.backlog_s, n.queue_depth, -n.free_decode_slots, n.node_id))


def _decision(
    st: RebalancerState, s: StageSignals, action: RebalanceAction, reason: str
) -> RebalanceDecision:
    return RebalanceDecision(st, action, None, None, s.num_p, s.num_d, reason)


def _finish_drain(st: RebalancerState, s: StageSignals, now_s: float) -> RebalanceDecision:
    if not s.is_drain_complete:
        return _decision(st, s, RebalanceAction.NONE, "draining")
    to_prefill = st.target_role is Role.PREFILL
    num_p, num_d = (s.num_p + 1, s.num_d - 1) if to_prefill else (s.num_p - 1, s.num_d + 1)
    new = RebalancerState(None, None, None, None, now_s)
    return RebalanceDecision(
        new, RebalanceAction.CONVERT, st.draining_node_id, st.target_role, num_p, num_d, "convert"
    )


def step_rebalancer(
    config: RebalancerConfig,
    state: RebalancerState,
    signals: StageSignals,
    prefill_nodes: Sequence[NodeView],
    decode_nodes: Sequence[NodeView],
    now_s: float,
) -> RebalanceDecision:
    """One rebalancing period (call every ``config.period_s``); pure, ``now_s`` passed in.

    ``prefill_nodes`` / ``decode_nodes`` are the candidates to drain (any subset that contains
    the least-loaded node of the role). At most one node drains at a time.
    """
    if state.draining_node_id is not None:
        return _finish_drain(state, signals, now_s)
    if state.last_conversion_s is not None and now_s - state.last_conversion_s < config.cooldown_s:
        return _decision(state, signals, RebalanceAction.NONE, "cooldown")
    short = imbalance(config, signals)
    if short is None:
        return _decision(replace(state, short_role=None, short_since_s=None), signals,
                         RebalanceAction.NONE, "balanced")  # fmt: skip
    since = state.short_since_s if state.short_role is short else now_s
    st = replace(state, short_role=short, short_since_s=since)
    if since is None or now_s - since < config.persist_s:
        return _decision(st, signals, RebalanceAction.NONE, "persisting")
    donors = decode_nodes if short is Role.PREFILL else prefill_nodes
    node = choose_node_to_drain(donors)
    if node is None:
        return _decision(st, signals, RebalanceAction.NONE, "no-donor")
    st = replace(st, draining_node_id=node.node_id, target_role=short)
    return RebalanceDecision(
        st, RebalanceAction.DRAIN, node.node_id, short, signals.num_p, signals.num_d, "drain"
    )
