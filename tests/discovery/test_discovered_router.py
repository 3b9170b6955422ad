"""The router follows worker membership in a real etcd, over real ``prfaas worker`` processes.

An in-process orchestrator (no static list: it starts with zero workers and answers
UNAVAILABLE) with ``DiscoveredWorkers`` on a real etcd; workers started with ``--discovery``
register under a 2 s lease. Measured here: registration (the put, as a separate watch sees it) to
routable (in the orchestrator's cluster) <= 1 s; a decode worker SIGKILLed mid-stream fails its
request with ``WorkerLost`` (UNAVAILABLE) within ``worker_lost_s`` + 1 and is out of the cluster
within its TTL + 1 s, a replacement that registers joins and serves single-engine tokens, and
the killed worker restarted under its name rejoins and serves;
SIGTERM deregisters at once (well before a 10 s lease); a malformed registration put by the test
is ignored with a ``discovery_bad_record`` log line and counted.

Every process started here is stopped by PID (SIGTERM, then SIGKILL) even when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from tests.discovery.test_membership import Recorder
from tests.etcd_server import EtcdServer
from tests.harness import WorkerProcess, spawn_worker
from tests.router.test_disaggregated import _prompt, _reference, _request, _tokens
from trtllm_prfaas.discovery import EventKind, open_membership, parse_discovery, worker_prefix
from trtllm_prfaas.errors import AdmissionRejected, WorkerLost
from trtllm_prfaas.router.discovered import DiscoveredWorkers
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig
from trtllm_prfaas.telemetry.metrics import DiscoveryMetrics

COMMON = ["--model-preset", "tiny", "--plaintext", "--num-blocks", "512", "--chunk-size", "64"]
THRESHOLD = 100  # prompts longer than this prefill in the PrfaaS cluster
TTL_S = 2.0
NS = "discovery-test"


def discovery_flags(etcd: EtcdServer, ttl_s: float = TTL_S) -> list[str]:
    return ["--discovery", etcd.url, "--namespace", NS, "--lease-ttl-s", f"{ttl_s:g}"]


@pytest.fixture
def procs() -> Iterator[dict[str, WorkerProcess]]:
    started: dict[str, WorkerProcess] = {}
    try:
        yield started
    finally:
        for proc in started.values():
            proc.stop()


async def spawn(
    procs: dict[str, WorkerProcess], etcd: EtcdServer, name: str, role: str, cluster: str,
    ttl_s: float = TTL_S,
) -> WorkerProcess:  # fmt: skip
    """A registering worker, started off the loop (the orchestrator keeps serving meanwhile)."""
    flags = [*COMMON, *discovery_flags(etcd, ttl_s), "--worker-id", name]
    proc = await asyncio.to_thread(spawn_worker, role, cluster, *flags)
    procs[name] = proc
    assert proc.ready["registered"] is True, proc.ready
    assert proc.ready["key"] == f"/{NS}/workers/{cluster}/{name}"
    return proc


@contextlib.asynccontextmanager
async def discovering_router(
    etcd: EtcdServer,
) -> AsyncIterator[tuple[DisaggregatedOrchestrator, DiscoveryMetrics]]:
    orch = DisaggregatedOrchestrator(RouterConfig((), threshold_tokens=THRESHOLD, control=None))
    metrics = DiscoveryMetrics(CollectorRegistry())
    membership = open_membership(parse_discovery(etcd.url), call_timeout_s=1.0)
    discovered = DiscoveredWorkers(orch, membership, NS, metrics)
    await orch.start()
    await discovered.start(wait_s=5.0)
    try:
        yield orch, metrics
    finally:
        await discovered.close()
        membership.close()
        await orch.close()


class Appearances:
    """When each worker entered and left the orchestrator's cluster (polled every 5 ms)."""

    def __init__(self, orch: DisaggregatedOrchestrator) -> None:
        self.orch = orch
        self.joined: dict[str, float] = {}
        self.left: dict[str, float] = {}
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        known: set[str] = set()
        while True:
            now, names = time.monotonic(), set(self.orch.cluster.workers)
            self.joined |= {n: now for n in names - known}
            self.left |= {n: now for n in known - names}
            known = names
            await asyncio.sleep(0.005)

    async def until(
        self, table: dict[str, float], name: str, timeout_s: float, after: float = 0.0
    ) -> float:
        """When ``name`` last entered ``table`` (joined or left), once that is after ``after``."""
        deadline = time.monotonic() + timeout_s
        while table.get(name, -1.0) <= after:
            assert time.monotonic() < deadline, f"{name} not within {timeout_s}s"
            await asyncio.sleep(0.01)
        return table[name]

    def close(self) -> None:
        self._task.cancel()


def put_time(seen: Recorder, kind: EventKind, name: str) -> float:
    """When the test's own watch saw ``kind`` for worker ``name`` (the recorder stamps them)."""
    return next(at for at, e in seen.stamped if e.kind is kind and e.key.endswith("/" + name))


