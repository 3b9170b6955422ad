"""Long-timescale rebalancer: direction, persistence, drain-then-convert, cooldown, hysteresis."""

from __future__ import annotations

import pytest

from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.policy.model import Deployment
from trtllm_prfaas.policy.placement import NodeView
from trtllm_prfaas.policy.rebalancer import (
    RebalanceAction,
    RebalancerConfig,
    Role,
    StageSignals,
    imbalance,
    initial_rebalancer_state,
    step_rebalancer,
)
from trtllm_prfaas.policy.solver import solve, solve_fixed_split
from trtllm_prfaas.sim.fluid import case_study_system, case_study_workload

CFG = RebalancerConfig()
P_NODES = [NodeView("p0", backlog_s=3.0), NodeView("p1", backlog_s=1.0)]
D_NODES = [NodeView("d0", backlog_s=20.0), NodeView("d1", backlog_s=4.0), NodeView("d2")]


def sig(*, pu=0.5, pq=0.0, du=0.5, dq=0.0, num_p=3, num_d=5, done=False) -> StageSignals:
    return StageSignals(pu, pq, du, dq, num_p, num_d, done)


def run(state, signals, start, seconds):
    decisions = []
    for k in range(0, seconds, int(CFG.period_s)):
        d = step_rebalancer(CFG, state, signals, P_NODES, D_NODES, start + k)
        state = d.state
        decisions.append(d)
    return state, decisions


def test_direction_needs_a_short_role_and_a_donor_with_room() -> None:
    assert imbalance(CFG, sig(pu=0.95, du=0.5)) is Role.PREFILL
    assert imbalance(CFG, sig(pq=3.0, du=0.5)) is Role.PREFILL
    assert imbalance(CFG, sig(du=0.95, pu=0.4)) is Role.DECODE
    assert imbalance(CFG, sig(pu=0.95, du=0.95)) is None  # both short: needs hardware
    # decode at 0.7 over 5 nodes -> 0.875 over 4: above after_cap, so it keeps its nodes.
    assert imbalance(CFG, sig(pu=0.95, du=0.7)) is None
    assert imbalance(CFG, sig(du=0.95, pu=0.1, num_p=1)) is None  # never empty a role


def test_persist_then_drain_the_least_loaded_then_convert() -> None:
    state, ds = run(initial_rebalancer_state(), sig(pu=0.95), 0.0, 60)
    assert {d.action for d in ds} == {RebalanceAction.NONE}
    d = step_rebalancer(CFG, state, sig(pu=0.95), P_NODES, D_NODES, 60.0)
    assert (d.action, d.node_id, d.target_role) == (RebalanceAction.DRAIN, "d2", Role.PREFILL)
    state, ds = run(d.state, sig(pu=0.95), 70.0, 30)
    assert {x.reason for x in ds} == {"draining"}
    d = step_rebalancer(CFG, state, sig(pu=0.95, done=True), P_NODES, D_NODES, 100.0)
    assert d.action is RebalanceAction.CONVERT and (d.new_num_p, d.new_num_d) == (4, 4)


def test_cooldown_and_interrupted_imbalance_reset_the_timer() -> None:
    state, _ = run(initial_rebalancer_state(), sig(pu=0.95), 0.0, 50)
    state, _ = run(state, sig(), 50.0, 10)  # balanced for one period: timer resets
    state, ds = run(state, sig(pu=0.95), 60.0, 60)
    assert all(d.action is RebalanceAction.NONE for d in ds)
    done = step_rebalancer(CFG, state, sig(pu=0.95), P_NODES, D_NODES, 120.0)
    assert done.action is RebalanceAction.DRAIN
    conv = step_rebalancer(CFG, done.state, sig(pu=0.95, done=True), P_NODES, D_NODES, 130.0)
    # right after converting, even a strong reverse imbalance waits for the cooldown
    state, ds = run(conv.state, sig(du=0.99, pu=0.1, num_p=4, num_d=4), 140.0, 280)
    assert {d.reason for d in ds} == {"cooldown"}


def test_after_cap_band_prevents_flip_flop() -> None:
    # PD-P short, decode at 0.72 over 5 -> 0.9 over 4 would be busy: no conversion.
    assert imbalance(CFG, sig(pu=0.95, du=0.72)) is None
    # decode at 0.6 over 5 -> 0.75 over 4 (< busy 0.9): converting cannot make decode short.
    assert imbalance(CFG, sig(pu=0.95, du=0.6)) is Role.PREFILL
    assert imbalance(CFG, sig(pu=0.5, du=0.75, num_d=4)) is None
    with pytest.raises(ConfigError):
        RebalancerConfig(after_cap=0.95, busy=0.9)


def test_resolve_after_conversion_matches_the_joint_solver() -> None:
    system, workload = case_study_system(), case_study_workload()
    joint = solve(system, workload, 4, 8)
    fixed = solve_fixed_split(system, workload, Deployment(4, 3, 5))
    assert fixed.threshold_tokens == pytest.approx(joint.threshold_tokens, rel=1e-3)
    more_p = solve_fixed_split(system, workload, Deployment(4, 4, 4))
    assert more_p.threshold_tokens > fixed.threshold_tokens  # more PD-P: keep more local
