"""Leader election over a real etcd: one leader, hand-over on death and resignation, step-down
when etcd is gone, and followers applying what the leader publishes."""

from __future__ import annotations

import asyncio
import select
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry

from tests.etcd_server import EtcdServer
from trtllm_prfaas.discovery.leader import EtcdLeadership, LeaderConfig
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.router.replicas import PublishedPolicy
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.testbed.processes import stop_process

TTL_S = 2  # the smallest TTL etcd keeps as asked: hand-overs stay quick in the tests


def _elector(etcd: EtcdServer, name: str, poll_s: float = 0.5) -> EtcdLeadership:
    config = LeaderConfig(
        endpoints=((etcd.host, etcd.client_port),), namespace="prfaas-test", replica_id=name,
        ttl_s=TTL_S, call_timeout_s=0.5, poll_s=poll_s,
    )  # fmt: skip
    return EtcdLeadership(config, metrics=RouterMetrics(CollectorRegistry()))


async def _until(predicate: Callable[[], bool], timeout_s: float) -> float:
    """Seconds until ``predicate()`` held; fails the test after ``timeout_s``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def _leaders(electors: list[EtcdLeadership]) -> list[str]:
    return [e.replica_id for e in electors if e.is_leader()]


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 60.0))


def test_exactly_one_leader_and_hand_over_when_it_dies(etcd: EtcdServer) -> None:
    async def scenario() -> None:
        electors = [_elector(etcd, f"r{i}") for i in range(3)]
        try:
            for e in electors:
                await e.start()
            await _until(lambda: len(_leaders(electors)) == 1, 5.0)
            for _ in range(20):  # stays exactly one while renewing (several keep-alives)
                assert len(_leaders(electors)) == 1
                await asyncio.sleep(0.1)
            (leader,) = [e for e in electors if e.is_leader()]
            assert leader.metrics is not None and leader.metrics.is_leader._value.get() == 1
            others = [e for e in electors if e is not leader]
            await leader.stop(resign=False)  # as SIGKILL: no keep-alive, no revoke
            handover_s = await _until(lambda: len(_leaders(others)) == 1, TTL_S + 1.0)
            assert handover_s <= TTL_S + 1.0
            (new_leader,) = _leaders(others)
            await _until(lambda: all(o.leader_id == new_leader for o in others), 1.0)
        finally:
            for e in electors:
                await e.stop()

    _run(scenario)


def test_resign_hands_over_at_once(etcd: EtcdServer) -> None:
    async def scenario() -> None:
        a, b = _elector(etcd, "a"), _elector(etcd, "b", poll_s=10.0)  # b: only its watch
        try:
            await a.start()
            await _until(a.is_leader, 5.0)
            await b.start()
            await asyncio.sleep(0.3)
            assert not b.is_leader() and b.leader_id == "a"
            await a.stop()  # SIGTERM: revoke the lease, the key goes at once
            handover_s = await _until(b.is_leader, 1.0)
            assert handover_s < 1.0  # the watch wakes b: no TTL, no poll to wait for
            assert a.metrics is not None
            assert a.metrics.leader_step_downs.labels(reason="resigned")._value.get() == 1
        finally:
            await a.stop()
            await b.stop()

    _run(scenario)


def test_leader_steps_down_when_etcd_is_gone_and_one_leads_again(etcd: EtcdServer) -> None:
    async def scenario() -> None:
        a, b = _elector(etcd, "a"), _elector(etcd, "b")
        try:
            await a.start()
            await _until(a.is_leader, 5.0)
            await b.start()
            await asyncio.sleep(0.2)
            stopped_at = time.monotonic()
            await asyncio.to_thread(etcd.kill)
            await _until(lambda: not a.is_leader(), TTL_S)  # within the TTL of the last renewal
            assert time.monotonic() - stopped_at <= TTL_S
            assert not b.is_leader()  # nobody leads without etcd
            await asyncio.to_thread(etcd.start)
            await _until(lambda: len(_leaders([a, b])) == 1, 3 * TTL_S + 3.0)
            for _ in range(10):
                assert len(_leaders([a, b])) == 1
                await asyncio.sleep(0.1)
        finally:
            await a.stop()
            await b.stop()

    _run(scenario)


def test_followers_apply_what_the_leader_publishes(etcd: EtcdServer) -> None:
    async def scenario() -> None:
        a, b = _elector(etcd, "a"), _elector(etcd, "b")
        try:
            await a.start()
            await _until(a.is_leader, 5.0)
            await b.start()
            policy = PublishedPolicy(
                leader_id="a", sequence=1, threshold_tokens=777.0,
                cache_policy="scarce", draining=("decode-1",),
            )  # fmt: skip
            assert await a.publish(policy)
            await _until(lambda: b.followed() == policy, 2.0)
            assert not await b.publish(replace_threshold(policy, 1.0))  # fenced: not leader
            await asyncio.sleep(0.3)
            assert b.followed() == policy and a.followed() == policy
        finally:
            await a.stop()
            await b.stop()

    _run(scenario)


def replace_threshold(policy: PublishedPolicy, threshold: float) -> PublishedPolicy:
    import msgspec

    return msgspec.structs.replace(policy, threshold_tokens=threshold)


_ELECTOR = """
import asyncio, sys
from trtllm_prfaas.discovery.leader import EtcdLeadership, LeaderConfig
async def main():
    config = LeaderConfig(endpoints=(("127.0.0.1", int(sys.argv[1])),), namespace="prfaas-test",
                          replica_id="child", ttl_s=int(sys.argv[2]), call_timeout_s=0.5)
    elector = EtcdLeadership(config)
    await elector.start()
    while not elector.is_leader():
        await asyncio.sleep(0.02)
    print("LEADER", flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""


def test_a_sigkilled_leader_process_is_replaced_within_the_ttl(etcd: EtcdServer) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _ELECTOR, str(etcd.client_port), str(TTL_S)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 20.0
        while True:  # the child logs too: wait for its marker line
            left_s = deadline - time.monotonic()
            ready, _, _ = select.select([child.stdout], [], [], max(left_s, 0.0))
            assert ready and left_s > 0, "the child elector did not lead within 20 s"
            line = child.stdout.readline()
            assert line, f"the child elector exited {child.poll()}"
            if line.strip() == "LEADER":
                break

        async def scenario() -> None:
            b = _elector(etcd, "b")
            try:
                await b.start()
                await asyncio.sleep(0.5)
                assert not b.is_leader() and b.leader_id == "child"
                child.kill()  # SIGKILL: its lease is left to expire
                await asyncio.to_thread(child.wait, 10.0)
                handover_s = await _until(b.is_leader, TTL_S + 1.0)
                assert handover_s <= TTL_S + 1.0
            finally:
                await b.stop()

        _run(scenario)
    finally:
        stop_process(child, 5.0)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="ttl_s"):
        LeaderConfig(endpoints=(("h", 1),), namespace="n", replica_id="r", ttl_s=1)
    with pytest.raises(ConfigError, match="namespace"):
        LeaderConfig(endpoints=(("h", 1),), namespace="/", replica_id="r")
    with pytest.raises(ConfigError, match="endpoints"):
        LeaderConfig(endpoints=(), namespace="n", replica_id="r")
    config = LeaderConfig(endpoints=(("h", 1),), namespace="/ns/", replica_id="r")
    assert (config.leader_key, config.policy_key) == ("/ns/leader", "/ns/policy")


def test_a_malformed_publication_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="malformed published policy"):
        PublishedPolicy.from_json(b'{"leader_id": "a"}')