class StampedRecorder(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.stamped: list[tuple[float, Any]] = []

    def on_event(self, event: Any) -> None:
        self.stamped.append((time.monotonic(), event))
        super().on_event(event)


def test_workers_join_serve_die_and_are_replaced(etcd: EtcdServer, procs: Any) -> None:
    seen = StampedRecorder()
    watcher = open_membership(parse_discovery(etcd.url))
    watcher.watch_prefix(worker_prefix(NS), seen.on_event, seen.on_connected)

    async def scenario() -> dict[str, float]:
        figures: dict[str, float] = {}
        async with discovering_router(etcd) as (orch, metrics):
            assert not orch.is_ready() and metrics.connected._value.get() == 1
            with pytest.raises(AdmissionRejected, match="no worker has joined"):
                await _tokens(orch, _request("early", _prompt(40)))
            seen_at = Appearances(orch)
            for name, role, cluster in [("decode-a", "decode", "dc-local"),
                                        ("pd-prefill", "prefill", "dc-local"),
                                        ("prfaas", "prefill", "dc-remote")]:  # fmt: skip
                await spawn(procs, etcd, name, role, cluster)
                joined_at = await seen_at.until(seen_at.joined, name, timeout_s=5.0)
                figures[f"join_to_routable_s[{name}]"] = joined_at - put_time(
                    seen, EventKind.PUT, name
                )
            assert orch.cluster.workers["prfaas"].is_prfaas
            for n in (40, 600):  # local, remote (relayed KV)
                assert await _tokens(orch, _request(f"r{n}", _prompt(n))) == _reference(_prompt(n))
            assert orch.counters["remote"] == 1 and orch.counters["local"] == 1

            # SIGKILL mid-stream: the request fails UNAVAILABLE (WorkerLost) as the connection
            # dies; the worker is out of the cluster once its lease expired.
            stream = orch.generate(_request("mid-stream", _prompt(40), max_tokens=400))
            await anext(stream)
            procs["decode-a"].process.kill()
            killed_at = time.monotonic()
            with pytest.raises(WorkerLost):
                async for _ in stream:
                    pass
            figures["death_to_client_error_s"] = time.monotonic() - killed_at
            left_at = await seen_at.until(seen_at.left, "decode-a", timeout_s=TTL_S + 3.0)
            figures["death_to_unroutable_s"] = left_at - killed_at
            with pytest.raises(AdmissionRejected, match="no decode node"):
                await _tokens(orch, _request("orphan", _prompt(40)))
            await spawn(procs, etcd, "decode-b", "decode", "dc-local")
            await seen_at.until(seen_at.joined, "decode-b", timeout_s=5.0)
            for n in (40, 600):
                assert await _tokens(orch, _request(f"b{n}", _prompt(n))) == _reference(_prompt(n))
            assert metrics.workers._value.get() == 3
            # The killed worker restarted under its name (a new process, a new port) rejoins.
            procs["decode-a (killed)"] = procs.pop("decode-a")
            restarted = await spawn(procs, etcd, "decode-a", "decode", "dc-local")
            await seen_at.until(seen_at.joined, "decode-a", timeout_s=5.0, after=left_at)
            assert orch.cluster.workers["decode-a"].endpoint == restarted.control
            procs["decode-b"].process.kill()  # the restarted one must serve alone
            await seen_at.until(seen_at.left, "decode-b", timeout_s=TTL_S + 3.0)
            assert await _tokens(orch, _request("again", _prompt(600))) == _reference(_prompt(600))
            seen_at.close()
        return figures

    try:
        figures = asyncio.run(scenario())
    finally:
        watcher.close()
    print(figures)
    assert all(v <= 1.0 for k, v in figures.items() if k.startswith("join")), figures
    assert figures["death_to_unroutable_s"] <= TTL_S + 1.0, figures
    assert figures["death_to_client_error_s"] <= 3.0 + 1.0, figures  # worker_lost_s + 1


def test_sigterm_deregisters_and_a_malformed_record_is_ignored(
    etcd: EtcdServer, procs: Any
) -> None:
    async def scenario() -> float:
        async with discovering_router(etcd) as (orch, metrics):
            seen_at = Appearances(orch)
            with structlog.testing.capture_logs() as logs:
                bogus = f"/{NS}/workers/dc-local/bogus"
                await asyncio.to_thread(etcd_put, etcd, bogus, b'{"n": 7}')
                await _until(lambda: metrics.bad_records._value.get() == 1, 5.0)
            bad = [e for e in logs if e["event"] == "discovery_bad_record"]
            assert bad and bad[0]["key"] == f"/{NS}/workers/dc-local/bogus", logs
            assert "not a WorkerRecord" in bad[0]["error"]
            assert "bogus" not in orch.cluster.workers
            # A 10 s lease: a deregistration seen in well under that is the SIGTERM's doing.
            proc = await spawn(procs, etcd, "decode-t", "decode", "dc-local", ttl_s=10.0)
            await seen_at.until(seen_at.joined, "decode-t", timeout_s=5.0)
            assert orch.is_ready()
            started = time.monotonic()
            assert await asyncio.to_thread(proc.stop) == 0
            left_at = await seen_at.until(seen_at.left, "decode-t", timeout_s=5.0)
            remaining = await asyncio.to_thread(etcd_keys, etcd, f"/{NS}/")
            assert list(remaining) == [f"/{NS}/workers/dc-local/bogus"], remaining
            assert not orch.is_ready()
            seen_at.close()
            return left_at - started

    sigterm_to_unroutable_s = asyncio.run(scenario())
    print({"sigterm_to_unroutable_s": sigterm_to_unroutable_s})
    assert sigterm_to_unroutable_s < 5.0  # the process's own exit included; the lease is 10 s


def etcd_put(etcd: EtcdServer, key: str, value: bytes) -> None:
    """Put ``key`` directly, as a broken or hostile registrant would."""
    store = open_membership(parse_discovery(etcd.url))
    try:
        client = store.new_client()  # type: ignore[attr-defined]
        client.put(key, value)
        client.close()
    finally:
        store.close()


def etcd_keys(etcd: EtcdServer, prefix: str) -> list[str]:
    with open_membership(parse_discovery(etcd.url)) as store:
        return sorted(store.list_prefix(prefix))


async def _until(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s}s"
        await asyncio.sleep(0.01)
