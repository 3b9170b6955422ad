"""The control loop step by step on a hand-built cluster (no sockets): it holds ``t`` while warming
up, raises it under relay pressure (x1.25 per period, up to the PD-P ceiling), exports gauges, and
drives a rebalancer drain then conversion through the converter; the latency fit finds a line."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from prometheus_client import CollectorRegistry

from trtllm_prfaas.policy.placement import Cluster
from trtllm_prfaas.policy.rebalancer import RebalancerConfig
from trtllm_prfaas.policy.route import RouteDecision
from trtllm_prfaas.router.cluster import ClusterState, WorkerState
from trtllm_prfaas.router.control import ControlConfig, ControlLoop
from trtllm_prfaas.router.online import LatencyFit
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.worker import protocol as p


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _cluster(clock: Clock, num_p: int = 1, num_d: int = 1) -> ClusterState:
    cluster = ClusterState()
    roles = [("prfaas", "prefill", True)] + [(f"pd-p-{k}", "prefill", False) for k in range(num_p)]
    roles += [(f"decode-{k}", "decode", False) for k in range(num_d)]
    for name, role, remote in roles:
        info = p.WorkerInfo(name, role, "c", "m", 8192, 16, 512, 16, "", 1024, 4096)
        cluster.add(WorkerState(name, "tcp://x", info, remote, reported_at=clock.now))
    return cluster


def _decision(remote: bool) -> RouteDecision:
    cluster = Cluster.PRFAAS if remote else Cluster.PD
    return RouteDecision("r", cluster, "n", "decode-0", 10, 0, None, 100.0, 0.0)


def _feed(loop: ControlLoop, num: int) -> None:
    for k in range(num):
        remote = k % 2 == 0
        loop.on_routed(_decision(remote), 200 + 50 * k, 8)
        loop.on_prefill(remote, 200 + 50 * k, 0.01 + 1e-4 * k)
        loop.on_decode(7, 0.07)


def test_warm_up_holds_then_relay_pressure_raises_t() -> None:
    clock, registry = Clock(), CollectorRegistry()
    loop = ControlLoop(ControlConfig(rebalancer=None), _cluster(clock), 1000.0,
                       RouterMetrics(registry), clock=clock)  # fmt: skip
    clock.now += 1
    assert loop.tick(clock.now).reason == "warm-up"
    _feed(loop, 40)
    seen = []
    for _ in range(4):
        clock.now += 1
        for w in loop.cluster.workers.values():
            w.reported_at = clock.now
        loop.on_relay_wait(2.0)  # KV waits 2 s behind the link: past the 0.5 s high mark
        seen.append(loop.tick(clock.now).state.threshold_tokens)
    assert all(b > a for a, b in itertools.pairwise(seen)), seen
    assert loop.policy.threshold_tokens == seen[-1]
    assert registry.get_sample_value("prfaas_threshold_tokens") == seen[-1]
    assert registry.get_sample_value("prfaas_offload_share") is not None


def test_relay_backlog_over_the_live_link_is_the_prospective_relay_delay() -> None:
    """KV queued in the PrfaaS relay now, over the live link estimate, is the relay delay the
    controller acts on (the simulator's ``link_free_s - now``), before any transfer behind the
    slow link finishes and is measured; without a backlog ``t`` goes no higher than ``t_opt``."""
    clock = Clock()
    config = ControlConfig(rebalancer=None, link_gbps=1.0)
    loop = ControlLoop(config, _cluster(clock), 1000.0, clock=clock)
    _feed(loop, 40)
    records = []
    for backlog in (0, 0, 250_000_000, 250_000_000, 0):  # 250 MB at 1 Gbps: 2 s of link
        clock.now += 1
        report = p.LoadReport("prfaas", 0, 1, 0, 100, 0, relay_bytes_backlog=backlog)
        loop.cluster.on_report("prfaas", report)
        for w in loop.cluster.workers.values():
            w.reported_at = clock.now
        records.append(loop.tick(clock.now))
    delays = [r.signals.relay_queue_delay_s for r in records]
    assert delays == [0.0, 0.0, pytest.approx(2.0), pytest.approx(2.0), 0.0]
    t = [r.state.threshold_tokens for r in records]
    why = (t, [r.reason for r in records])
    assert t[1] == pytest.approx(records[1].t_opt), why  # no backlog: up to the anchor only
    assert t[3] > t[2] > records[2].t_opt, why  # the backlog raises t past it


def test_rebalancer_drains_then_converts_through_the_converter() -> None:
    clock = Clock()
    converted: list[tuple[str, str]] = []

    async def converter(name: str, role: str) -> None:
        converted.append((name, role))

    async def scenario() -> None:
        config = ControlConfig(rebalancer=RebalancerConfig(period_s=1.0, persist_s=0.0,
                                                           cooldown_s=0.0))  # fmt: skip
        loop = ControlLoop(config, _cluster(clock, 1, 2), 1000.0, converter=converter, clock=clock)
        for _ in range(3):
            clock.now += 1
            for w in loop.cluster.workers.values():
                w.reported_at = clock.now
            loop.on_prefill(False, 1000, 1.0)  # PD-P busy the whole period, decode idle
            loop.tick(clock.now)
            await asyncio.sleep(0)
        await loop.stop()
        assert converted and converted[0][1] == "prefill"
        assert converted[0][0].startswith("decode-")

    asyncio.run(scenario())


def test_latency_fit_recovers_a_line() -> None:
    fit = LatencyFit(alpha=0.05)
    for k in range(200):
        tokens = 100 + (k * 37) % 900
        fit.add(tokens, 0.02 + 3e-4 * tokens)
    c0, c1 = fit.coefficients() or (0.0, 0.0)
    assert abs(c0 - 0.02) < 1e-6 and abs(c1 - 3e-4) < 1e-9
