"""The orchestrator's runtime membership (``add_worker``/``remove_worker``) over in-process fake
workers (``worker/fake.py``): a router with no static list answers UNAVAILABLE, serves once a
decode and a prefill worker were added, ends a request on a removed worker as on a lost one,
closes the removed worker's socket, drops its gauges, refuses a duplicate name, and closes the
socket of a worker that never answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from trtllm_prfaas.errors import AdmissionRejected, ConfigError, TransportError, WorkerLost
from trtllm_prfaas.router.api import GenerateRequest
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.worker.fake import FakeWorkerPool, FakeWorkerSpec, fake_tokens

PROMPT = [(i * 37 + 11) % 256 for i in range(40)]  # below the threshold: local


def _request(rid: str, max_tokens: int = 6) -> GenerateRequest:
    return GenerateRequest(rid, PROMPT, max_tokens, 0.0, 0, True, 30.0)


async def _tokens(orch: DisaggregatedOrchestrator, request: GenerateRequest) -> list[int]:
    return [t async for chunk in orch.generate(request) for t in chunk.token_ids]


def _samples(registry: CollectorRegistry, name: str) -> dict[str, float]:
    return {
        str(s.labels.get("worker") or s.labels.get("link")): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name == name
    }


def test_workers_added_and_removed_at_run_time() -> None:
    registry = CollectorRegistry()

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        stalled_decode = FakeWorkerSpec("decode", "decode", decode_delay_s=30.0)
        pool = FakeWorkerPool([FakeWorkerSpec("pd-p", "prefill"), stalled_decode])
        config = RouterConfig((), threshold_tokens=100, control=None, connect_timeout_s=0.5)
        orch = DisaggregatedOrchestrator(config, RouterMetrics(registry))
        async with pool:
            await orch.start()
            try:
                assert not orch.is_ready() and orch.max_seq_len > 10**9  # no limit known yet
                with pytest.raises(AdmissionRejected, match="no worker has joined yet"):
                    await _tokens(orch, _request("early"))
                for name in ("pd-p", "decode"):
                    info = await orch.add_worker(WorkerSpec(name, pool[name].endpoint, False))
                    assert info.role == pool[name].spec.role
                assert (
                    orch.is_ready()
                    and orch.max_seq_len == orch.cluster.workers["pd-p"].info.max_seq_len
                )
                with pytest.raises(ConfigError, match="known already"):
                    await orch.add_worker(WorkerSpec("decode", pool["decode"].endpoint, False))
                await asyncio.sleep(0.2)  # load reports: the gauges exist
                seen["gauges_before"] = _samples(registry, "prfaas_worker_queue_depth")

                stream = orch.generate(_request("in-flight", max_tokens=4))
                first = await anext(stream)  # t1 from the prefill node; decode then stalls
                assert await orch.remove_worker("decode", "deregistered") is True
                with pytest.raises(WorkerLost, match="decode lost"):
                    async for _ in stream:
                        pass
                seen["first"] = first.token_ids
                assert "decode" not in orch.cluster.workers and "decode" not in orch._links._sockets
                assert await orch.remove_worker("decode") is False
                with pytest.raises(WorkerLost, match="not connected"):
                    await orch._links.send("decode", _ping())
                with pytest.raises(AdmissionRejected, match="no decode node"):
                    await _tokens(orch, _request("after"))
                seen["gauges_after"] = _samples(registry, "prfaas_worker_queue_depth")

                with pytest.raises(TransportError, match="did not answer"):
                    await orch.add_worker(WorkerSpec("ghost", "tcp://127.0.0.1:9", False))
                assert "ghost" not in orch._links._sockets and "ghost" not in orch.cluster.workers
                assert orch._links.flights == {}
            finally:
                await orch.close()
        return seen

    seen = asyncio.run(scenario())
    assert seen["first"] == fake_tokens(PROMPT, 1)
    assert set(seen["gauges_before"]) == {"pd-p", "decode"}
    assert set(seen["gauges_after"]) == {"pd-p"}  # the departed worker's gauges are gone


def _ping() -> Any:
    from trtllm_prfaas.worker import protocol as p

    return p.Ping()
