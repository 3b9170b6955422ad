"""Parity: one recorded trace makes the same routing decisions in the simulator and the live
router.

The live side is the real ``DisaggregatedOrchestrator`` (ZeroMQ sockets, ``generate``, its
``_route`` and control loop) over an in-process fake worker pool; the recorded trace is the
sim's own ``Trace`` (arrival times, prompt lengths) plus what the router saw (its ``route_log``
of cluster snapshots and its control ticks' signals).

1. Static ``t``: the discrete-event simulator (``sim.des.simulate``) and the router, given the
   same trace and deployment (one PrfaaS, one PD-P node), offload exactly the same requests.
2. Live ``t``: the router's control loop moves ``t`` from scripted worker loads; replaying the
   recorded snapshots and tick signals through the calls the simulator makes
   (``controller.step`` then ``PolicyState.from_controller`` per tick, as ``_Sim._control``;
   ``route(RequestView, ClusterView, policy, now)`` per request, as ``_Sim._arrive``), in time
   order, gives the same decision for every request: cluster, prefill node, decode node, ``t``.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any

import numpy as np

from trtllm_prfaas.policy import controller as ctl
from trtllm_prfaas.policy.model import Deployment, Workload
from trtllm_prfaas.policy.route import PolicyState, route
from trtllm_prfaas.policy.workload import TruncatedLogNormal
from trtllm_prfaas.router.api import GenerateRequest
from trtllm_prfaas.router.control import ControlConfig, RouteRecord, TickRecord
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.sim.des import DesConfig, ThresholdMode, simulate
from trtllm_prfaas.sim.fluid import case_study_system
from trtllm_prfaas.sim.link import LinkSchedule
from trtllm_prfaas.sim.traffic import PoissonArrivals, Trace, make_trace
from trtllm_prfaas.worker.fake import FakeWorkerPool, FakeWorkerSpec

THRESHOLD = 400
# The real controller with its timers shrunk to the test's time scale (ticks ~0.1 s apart).
FAST = ctl.ControllerConfig(min_raise_interval_s=0.0, min_lower_interval_s=0.0, settle_s=0.2)
LENGTHS = TruncatedLogNormal(mu=math.log(400), sigma=1.0, lo=16, hi=4000)


def _trace(num_requests: int, seed: int) -> Trace:
    return make_trace(PoissonArrivals(20.0), LENGTHS, num_requests, seed)


def _specs(num_prfaas: int, num_p: int, num_d: int) -> list[FakeWorkerSpec]:
    return (
        [FakeWorkerSpec(f"prfaas-{k}", "prefill", "dc-remote") for k in range(num_prfaas)]
        + [FakeWorkerSpec(f"pd-p-{k}", "prefill") for k in range(num_p)]
        + [FakeWorkerSpec(f"decode-{k}", "decode") for k in range(num_d)]
    )


def _router(pool: FakeWorkerPool, control: ControlConfig | None) -> DisaggregatedOrchestrator:
    specs = tuple(
        WorkerSpec(name, w.endpoint, name.startswith("prfaas")) for name, w in pool.workers.items()
    )
    config = RouterConfig(specs, threshold_tokens=THRESHOLD, control=control)
    return DisaggregatedOrchestrator(config)


async def _send(orch: DisaggregatedOrchestrator, rid: str, num_tokens: int) -> None:
    prompt = [(i * 37 + num_tokens) % 256 for i in range(num_tokens)]
    request = GenerateRequest(rid, prompt, 2, 0.0, 0, True, 10.0)
    async for _chunk in orch.generate(request):
        pass


def test_static_threshold_des_and_router_offload_the_same_requests() -> None:
    trace = _trace(200, seed=3)
    system = case_study_system()
    workload = Workload(LENGTHS, 2)
    config = DesConfig(
        system, workload, Deployment(1, 1, 1), LinkSchedule.constant(100.0), float(THRESHOLD),
        mode=ThresholdMode.STATIC,
    )  # fmt: skip
    sim = simulate(config, trace)

    async def live() -> list[bool]:
        async with FakeWorkerPool(_specs(1, 1, 1)) as pool:
            orch = _router(pool, control=None)
            await orch.start()
            try:
                for i, n in enumerate(trace.prompt_tokens.tolist()):
                    await _send(orch, str(i), n)
                return [d.is_remote for d in orch.decisions]
            finally:
                await orch.close()

    got = asyncio.run(live())
    assert got == sim.is_remote.tolist()
    assert 0 < sum(got) < len(got)  # both routes taken


async def _record_live(trace: Trace) -> tuple[Any, list[RouteRecord], list[TickRecord]]:
    """Batches of the trace through the router, a control tick after each batch, with worker
    loads scripted so the PrfaaS queue swings from idle to past the controller's high mark."""
    rng = random.Random(7)
    control = ControlConfig(3600.0, FAST, rebalancer=None, min_requests=0, min_legs=0)
    async with FakeWorkerPool(_specs(2, 2, 2)) as pool:
        orch = _router(pool, control)
        await orch.start()
        try:
            lengths = trace.prompt_tokens.tolist()
            for batch in range(len(lengths) // 10):
                burst = batch % 8 < 4
                for name, worker in pool.workers.items():
                    high = 3 if name.startswith("prfaas") and burst else 1
                    await worker.report(queue_depth=rng.randint(0, high))
                await asyncio.sleep(0.05)
                for i in range(batch * 10, batch * 10 + 10):
                    await _send(orch, str(i), lengths[i])
                orch.control.tick(orch.control.clock())
            return orch.control.initial_state, list(orch.route_log), list(orch.control.ticks)
        finally:
            await orch.close()


def _replay(
    config: ctl.ControllerConfig,
    initial: ctl.ControllerState,
    routes: list[RouteRecord],
    ticks: list[TickRecord],
) -> list[Any]:
    """The simulator's per-tick and per-request calls, in time order, on the recorded inputs."""
    events = sorted([(r.now_s, 1, r) for r in routes] + [(t.now_s, 0, t) for t in ticks],
                    key=lambda e: (e[0], e[1]))  # fmt: skip
    state, policy, out = initial, PolicyState.from_controller(initial), []
    for now, _kind, rec in events:
        if isinstance(rec, TickRecord):
            state = ctl.step(config, state, rec.signals, rec.t_opt, rec.t_max, now, rec.t_min).state
            policy = PolicyState.from_controller(state)
        else:
            out.append(route(rec.request, rec.cluster, policy, now))
    return out


def test_live_threshold_replays_to_the_same_decisions() -> None:
    trace = _trace(160, seed=11)
    initial, routes, ticks = asyncio.run(_record_live(trace))
    replayed = _replay(FAST, initial, routes, ticks)
    live = [r.decision for r in routes]
    key = [(d.cluster, d.prefill_node_id, d.decode_node_id, d.threshold_tokens) for d in live]
    assert [
        (d.cluster, d.prefill_node_id, d.decode_node_id, d.threshold_tokens) for d in replayed
    ] == key
    thresholds = {d.threshold_tokens for d in live}
    assert len(thresholds) >= 3, thresholds  # the controller did move t
    assert {d.prefill_node_id for d in live} >= {"prfaas-0", "prfaas-1", "pd-p-0", "pd-p-1"}
    assert np.isfinite([t.t_opt for t in ticks]).all()
