"""The threshold targets of one control tick, shared by the live router and the simulator.

Both hosts call :func:`targets` with the same plain inputs each tick and hand the result to
:func:`~trtllm_prfaas.policy.controller.step` (:func:`control_step` does both):

- ``t_opt``, the controller's anchor, is the fluid optimum for the **provisioned** link
  (``solve_fixed_split`` at ``provisioned_gbps``). It is not re-solved for a degraded link: the
  optimum for a degraded link is the best split if the degradation lasted forever, and a link
  drop is transient; a backlog queued on the link drains ~10x faster once the link recovers
  than work moved to the PD-P nodes (the simulator's ``DYNAMIC_LIVE``, which re-anchors,
  lost to ``DYNAMIC`` by that much: docs/simulation.md).
- The **live** link acts through the floor ``t_min = min_remote_threshold`` at ``live_gbps``
  (the least ``t`` whose offloaded KV the degraded link can still carry at the measured arrival
  rate) and, inside the controller, through relay delay against the local prefill backlog.
- ``t_max = max_local_threshold`` at the measured arrival rate: PD-P stays out of overload.

The arrival rate is bucketed to 2% steps (:func:`bucket_rate`) so both hosts solve on the same
value and a caller may cache the grid evaluations per bucket. Pure: no clocks, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from trtllm_prfaas.policy import controller as ctl
from trtllm_prfaas.policy.model import Deployment, Workload
from trtllm_prfaas.policy.profile import SystemProfile
from trtllm_prfaas.policy.solver import (
    SolverOptions,
    max_local_threshold,
    min_remote_threshold,
    solve_fixed_split,
)

__all__ = [
    "RATE_STEP",
    "ThresholdInputs",
    "ThresholdTargets",
    "bucket_rate",
    "control_step",
    "targets",
]

RATE_STEP = 1.02  # arrival-rate buckets: 2% apart (finer than the EWMA's own noise)
_OPTIONS = SolverOptions()


@dataclass(frozen=True)
class ThresholdInputs:
    """What a tick's targets depend on besides the profiles.

    ``provisioned_gbps``: the link the deployment was sized for (the anchor's link);
    ``live_gbps``: the live link estimate (``inf``: an unconstrained link);
    ``arrival_rate_per_s``: measured arrivals (any value; bucketed here);
    ``local_max_utilisation``: the load each side's bound keeps it under;
    ``offload_below_opt``: False pins ``t_min`` to ``t_opt`` (a raise-only controller).
    """

    provisioned_gbps: float
    live_gbps: float
    arrival_rate_per_s: float
    deployment: Deployment
    local_max_utilisation: float = 0.85
    offload_below_opt: bool = True


@dataclass(frozen=True)
class ThresholdTargets:
    """``t_opt`` (anchor), ``[t_min, t_max]`` (the controller's bounds), in tokens."""

    t_opt: float
    t_min: float
    t_max: float


def bucket_rate(rate_per_s: float) -> float:
    """``rate`` rounded to the nearest power of :data:`RATE_STEP` (``1e-6`` floor)."""
    k = round(math.log(max(rate_per_s, 1e-6)) / math.log(RATE_STEP))
    return float(RATE_STEP**k)


def anchor(
    system: SystemProfile,
    workload: Workload,
    deployment: Deployment,
    provisioned_gbps: float,
    options: SolverOptions = _OPTIONS,
) -> float:
    """``t_opt``: the fixed-split optimum at the provisioned link rate."""
    at = replace(system, link_gbps=provisioned_gbps)
    return solve_fixed_split(at, workload, deployment, options).threshold_tokens


def bounds(
    system: SystemProfile,
    workload: Workload,
    inputs: ThresholdInputs,
    options: SolverOptions = _OPTIONS,
) -> tuple[float, float]:
    """``(t_min, t_max)``: PrfaaS (compute and the *live* link) and PD-P each at
    ``local_max_utilisation`` for the bucketed arrival rate."""
    at = replace(system, link_gbps=inputs.live_gbps)
    rate, util, dep = (
        bucket_rate(inputs.arrival_rate_per_s),
        inputs.local_max_utilisation,
        inputs.deployment,
    )
    lo = min_remote_threshold(at, workload, dep, rate, util, options)
    hi = max_local_threshold(at, workload, dep, rate, util, options)
    return lo, hi


def targets(
    system: SystemProfile,
    workload: Workload,
    inputs: ThresholdInputs,
    options: SolverOptions = _OPTIONS,
) -> ThresholdTargets:
    """One tick's ``(t_opt, t_min, t_max)`` (see the module doc)."""
    t_opt = anchor(system, workload, inputs.deployment, inputs.provisioned_gbps, options)
    t_min, t_max = bounds(system, workload, inputs, options)
    return ThresholdTargets(t_opt, t_min if inputs.offload_below_opt else t_opt, t_max)


def control_step(
    config: ctl.ControllerConfig,
    state: ctl.ControllerState,
    signals: ctl.LinkSignals,
    goal: ThresholdTargets,
    now_s: float,
) -> ctl.ControllerDecision:
    """``controller.step`` on one tick's targets (the call both hosts make)."""
    return ctl.step(config, state, signals, goal.t_opt, goal.t_max, now_s, goal.t_min)
