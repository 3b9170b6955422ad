"""``DiscoveredWorkers`` over the in-process store (and once a real etcd) with a recording
orchestrator double: what it asks the orchestrator to do for each membership change (the etcd
and process tests run the same class against the real things).

The double records ``add_worker``/``remove_worker`` calls and can refuse an add (a worker that
does not answer its ``Ping``); it stands in only for the orchestrator's membership methods.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from tests.etcd_server import EtcdServer
from trtllm_prfaas.discovery import (
    StaticMembership,
    WorkerRecord,
    encode_record,
    open_membership,
    parse_discovery,
    worker_key,
)
from trtllm_prfaas.errors import TransportError
from trtllm_prfaas.router.discovered import DiscoveredWorkers
from trtllm_prfaas.router.orchestrator import WorkerSpec
from trtllm_prfaas.telemetry.metrics import DiscoveryMetrics

NS = "ns"


@dataclass
class _Cluster:
    workers: dict[str, Any] = field(default_factory=dict)


@dataclass
class RecordingOrchestrator:
    cluster: _Cluster = field(default_factory=_Cluster)
    calls: list[tuple[str, str, str]] = field(default_factory=list)
    num_refusals: int = 0  # the next adds that fail as a silent worker would

    async def add_worker(self, spec: WorkerSpec) -> Any:
        if self.num_refusals:
            self.num_refusals -= 1
            raise TransportError(f"worker {spec.name} at {spec.endpoint} did not answer")
        self.calls.append(("add", spec.name, spec.endpoint))
        self.cluster.workers[spec.name] = spec
        return type("Info", (), {"role": "decode"})()

    async def remove_worker(self, name: str, why: str) -> bool:
        self.calls.append(("remove", name, why))
        return self.cluster.workers.pop(name, None) is not None


def record(name: str, port: int, cluster: str = "dc-local") -> bytes:
    return encode_record(WorkerRecord(name=name, cluster=cluster, role="decode", is_prfaas=False,
                                      control_endpoint=f"tcp://127.0.0.1:{port}"))  # fmt: skip


async def settle(discovered: DiscoveredWorkers) -> None:
    """Let the loop deliver the store's events and finish every reconcile task."""
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not discovered._tasks:
            return
    raise AssertionError(f"reconcile tasks still running: {list(discovered._tasks)}")


def test_membership_changes_become_adds_and_removes() -> None:
    async def scenario() -> tuple[RecordingOrchestrator, DiscoveryMetrics, list[Any]]:
        store, orch = StaticMembership(), RecordingOrchestrator()
        orch.cluster.workers["static-0"] = "a --worker"
        metrics = DiscoveryMetrics(CollectorRegistry())
        discovered = DiscoveredWorkers(orch, store, NS, metrics, retry_s=0.05)  # type: ignore[arg-type]
        existing = store.register(worker_key(NS, "dc-local", "a"), record("a", 7001), ttl_s=5)
        await discovered.start(wait_s=2.0)  # the listing: "a" joins before start returns
        assert orch.calls == [("add", "a", "tcp://127.0.0.1:7001")]
        assert metrics.connected._value.get() == 1 and metrics.workers._value.get() == 1
        with structlog.testing.capture_logs() as logs:
            orch.num_refusals = 2  # b is silent twice, then answers: retried every retry_s
            b = store.register(worker_key(NS, "dc-local", "b"), record("b", 7002), ttl_s=5)
            existing.update(record("a", 7101))  # a restarted elsewhere: out, then in again
            store.register(worker_key(NS, "x", "static-0"), record("static-0", 7003, "x"), 5)
            store.register(worker_key(NS, "dc-local", "junk"), b"[1, 2]", ttl_s=5)
            await asyncio.sleep(0.3)
            await settle(discovered)
            b.close()  # deregistered
            await settle(discovered)
        await discovered.close()
        return orch, metrics, logs

    orch, metrics, logs = asyncio.run(scenario())

    def calls_for(name: str) -> list[tuple[str, str, str]]:  # per worker: tasks interleave
        return [call for call in orch.calls[1:] if call[1] == name]

    assert calls_for("a") == [
        ("remove", "a", "registered again elsewhere"),
        ("add", "a", "tcp://127.0.0.1:7101"),
    ]
    assert calls_for("b") == [("add", "b", "tcp://127.0.0.1:7002"), ("remove", "b", "deregistered")]
    assert {call[1] for call in orch.calls} == {"a", "b"}
    assert orch.cluster.workers["static-0"] == "a --worker"  # a record may not take its name
    bad = {e["key"]: e["error"] for e in logs if e["event"] == "discovery_bad_record"}
    assert set(bad) == {"/ns/workers/x/static-0", "/ns/workers/dc-local/junk"}
    assert bad["/ns/workers/x/static-0"] == "name static-0 is taken by a --worker"
    assert "not a WorkerRecord" in bad["/ns/workers/dc-local/junk"]
    assert metrics.bad_records._value.get() == 2
    unreachable = [e for e in logs if e["event"] == "discovered_worker_unreachable"]
    assert len(unreachable) == 2 and metrics.workers._value.get() == 1


def test_a_router_started_before_etcd_catches_up_when_it_comes(etcd: EtcdServer) -> None:
    """etcd down when the router starts: start returns after its wait (logged), the gauge says
    0; once etcd is up the watch connects and the workers registered there join."""

    async def scenario() -> tuple[RecordingOrchestrator, list[Any], float]:
        orch, metrics = RecordingOrchestrator(), DiscoveryMetrics(CollectorRegistry())
        etcd.stop()
        store = open_membership(parse_discovery(etcd.url), call_timeout_s=0.5)
        discovered = DiscoveredWorkers(orch, store, NS, metrics)  # type: ignore[arg-type]
        try:
            with structlog.testing.capture_logs() as logs:
                await discovered.start(wait_s=1.0)
            assert metrics.connected._value.get() == 0 and orch.calls == []
            await asyncio.to_thread(etcd.start)
            with open_membership(parse_discovery(etcd.url)) as other:
                key = worker_key(NS, "dc-local", "a")
                with other.register(key, record("a", 7001), ttl_s=5):
                    # the listing's PUT can reach the orchestrator before the watch thread
                    # reports itself connected (it adds its watch in between): wait for both
                    started = asyncio.get_running_loop().time()
                    while not orch.calls or metrics.connected._value.get() != 1:
                        assert asyncio.get_running_loop().time() - started < 10.0, "never joined"
                        await asyncio.sleep(0.02)
            return orch, logs, metrics.connected._value.get()
        finally:
            await discovered.close()
            store.close()

    orch, logs, connected = asyncio.run(scenario())
    assert orch.calls == [("add", "a", "tcp://127.0.0.1:7001")] and connected == 1
    assert any(e["event"] == "discovery_start_incomplete" for e in logs), logs
