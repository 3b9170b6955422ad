"""Lost workers over the real orchestrator and in-process fake workers (``worker/fake.py``).

A fake worker's ``kill()`` closes its socket as SIGKILL would (the TCP connection closes); the
router's socket monitor sees the drop and marks it lost within ``worker_lost_s``. The lost
worker leaves routing at once; its requests end: prefill lost -> the decode node computes the
request, decode lost -> re-routed if the client has no token yet, else ``WorkerLost``. Slots
come back; a worker restarted at its endpoint rejoins. Process-level SIGKILL tests:
``tests/testbed/test_worker_failures.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import zmq
from prometheus_client import CollectorRegistry

from trtllm_prfaas.errors import AdmissionRejected, WorkerLost
from trtllm_prfaas.router.api import GenerateRequest
from trtllm_prfaas.router.links import heartbeat_options
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.router.servicer import status_for
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.worker.fake import FakeWorkerPool, FakeWorkerSpec, fake_tokens

PROMPT = [(i * 37 + 11) % 256 for i in range(300)]  # above the threshold: remote
LOST_S = 1.0  # worker_lost_s of these tests


def _pool(*extra: FakeWorkerSpec, **decode: Any) -> FakeWorkerPool:
    return FakeWorkerPool(
        [
            FakeWorkerSpec("prfaas", "prefill", "dc-remote", prefill_s_per_token=0.001),
            FakeWorkerSpec("pd-p", "prefill"),
            FakeWorkerSpec("decode", "decode", **decode),
            *extra,
        ]
    )


@contextlib.asynccontextmanager
async def _router(
    pool: FakeWorkerPool, metrics: RouterMetrics | None = None
) -> AsyncIterator[DisaggregatedOrchestrator]:
    specs = tuple(WorkerSpec(n, w.endpoint, n == "prfaas") for n, w in pool.workers.items())
    config = RouterConfig(specs, threshold_tokens=100, control=None, worker_lost_s=LOST_S)
    orch = DisaggregatedOrchestrator(config, metrics)
    await orch.start()
    try:
        yield orch
    finally:
        await orch.close()


def _request(rid: str, max_tokens: int = 6, deadline_s: float = 30.0) -> GenerateRequest:
    return GenerateRequest(rid, PROMPT, max_tokens, 0.0, 0, True, deadline_s)


async def _tokens(orch: DisaggregatedOrchestrator, request: GenerateRequest) -> list[int]:
    return [t async for chunk in orch.generate(request) for t in chunk.token_ids]


async def _kill_after(pool: FakeWorkerPool, name: str, delay_s: float) -> float:
    await asyncio.sleep(delay_s)
    await pool[name].kill()
    return time.monotonic()


def _assert_released(orch: DisaggregatedOrchestrator) -> None:
    """No reservation, no flight left (leak check)."""
    assert all(w.reserved_slots == 0 for w in orch.cluster.workers.values())
    assert orch._links.flights == {}


def test_heartbeat_options_find_a_silent_peer_within_worker_lost_s() -> None:
    options = heartbeat_options(3.0)
    assert options[zmq.HEARTBEAT_IVL] + options[zmq.HEARTBEAT_TIMEOUT] <= 3000
    assert options[zmq.HEARTBEAT_IVL] == 1000 and options[zmq.HEARTBEAT_TTL] == 3000


def test_a_lost_worker_is_unavailable_at_the_front_door() -> None:
    assert status_for(WorkerLost("worker decode lost")) == grpc.StatusCode.UNAVAILABLE


def test_decode_killed_mid_stream_fails_with_worker_lost_and_leaves_routing() -> None:
    async def scenario() -> None:
        metrics = RouterMetrics(CollectorRegistry())
        async with _pool(decode_delay_s=30.0) as pool, _router(pool, metrics) as orch:
            up = lambda w: metrics.registry.get_sample_value("prfaas_worker_up", {"worker": w})  # noqa: E731
            assert up("decode") == 1.0
            # t1 comes at ~0.3 s (300 tokens at 1 ms) plus the decode-slot reservation's round
            # trip: kill well after it, so the client surely holds t1 when the decode dies
            killer = asyncio.create_task(_kill_after(pool, "decode", 1.0))
            chunks = []
            with pytest.raises(WorkerLost, match="decode"):
                async for chunk in orch.generate(_request("orphan")):
                    chunks.append(chunk)  # t1, then nothing until the kill
            killed_at = await killer
            assert time.monotonic() - killed_at < LOST_S + 1.0
            assert [c.token_ids for c in chunks] == [fake_tokens(PROMPT, 1)]
            assert orch.cluster.workers["decode"].is_lost
            assert up("decode") == 0.0 and up("pd-p") == 1.0  # the lost worker shows in metrics
            lost = {"worker": "decode"}
            assert metrics.registry.get_sample_value("prfaas_workers_lost_total", lost) == 1.0
            assert orch.counters["rerouted"] == 0  # the client had t1: no re-route
            _assert_released(orch)
            with pytest.raises(AdmissionRejected, match="no decode node"):
                await _tokens(orch, _request("next"))  # the only decode node is out of routing

    asyncio.run(scenario())


def test_decode_killed_before_the_first_token_is_rerouted() -> None:
    spare = FakeWorkerSpec("decode-2", "decode", max_num_seqs=1)  # less free: second choice

    async def scenario() -> None:
        async with _pool(spare, decode_delay_s=30.0) as pool, _router(pool) as orch:
            slow = FakeWorkerSpec("prfaas", "prefill", "dc-remote", prefill_s_per_token=0.003)
            pool["prfaas"].spec = slow
            killer = asyncio.create_task(_kill_after(pool, "decode", 0.3))  # t1 at 0.9 s
            started = time.monotonic()
            tokens = await _tokens(orch, _request("moved"))
            await killer
            assert tokens == fake_tokens(PROMPT, 6)
            assert orch.counters["rerouted"] == 1
            assert [d.decode_node_id for d in orch.decisions] == ["decode", "decode-2"]
            assert time.monotonic() - started < 0.3 + LOST_S + 1.0 + 0.9
            _assert_released(orch)

    asyncio.run(scenario())


def test_prefill_killed_before_t1_leaves_the_request_to_the_decode_node() -> None:
    async def scenario() -> None:
        async with _pool() as pool, _router(pool) as orch:
            pool["prfaas"].spec = FakeWorkerSpec("prfaas", "prefill", prefill_s_per_token=1.0)
            killer = asyncio.create_task(_kill_after(pool, "prfaas", 0.3))  # t1 would be 300 s
            tokens = await _tokens(orch, _request("fallback"))
            killed_at = await killer
            assert time.monotonic() - killed_at < LOST_S + 1.0
            assert tokens == fake_tokens(PROMPT, 6)
            assert orch.counters["prefill_fallback"] == 1
            assert orch.decisions[-1].is_remote
            (leg,) = pool["decode"].submits
            assert leg.transfer_uuid is None and leg.prompt_token_ids == PROMPT
            _assert_released(orch)

    asyncio.run(scenario())


def test_prefill_killed_while_the_decode_waits_for_its_kv_recomputes_there() -> None:
    async def scenario() -> None:
        async with _pool(relay_wait_s=60.0) as pool, _router(pool) as orch:  # the KV never comes
            killer = asyncio.create_task(_kill_after(pool, "prfaas", 0.6))  # t1 at 0.3 s
            tokens = await _tokens(orch, _request("relay-lost"))
            killed_at = await killer
            assert time.monotonic() - killed_at < LOST_S + 1.0
            assert tokens == fake_tokens(PROMPT, 6)  # t1 from the prefill, the rest recomputed
            held, local = pool["decode"].submits
            assert held.transfer_uuid and local.transfer_uuid is None
            assert local.request_id == "relay-lost~local"
            assert local.prompt_token_ids == held.prompt_token_ids
            assert (local.max_tokens, local.num_skipped_draws) == (5, 1)
            assert orch.counters["relay_recomputed"] == 1
            _assert_released(orch)

    asyncio.run(scenario())


def test_a_restarted_worker_rejoins_routing() -> None:
    async def scenario() -> None:
        async with _pool() as pool, _router(pool) as orch:
            await pool["decode"].kill()
            await _until(lambda: orch.cluster.workers["decode"].is_lost)
            pool["decode"].restart()
            await _until(lambda: not orch.cluster.workers["decode"].is_lost)
            assert orch.cluster.workers["decode"].is_live(time.monotonic())
            assert await _tokens(orch, _request("back")) == fake_tokens(PROMPT, 6)
            _assert_released(orch)

    asyncio.run(scenario())


async def _until(predicate: Any, timeout_s: float = LOST_S + 1.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout_s}s"
        await asyncio.sleep(0.02)
