"""Fixtures for router tests: a tiny reference engine behind ``LocalEngineOrchestrator``, the
real front door on 127.0.0.1 (port 0), a stock ``tritonclient.grpc`` client, and leak checks:
every engine ends idle with nothing held, every thread the router started is joined."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import CollectorRegistry

from tests.builders import router_thread_leak_check, tiny_model  # noqa: F401 (autouse fixture)
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.router.api import Orchestrator
from trtllm_prfaas.router.frontdoor import FrontDoor, FrontDoorConfig
from trtllm_prfaas.router.local import LocalEngineOrchestrator
from trtllm_prfaas.telemetry.metrics import RouterMetrics


def engine_config(**overrides: Any) -> EngineConfig:
    fields: dict[str, Any] = dict(model=tiny_model(), num_blocks=128, max_num_seqs=8,
                                  chunk_size=32, max_num_tokens=64)  # fmt: skip
    fields.update(overrides)
    return EngineConfig(**fields)


def make_engine(**overrides: Any) -> ReferenceEngine:
    """A fresh tiny engine; two built with the same overrides have identical weights."""
    return ReferenceEngine(engine_config(**overrides))


@pytest.fixture
def orchestrator() -> Iterator[LocalEngineOrchestrator]:
    with LocalEngineOrchestrator(make_engine()) as orch:
        yield orch
        assert orch.leak_report() == [], orch.leak_report()


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


ServeFn = Callable[..., tuple[FrontDoor, grpcclient.InferenceServerClient]]


@pytest.fixture
def serve(registry: CollectorRegistry) -> Iterator[ServeFn]:
    """``serve(orchestrator, **config)`` starts a front door and a client; both are closed at
    teardown, even when the test fails."""
    opened: list[Any] = []

    def start(orch: Orchestrator, **config: Any) -> tuple[FrontDoor, Any]:
        door = FrontDoor(orch, FrontDoorConfig(port=0, **config), RouterMetrics(registry))
        door.start()
        opened.append(door)
        client = grpcclient.InferenceServerClient(door.address)
        opened.append(client)
        return door, client

    yield start
    for thing in reversed(opened):
        thing.close()


@pytest.fixture
def client(
    serve: ServeFn, orchestrator: LocalEngineOrchestrator
) -> grpcclient.InferenceServerClient:
    """A stock client talking to the front door over the tiny local engine."""
    return serve(orchestrator)[1]
