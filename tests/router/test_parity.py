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
3. Cache-aware, end to end: a multi-turn conversation trace (shared system prompts, histories
   that grow each turn; ``sim/conversations.py``) through the DES with modelled prefix caches
   (``DesConfig.caches``) and through the router over fake prefill workers that keep the same
   cache model and publish its KV events: per request the same cluster, prefill node, reused
   prefix and computed length, under scarce and abundant bandwidth (cache moves included),
   with evictions. Requests run one at a time (the router's view has no backlog, the DES's
   arrivals are spaced so that every node is idle), as in 1.
4. Cache-aware, replayed: the router spreads a conversation trace over two nodes per pool by
   scripted queue depths; a follow-up turn goes to the node holding its history although another
   is less loaded (cache-affine); the recorded snapshots replay through ``route`` to the same
   decisions, and the simulator's caches fed the router's decisions give every node the prefix
   the router's index gave it.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import replace
from typing import Any

import numpy as np

from trtllm_prfaas.policy import controller as ctl
from trtllm_prfaas.policy.model import Deployment, Workload
from trtllm_prfaas.policy.placement import Cluster
from trtllm_prfaas.policy.route import PolicyState, route
from trtllm_prfaas.policy.workload import TruncatedLogNormal
from trtllm_prfaas.router.api import GenerateRequest
from trtllm_prfaas.router.control import ControlConfig, RouteRecord, TickRecord
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.sim.caches import CacheModel, SimPrefixCaches
from trtllm_prfaas.sim.conversations import ConversationModel, Conversations, make_conversations
from trtllm_prfaas.sim.des import DesConfig, ThresholdMode, simulate
from trtllm_prfaas.sim.fluid import case_study_system
from trtllm_prfaas.sim.link import LinkSchedule
from trtllm_prfaas.sim.traffic import PoissonArrivals, Trace, make_trace
from trtllm_prfaas.worker.fake import FAKE_CACHE_KEY, FakeWorkerPool, FakeWorkerSpec

THRESHOLD = 400
# The real controller with its timers shrunk to the test's time scale (ticks ~0.1 s apart).
FAST = ctl.ControllerConfig(min_raise_interval_s=0.0, min_lower_interval_s=0.0, settle_s=0.2)
LENGTHS = TruncatedLogNormal(mu=math.log(400), sigma=1.0, lo=16, hi=4000)


def _trace(num_requests: int, seed: int) -> Trace:
    return make_trace(PoissonArrivals(20.0), LENGTHS, num_requests, seed)


def _specs(
    num_prfaas: int, num_p: int, num_d: int, cache_blocks: int | None = None
) -> list[FakeWorkerSpec]:
    """``cache_blocks``: prefill workers keep a prefix cache of that many blocks and report it."""
    cache = {} if cache_blocks is None else {"prefix_cache": "events",
                                              "max_cached_blocks": cache_blocks}  # fmt: skip
    return (
        [FakeWorkerSpec(f"prfaas-{k}", "prefill", "dc-remote", **cache)  # type: ignore[arg-type]
         for k in range(num_prfaas)]
        + [FakeWorkerSpec(f"pd-p-{k}", "prefill", **cache)  # type: ignore[arg-type]
           for k in range(num_p)]
        + [FakeWorkerSpec(f"decode-{k}", "decode") for k in range(num_d)]
    )  # fmt: skip


def _router(pool: FakeWorkerPool, control: ControlConfig | None) -> DisaggregatedOrchestrator:
    specs = tuple(
        WorkerSpec(name, w.endpoint, name.startswith("prfaas")) for name, w in pool.workers.items()
    )
    config = RouterConfig(specs, threshold_tokens=THRESHOLD, control=control)
    return DisaggregatedOrchestrator(config)


async def _send(
    orch: DisaggregatedOrchestrator, rid: str, num_tokens: int, prompt: list[int] | None = None
) -> None:
    prompt = prompt or [(i * 37 + num_tokens) % 256 for i in range(num_tokens)]
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


# ---------------------------------------------------------------------------- cache-aware
CACHE_BLOCKS = 48  # 768 tokens a node: histories outgrow it, so evictions are part of the trace
CONVERSATIONS = ConversationModel(
    8, 2.0, num_turns=3, num_system_prompts=2, system_prompt_tokens=256, user_tokens=120,
    output_tokens=40, think_s=1.0,
)  # fmt: skip


def _conversations(seed: int) -> Conversations:
    return make_conversations(CONVERSATIONS, seed)


def _key(cluster: Cluster, node: str, prefix: int, computed: int) -> tuple[str, str, int, int]:
    return (cluster.value, node, prefix, computed)


