"""Two control loops as two router replicas on one in-process board: only the leader moves ``t``
and drains or converts; it publishes, the follower routes with what it published and stops
sending work to the nodes it drains; a new leader starts from the followed ``t``. The same loops
over the etcd replica: a follower applies the threshold the etcd leader published."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from tests.etcd_server import EtcdServer
from tests.router.test_control import Clock, _cluster, _feed
from trtllm_prfaas.discovery.leader import EtcdLeadership, LeaderConfig
from trtllm_prfaas.policy.rebalancer import RebalancerConfig
from trtllm_prfaas.router.control import ControlConfig, ControlLoop
from trtllm_prfaas.router.replicas import LocalBoard, LocalReplica, SoleReplica
from trtllm_prfaas.telemetry.metrics import RouterMetrics


def _pressure_tick(loop: ControlLoop, clock: Clock) -> None:
    for w in loop.cluster.workers.values():
        w.reported_at = clock.now
    loop.on_relay_wait(2.0)  # past the controller's 0.5 s high mark: a leader raises t
    loop.tick(clock.now)


def test_only_the_leader_moves_t_and_the_follower_applies_its_publication() -> None:
    async def scenario() -> None:
        clock, board = Clock(), LocalBoard("a")
        config = ControlConfig(rebalancer=None)
        a = ControlLoop(config, _cluster(clock), 1000.0, clock=clock,
                        replica=LocalReplica(board, "a"))  # fmt: skip
        registry = CollectorRegistry()
        b = ControlLoop(config, _cluster(clock), 1000.0, RouterMetrics(registry), clock=clock,
                        replica=LocalReplica(board, "b"))  # fmt: skip
        for loop in (a, b):
            _feed(loop, 40)  # both warm: only leadership tells them apart
        for _ in range(3):
            clock.now += 1
            for loop in (a, b):
                _pressure_tick(loop, clock)
            assert await a.publish() and not await b.publish()
        raised = a.policy.threshold_tokens
        assert raised > 1000.0
        assert board.policy is not None and board.policy.threshold_tokens == raised
        clock.now += 1
        b.tick(clock.now)  # the follower picks up the last publication on its tick
        assert b.policy.threshold_tokens == raised and b.ticks[-1].reason == "follow"
        assert registry.get_sample_value("prfaas_threshold_tokens") == raised
        assert not await a.publish()  # nothing changed: nothing published

        board.leader_id = "b"  # a lost its lease: b leads from the t it followed
        clock.now += 1
        _pressure_tick(a, clock)
        _pressure_tick(b, clock)
        assert a.policy.threshold_tokens == raised  # a follows now: it moves nothing
        assert b.policy.threshold_tokens > raised  # b's controller moved on from raised
        assert await b.publish() and board.policy.leader_id == "b"
        clock.now += 1
        _pressure_tick(a, clock)
        assert a.policy.threshold_tokens == b.policy.threshold_tokens

    asyncio.run(scenario())


def test_only_the_leader_drains_and_converts_and_followers_skip_its_drains() -> None:
    converted: list[tuple[str, str]] = []

    async def converter(name: str, role: str) -> None:
        converted.append((name, role))

    async def scenario() -> None:
        clock, board = Clock(), LocalBoard("a")
        config = ControlConfig(rebalancer=RebalancerConfig(period_s=1.0, persist_s=0.0,
                                                           cooldown_s=0.0))  # fmt: skip
        loops = {}
        for name in ("a", "b"):
            loops[name] = ControlLoop(config, _cluster(clock, 1, 2), 1000.0, converter=converter,
                                      clock=clock, replica=LocalReplica(board, name))  # fmt: skip
        for _ in range(3):
            clock.now += 1
            for loop in loops.values():
                for w in loop.cluster.workers.values():
                    w.reported_at = clock.now
                loop.on_prefill(False, 1000, 1.0)  # PD-P busy the whole period, decode idle
                loop.tick(clock.now)
                await loop.publish()
            await asyncio.sleep(0)
        assert converted and all(role == "prefill" for _, role in converted)
        drained = {w.name for w in loops["a"].cluster.workers.values() if w.is_draining}
        assert drained and board.policy is not None and set(board.policy.draining) == drained
        clock.now += 1
        loops["b"].tick(clock.now)
        b_drained = {w.name for w in loops["b"].cluster.workers.values() if w.is_draining}
        assert b_drained == drained  # the follower sends them nothing new either
        assert loops["b"].num_conversions == 0
        for loop in loops.values():
            await loop.stop()

    asyncio.run(scenario())


def test_the_embedded_router_leads_alone_and_publishes_nothing() -> None:
    async def scenario() -> None:
        clock = Clock()
        loop = ControlLoop(ControlConfig(rebalancer=None), _cluster(clock), 1000.0, clock=clock)
        assert isinstance(loop.replica, SoleReplica)
        _feed(loop, 40)
        for _ in range(3):
            clock.now += 1
            _pressure_tick(loop, clock)
        assert loop.policy.threshold_tokens > 1000.0
        assert not await loop.publish()

    asyncio.run(scenario())


def test_a_follower_applies_the_threshold_the_etcd_leader_publishes(etcd: EtcdServer) -> None:
    def elector(name: str) -> EtcdLeadership:
        config = LeaderConfig(endpoints=((etcd.host, etcd.client_port),), namespace="ctl",
                              replica_id=name, ttl_s=2, call_timeout_s=0.5, poll_s=0.2)  # fmt: skip
        return EtcdLeadership(config)

    async def scenario() -> None:
        clock = Clock()
        a, b = elector("a"), elector("b")
        try:
            await a.start()
            for _ in range(250):
                if a.is_leader():
                    break
                await asyncio.sleep(0.02)
            await b.start()
            config = ControlConfig(rebalancer=None)
            leader = ControlLoop(config, _cluster(clock), 1000.0, clock=clock, replica=a)
            follower = ControlLoop(config, _cluster(clock), 1000.0, clock=clock, replica=b)
            _feed(leader, 40)
            for _ in range(2):
                clock.now += 1
                _pressure_tick(leader, clock)
            assert await leader.publish()
            t = leader.policy.threshold_tokens
            for _ in range(100):  # the follower's watch delivers the publication
                clock.now += 1
                follower.tick(clock.now)
                if follower.policy.threshold_tokens == t:
                    break
                await asyncio.sleep(0.05)
            assert follower.policy.threshold_tokens == t > 1000.0
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(asyncio.wait_for(scenario(), 60.0))
