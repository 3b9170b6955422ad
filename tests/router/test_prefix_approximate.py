"""Approximate prefix routing through the real orchestrator: workers that reuse blocks but
report no KV cache events (a Triton worker: ``WorkerInfo.prefix_cache = "approximate"``, here
in-process fakes) are followed from the router's own routing history, and the metrics say so."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from trtllm_prfaas.router.api import GenerateRequest
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.worker.fake import FakeWorkerPool, FakeWorkerSpec, fake_tokens

APPROX = "approximate"


async def _run(orch: DisaggregatedOrchestrator, rid: str, prompt: list[int]) -> list[int]:
    tokens: list[int] = []
    request = GenerateRequest(rid, prompt, 4, 0.0, 0, streaming=True, deadline_s=10.0)
    async for chunk in orch.generate(request):
        tokens += chunk.token_ids
    return tokens


def test_routing_history_makes_approximate_nodes_cache_affine() -> None:
    async def scenario() -> None:
        specs = [
            FakeWorkerSpec("p0", "prefill", "dc-remote", prefix_cache=APPROX),
            FakeWorkerSpec("p1", "prefill", "dc-remote", prefix_cache=APPROX),
            FakeWorkerSpec("d0", "decode", prefix_cache=APPROX),
        ]
        registry = CollectorRegistry()
        async with FakeWorkerPool(specs) as pool:
            workers = tuple(WorkerSpec(n, w.endpoint, n != "d0") for n, w in pool.workers.items())
            orch = DisaggregatedOrchestrator(
                RouterConfig(workers, threshold_tokens=10, control=None), RouterMetrics(registry)
            )
            await orch.start()
            try:
                first = [(i * 7) % 250 + 1 for i in range(300)]
                second = [*first, *range(1, 50)]
                orch.cluster.workers["p0"].is_draining = True  # turn 1 to p1, not the default
                assert await _run(orch, "a", first) == fake_tokens(first, 4)
                orch.cluster.workers["p0"].is_draining = False
                assert await _run(orch, "b", second) == fake_tokens(second, 4)
                decision = orch.decisions[-1]
                assert decision.prefill_node_id == "p1"  # remembered: p1 was given turn 1
                assert decision.prefix_tokens == 299 // 16 * 16  # its reusable whole blocks
                assert orch.cluster.prefix.is_approximate("p1")
            finally:
                await orch.close()
        value = registry.get_sample_value
        labels = {"route": "remote", "kind": "prefix", "mode": APPROX}
        assert value("prfaas_routed_prompt_tokens_total", labels) == 288
        # the index's gauges are exported at most once a second: as of the first decision
        assert value("prfaas_prefix_index_blocks", {"worker": "p1", "mode": APPROX}) == 18
        assert value("prfaas_prefix_index_count", {"what": "approximate_lookups"}) == 3

    asyncio.run(scenario())