def _sim_decisions(conv: Conversations, policy: ctl.CachePolicy) -> tuple[list[Any], int]:
    trace = conv.trace(16, FAKE_CACHE_KEY)
    trace = replace(trace, arrival_s=np.arange(trace.num_requests) * 100.0)  # one at a time
    system = case_study_system()
    caches = CacheModel(CACHE_BLOCKS, 16, is_hybrid=True)  # the fake workers' model
    config = DesConfig(
        system, Workload(LENGTHS, 2), Deployment(2, 2, 1), LinkSchedule.constant(100.0),
        float(THRESHOLD), mode=ThresholdMode.STATIC, caches=caches, cache_policy=policy,
    )  # fmt: skip
    sim = simulate(config, trace)
    clusters = [Cluster.PRFAAS if r else Cluster.PD for r in sim.is_remote.tolist()]
    rows = zip(clusters, sim.prefill_node_ids, sim.prefix_tokens.tolist(),
               sim.computed_tokens.tolist(), strict=True)  # fmt: skip
    return [_key(*row) for row in rows], sim.num_cache_moves


async def _live_decisions(conv: Conversations, policy: ctl.CachePolicy) -> list[Any]:
    async with FakeWorkerPool(_specs(2, 2, 1, cache_blocks=CACHE_BLOCKS)) as pool:
        orch = _router(pool, control=None)
        await orch.start()
        orch.control.policy = PolicyState(float(THRESHOLD), policy)
        try:
            for i, prompt in enumerate(conv.prompts):
                await _send(orch, str(i), len(prompt), prompt.tolist())
            return list(orch.decisions)
        finally:
            await orch.close()


def test_cache_aware_des_and_router_make_the_same_decisions() -> None:
    conv = _conversations(seed=5)
    for policy in (ctl.CachePolicy.SCARCE, ctl.CachePolicy.ABUNDANT):
        sim, num_moves = _sim_decisions(conv, policy)
        live = asyncio.run(_live_decisions(conv, policy))
        got = [_key(d.cluster, d.prefill_node_id, d.prefix_tokens, d.incremental_tokens)
               for d in live]  # fmt: skip
        assert got == sim, policy
        assert num_moves == sum(d.cache_move is not None for d in live)
        assert {d.cluster for d in live} == {Cluster.PRFAAS, Cluster.PD}
        assert sum(d.prefix_tokens > 0 for d in live) >= len(live) // 3
        if policy is ctl.CachePolicy.ABUNDANT:
            assert num_moves > 0


async def _record_cache_aware(conv: Conversations) -> list[RouteRecord]:
    """The conversation trace through the router, four requests at a time, the prefill
    workers' queue depths scripted anew before each batch (so prefix-less requests spread)."""
    rng = random.Random(3)
    async with FakeWorkerPool(_specs(2, 2, 2, cache_blocks=CACHE_BLOCKS)) as pool:
        orch = _router(pool, control=None)
        await orch.start()
        try:
            for start in range(0, len(conv.prompts), 4):
                for name, worker in pool.workers.items():
                    if not name.startswith("decode"):
                        await worker.report(queue_depth=rng.randint(0, 3))
                await asyncio.sleep(0.05)
                for i in range(start, min(start + 4, len(conv.prompts))):
                    prompt = conv.prompts[i].tolist()
                    await _send(orch, str(i), len(prompt), prompt)
            # each "events" worker's snapshot (its answer to the join's ping, read before the
            # join) was kept for the join, and its events continued it without a gap
            stats = orch.cluster.prefix.stats()
            with_cache = [w for w in pool.workers.values() if w.cache is not None]
            assert stats is not None and stats.num_resyncs == 0
            assert stats.num_snapshots == len(with_cache) >= 2
            return list(orch.route_log)
        finally:
            await orch.close()


def test_cache_aware_decisions_replay_and_the_sim_caches_see_the_same_prefixes() -> None:
    conv = _conversations(seed=8)
    records = asyncio.run(_record_cache_aware(conv))
    assert [r.request.request_id for r in records] == [str(i) for i in range(len(conv.prompts))]
    replayed = [route(r.request, r.cluster, r.policy, r.now_s) for r in records]
    assert replayed == [r.decision for r in records]
    hashes = conv.trace(16, FAKE_CACHE_KEY).prompt_hashes
    assert hashes is not None
    caches = SimPrefixCaches(CacheModel(CACHE_BLOCKS, 16, is_hybrid=True))
    for name in ("prfaas-0", "prfaas-1"):
        caches.add_node(name, "prfaas")
    for name in ("pd-p-0", "pd-p-1"):
        caches.add_node(name, "pd")
    affine = 0
    for i, rec in enumerate(records):
        pools = (rec.cluster.prfaas, rec.cluster.pd_prefill)
        for node in (n for nodes in pools for n in nodes):
            assert caches.prefix_tokens(node.node_id, hashes[i], 0.0) == node.prefix_tokens, i
        d = rec.decision
        chosen_pool = pools[0] if d.is_remote else pools[1]
        chosen = next(n for n in chosen_pool if n.node_id == d.prefill_node_id)
        others = [n for n in chosen_pool if n is not chosen]
        affine += chosen.prefix_tokens > 0 and any(
            (n.queue_depth, n.node_id) < (chosen.queue_depth, chosen.node_id) for n in others
        )  # the cache held it although load (and the tie-break) said another node
        caches.prefill_done(d.prefill_node_id, hashes[i])  # the leg finished before the next
    assert affine >= 2  # (4 with this seed)
    used = {r.decision.prefill_node_id for r in records}
    assert used == {"prfaas-0", "prfaas-1", "pd-p-0", "pd-p-1"}, used
