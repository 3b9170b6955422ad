"""Send only what the decode lacks (issue 15 item 4), through the real orchestrator and two
in-process reference workers with block reuse on (a PrfaaS prefill node and a PD decode node):
a 3-turn conversation whose turns 2-3 relay only the new tokens' KV (plus the states), because
the decode pins the prefix it holds with its slot; single-engine tokens every turn; no pinned
block, snapshot or request left behind on either worker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.router.reuse_workers import prompt, reference, reuse_workers, turn, until
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.telemetry.metrics import RouterMetrics
from trtllm_prfaas.worker.server import WorkerRole, WorkerServer

TINY = model_preset("tiny")
MODELS = {
    "default": model_preset("default"),  # hybrid (LLLF), 32-token blocks
    "hybrid": TINY,  # 16-token blocks
    "full-attn": model_preset("tiny", layer_pattern="F"),  # no preset is full-attention only
}
MAX_TOKENS = 6
ROLES = {"pf": (WorkerRole.PREFILL, "dc-remote"), "dec": (WorkerRole.DECODE, "dc-local")}


@contextlib.asynccontextmanager
async def _orchestrator(
    servers: dict[str, WorkerServer], registry: CollectorRegistry
) -> AsyncIterator[Any]:
    specs = tuple(WorkerSpec(name, s.endpoint, name == "pf") for name, s in servers.items())
    config = RouterConfig(specs, threshold_tokens=16, control=None)
    orch = DisaggregatedOrchestrator(config, RouterMetrics(registry))
    await orch.start()
    try:
        yield orch
    finally:
        await orch.close()


def _expected_bytes(model: ModelConfig, num_tokens: int, relay_from: int) -> int:
    """Blocks [D/B, ceil(L/B)) of every full layer, the state after L of every linear layer
    and, when S = floor((L-1)/B)*B lies beyond D (hybrid), the states after S."""
    spec, tpb = model.kv_spec, model.tokens_per_block
    num_blocks = -(-num_tokens // tpb) - relay_from // tpb
    boundary = (num_tokens - 1) // tpb * tpb
    num_states = 1 + (spec.state_bytes > 0 and boundary > relay_from)
    return num_blocks * tpb * spec.bytes_per_token + num_states * spec.state_bytes


def _decode_holds(model: ModelConfig, previous: int) -> int:
    """What the decode keeps of a relayed prompt of ``previous`` tokens that a next turn can
    resume: the relayed whole blocks (t1's own block is not cached), and for a hybrid model
    only up to a relayed state: the prefill's snapshot at floor((L-1)/B)*B, or the state after
    L when L is block aligned."""
    tpb = model.tokens_per_block
    if model.num_linear_layers and previous % tpb:
        return (previous - 1) // tpb * tpb
    return previous // tpb * tpb


def _relayed(worker: Any) -> int:
    """Relay bytes the prefill worker has had acknowledged (its latest load report)."""
    return worker.report.relay_bytes_sent if worker.report is not None else 0


@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
def test_follow_up_turns_relay_only_the_new_tokens(model: ModelConfig) -> None:
    with reuse_workers(model, ROLES) as servers:
        asyncio.run(_conversation(model, servers))


async def _conversation(model: ModelConfig, servers: dict[str, WorkerServer]) -> None:
    history = prompt(300, salt=3)
    figures: list[tuple[int, int, int, int]] = []  # (L, D, bytes relayed, bytes with D = 0)
    registry = CollectorRegistry()
    async with _orchestrator(servers, registry) as orch:
        pf, prefix = orch.cluster.workers["pf"], orch.cluster.prefix
        sent = 0
        for num in range(3):
            relay_from = _decode_holds(model, figures[-1][0]) if figures else 0
            # the router learns what the decode holds from its KV events (load reports)
            held = functools.partial(prefix.prefix_tokens, "dec", prefix.hashes_for(history))
            await until(lambda held=held, d=relay_from: held(time.monotonic()) >= d)
            tokens = await turn(orch, f"turn{num}", history, MAX_TOKENS)
            decision = orch.decisions[-1]
            assert decision.is_remote and decision.prefill_node_id == "pf"
            assert tokens == reference(model, history, MAX_TOKENS), f"turn {num}"
            expected = _expected_bytes(model, len(history), relay_from)
            await until(lambda n=sent + expected: _relayed(pf) >= n)
            await asyncio.sleep(0.3)  # nothing more comes
            assert pf.report is not None
            num_bytes, sent = pf.report.relay_bytes_sent - sent, pf.report.relay_bytes_sent
            assert num_bytes == expected, f"turn {num}: L={len(history)} D={relay_from}"
            figures.append(
                (len(history), relay_from, num_bytes, _expected_bytes(model, len(history), 0))
            )
            history = [*history, *tokens, *prompt(60, salt=10 + num)]
        assert orch.counters["relay_pinned"] == 2  # turns 2 and 3
        assert orch.counters["relay_pin_fallback"] == 0
        assert orch.counters["relay_recomputed"] == 0
        assert orch.counters["prefill_fallback"] == 0
        pinned = registry.get_sample_value("prfaas_relay_prefix_total", {"outcome": "pinned"})
        saved = registry.get_sample_value("prfaas_relay_bytes_saved_total")
        assert pinned == 2
        assert saved == sum(d for _, d, _, _ in figures) * model.kv_spec.bytes_per_token
    assert [d for _, d, _, _ in figures[1:]] == [
        _decode_holds(model, figures[0][0]),
        _decode_holds(model, figures[1][0]),
    ]
    print("relay per turn (L, D, bytes, bytes with D=0):", figures)
