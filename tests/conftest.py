"""Builders for engine tests. Every engine built through ``make_engine`` is leak-checked at
teardown: no queued or running request, no block in use or reserved, no state slot held."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.builders import tiny_model
from tests.etcd_server import EtcdServer, running_etcd
from trtllm_prfaas.engines.engine import ConnectorPair, EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.telemetry.logging import configure_logging

EngineFactory = Callable[..., ReferenceEngine]


@pytest.fixture(autouse=True, scope="session")
def _log_as_the_cli_does() -> None:
    """Every test logs at ``prfaas``'s default level (WARNING). ``capture_logs`` swaps the
    processors but not the level filter, so without this a test capturing an info line passed
    or failed depending on whether an earlier test had run ``cli.main`` in this process."""
    configure_logging("WARNING")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that reconfigures logging (``cli.main --log-level``) does not leak it."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.fixture
def make_engine() -> Iterator[EngineFactory]:
    engines: list[ReferenceEngine] = []

    def build(
        model: ModelConfig | None = None,
        connector: ConnectorPair | None = None,
        **config: Any,
    ) -> ReferenceEngine:
        fields: dict[str, Any] = dict(num_blocks=128, max_num_seqs=8, chunk_size=32,
                                      max_num_tokens=64)  # fmt: skip
        fields.update(config)
        engine = ReferenceEngine(EngineConfig(model=model or tiny_model(), **fields), connector)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        assert engine.leak_report() == [], engine.leak_report()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        choices=("cpu", "strict", "cuda"),
        default="cpu",
        help="the fake executor's KV pool in the connector contract tests: plain CPU, the strict "
        "CPU shim (no host access, lazy streams and events), or a real CUDA device",
    )


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A real etcd on loopback (Debian's etcd-server), stopped after the test."""
    yield from running_etcd(tmp_path)
