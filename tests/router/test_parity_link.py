"""Parity under a link drop: the router's control loop and the simulator's ``DYNAMIC`` make the
same ``(t_opt, t_min, t_max, t)`` decisions, tick by tick, on one recorded trace.

The live side is the real :class:`~trtllm_prfaas.router.control.ControlLoop` on a hand-built
cluster, stepped with a fake clock: requests and prefill legs feed its online profiles, and the
PrfaaS worker's ``LoadReport`` relay counters script a link that drops to a tenth for 15 s
(the sender link-bound at 1 Gbps of a provisioned 10) and then recovers. Each tick's record
keeps what it decided on (signals, live link estimate, arrival rate, deployment, profile
snapshot). The simulator side replays every record through ``_Sim._control``, the call its
``DYNAMIC`` mode makes each tick, on a ``DesConfig`` built from that tick's snapshot (the
provisioned link as ``system.link_gbps``), carrying the controller state from tick to tick.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from trtllm_prfaas.policy import controller as ctl
from trtllm_prfaas.policy.placement import Cluster
from trtllm_prfaas.policy.route import RouteDecision
from trtllm_prfaas.policy.solver import SolverOptions
from trtllm_prfaas.policy.workload import TruncatedLogNormal
from trtllm_prfaas.router.cluster import ClusterState, WorkerState
from trtllm_prfaas.router.control import ControlConfig, ControlLoop, TickRecord
from trtllm_prfaas.sim.des import DesConfig, ThresholdMode, _Sim
from trtllm_prfaas.sim.link import LinkSchedule
from trtllm_prfaas.sim.traffic import PoissonArrivals, make_trace
from trtllm_prfaas.worker import protocol as p

PROVISIONED_GBPS, DROPPED_GBPS = 10.0, 1.0
DROP = (20.0, 35.0)  # seconds after the start: the link carries a tenth
FAST = ctl.ControllerConfig(min_raise_interval_s=0.0, min_lower_interval_s=1.0, settle_s=3.0)
LENGTHS = [300, 600, 1200, 2400, 4800, 9600, 16000, 700, 1500, 3000]
GB = 125_000_000  # bytes in a gigabit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _cluster(clock: Clock) -> ClusterState:
    cluster = ClusterState()
    for name, role, remote in [("prfaas", "prefill", True), ("pd-p", "prefill", False),
                               ("decode", "decode", False)]:  # fmt: skip
        # 32K context, 64 decode slots, KV of 100 KB per token plus a 1 MB state
        info = p.WorkerInfo(name, role, "c", "m", 32768, 16, 4096, 64, "", 100_000, 1_000_000)
        cluster.add(WorkerState(name, "tcp://x", info, remote, reported_at=clock.now))
    return cluster


def _feed(loop: ControlLoop, k: int) -> None:
    """One second of traffic: 4 requests, legs on exact latency lines on each side."""
    for j in range(4):
        n = LENGTHS[(4 * k + j) % len(LENGTHS)]
        remote = n > 2000
        cluster = Cluster.PRFAAS if remote else Cluster.PD
        decision = RouteDecision("r", cluster, "n", "decode", n, 0, None, 2000.0, 0.0)
        loop.on_routed(decision, n, 64)
        loop.on_prefill(True, n, 0.02 + 2e-5 * n)
        loop.on_prefill(False, n, 0.02 + 8e-5 * n)
        loop.on_decode(63, 63 * 0.02)


class RelayScript:
    """The PrfaaS worker's cumulative relay counters: producer-bound at 2 Gbps on a healthy
    link; during the drop, link-bound 90% of the time at the dropped rate."""

    def __init__(self) -> None:
        self.out = self.acked = self.wait_bytes = 0
        self.wait_s = 0.0

    def report(self, t: float) -> p.LoadReport:
        if DROP[0] <= t < DROP[1]:
            step = int(DROPPED_GBPS * 0.9 * GB)
            self.wait_s += 0.9
            self.wait_bytes += step
        else:
            step = 2 * GB
        self.out += step
        self.acked += step
        return p.LoadReport("prfaas", 1, 1, 0, 100, 0, relay_bytes_sent=self.acked,
                            relay_bytes_out=self.out, relay_link_wait_s=self.wait_s,
                            relay_link_wait_bytes=self.wait_bytes)  # fmt: skip


def _record(num_ticks: int) -> tuple[ControlLoop, list[TickRecord]]:
    clock = Clock()
    config = ControlConfig(controller=FAST, rebalancer=None, link_gbps=PROVISIONED_GBPS,
                           min_requests=16, min_legs=4, solver=SolverOptions())  # fmt: skip
    loop = ControlLoop(config, _cluster(clock), 2000.0, clock=clock)
    script, start = RelayScript(), clock.now
    for k in range(num_ticks):
        clock.now += 1.0
        t = clock.now - start
        _feed(loop, k)
        if DROP[0] <= t < DROP[1] + 3:  # KV queues behind the link until the backlog drains
            loop.on_relay_wait(2.0)
        for w in loop.cluster.workers.values():
            w.reported_at = clock.now
        loop.cluster.on_report("prfaas", script.report(t))
        loop.cluster.workers["prfaas"].reported_at = clock.now
        loop.tick(clock.now)
    return loop, list(loop.ticks)


def _replay(initial: ctl.ControllerState, ticks: list[TickRecord]) -> list[tuple[float, ...]]:
    """Each recorded tick through the simulator's DYNAMIC control step."""
    state, out = initial, []
    trace = make_trace(PoissonArrivals(1.0), TruncatedLogNormal(7.0, 1.0, 16, 16000), 1, 0)
    for rec in ticks:
        if rec.inputs is None or rec.snapshot is None:  # warming up: t stays as configured
            out.append((rec.t_opt, rec.t_min, rec.t_max, state.threshold_tokens))
            continue
        system = replace(rec.snapshot.system, link_gbps=rec.inputs.provisioned_gbps)
        config = DesConfig(system, rec.snapshot.workload, rec.inputs.deployment,
                           LinkSchedule.constant(rec.inputs.provisioned_gbps),
                           state.threshold_tokens, mode=ThresholdMode.DYNAMIC, controller=FAST,
                           local_max_utilisation=rec.inputs.local_max_utilisation)  # fmt: skip
        sim = _Sim(config, trace)
        sim.ctrl, sim.rate_ewma = state, rec.inputs.arrival_rate_per_s
        goal = sim._control(rec.now_s, rec.signals, rec.link_gbps)
        state = sim.ctrl
        out.append((goal.t_opt, goal.t_min, goal.t_max, state.threshold_tokens))
    return out


def test_router_and_sim_make_the_same_decisions_through_a_link_drop() -> None:
    loop, ticks = _record(60)
    live = [(r.t_opt, r.t_min, r.t_max, r.state.threshold_tokens) for r in ticks]
    assert _replay(loop.initial_state, ticks) == live
    # The trace does hold a drop that moved the decisions.
    at = {round(r.now_s - ticks[0].now_s) + 1: r for r in ticks}
    before, during = at[18], at[30]
    assert before.link_gbps == pytest.approx(PROVISIONED_GBPS)
    assert during.link_gbps == pytest.approx(DROPPED_GBPS, rel=0.05)
    assert during.inputs is not None and during.inputs.provisioned_gbps == PROVISIONED_GBPS
    assert during.t_opt == pytest.approx(before.t_opt, rel=0.05)  # anchored on the provisioned
    assert during.t_min > before.t_min  # the floor follows the live link
    assert during.state.threshold_tokens > before.state.threshold_tokens
    after = at[60]  # recovered: the estimate is back at the provisioned rate
    assert after.link_gbps == pytest.approx(PROVISIONED_GBPS)
    assert math.isclose(after.t_min, before.t_min, rel_tol=0.05)
