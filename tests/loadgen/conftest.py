"""Fixtures for the bench tests: a real front door (127.0.0.1, port 0) over a
``LocalEngineOrchestrator`` with a small reference engine, metrics on a private registry served
by a ``MetricsServer``; everything is closed at teardown and no thread is leaked."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from tests.builders import router_thread_leak_check  # noqa: F401 (autouse fixture)
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.router.frontdoor import FrontDoor, FrontDoorConfig
from trtllm_prfaas.router.local import LocalEngineOrchestrator
from trtllm_prfaas.telemetry.metrics import MetricsServer, RouterMetrics


def small_engine() -> ReferenceEngine:
    model = ModelConfig(num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                        linear_num_heads=2, mlp_hidden_size=96, tokens_per_block=16,
                        attention_tile_blocks=2)  # fmt: skip
    return ReferenceEngine(EngineConfig(model=model, num_blocks=256, max_num_seqs=8,
                                        chunk_size=64, max_num_tokens=128))  # fmt: skip


@dataclass
class Served:
    door: FrontDoor
    orchestrator: LocalEngineOrchestrator
    metrics: RouterMetrics
    metrics_server: MetricsServer


@pytest.fixture
def served() -> Iterator[Served]:
    """A front door over the small engine, with its metrics served; all stopped at teardown."""
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    with LocalEngineOrchestrator(small_engine()) as orchestrator:
        door = FrontDoor(orchestrator, FrontDoorConfig(port=0), metrics)
        try:
            door.start()
            with MetricsServer(registry, port=0) as metrics_server:
                yield Served(door, orchestrator, metrics, metrics_server)
        finally:
            door.close()
        assert orchestrator.leak_report() == [], orchestrator.leak_report()
