"""Moving a cached prefix across under abundant bandwidth (issue 15 item 5), through the real
orchestrator and three in-process reference workers with block reuse (a PrfaaS prefill node that
accepts cache moves, a PD prefill node, a PD decode node): turn 1 prefills on the PD node; turn 2
goes to PrfaaS, whose node lacks the prefix, so the router moves it there first (the PD node
relays its cached prefix, the PrfaaS node claims and keeps it) and the PrfaaS prefill computes
only what lies beyond it. Single-engine tokens; nothing left on any worker. A target that takes
no moves is skipped (counted) and computes everything, with the same tokens."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.router.reuse_workers import prompt, reference, reuse_workers, turn, until
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import ReferenceEngine
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.policy.controller import CachePolicy
from trtllm_prfaas.policy.route import PolicyState
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.worker.server import WorkerRole, WorkerServer

TINY = model_preset("tiny")
MODELS = {"hybrid": TINY, "full-attn": model_preset("tiny", layer_pattern="F")}
TPB = TINY.tokens_per_block  # 16
MAX_TOKENS = 6
ROLES = {
    "pf": (WorkerRole.PREFILL, "dc-remote"),
    "pdp": (WorkerRole.PREFILL, "dc-local"),
    "dec": (WorkerRole.DECODE, "dc-local"),
}


@contextlib.asynccontextmanager
async def _orchestrator(servers: dict[str, WorkerServer]) -> AsyncIterator[Any]:
    specs = tuple(WorkerSpec(name, s.endpoint, name == "pf") for name, s in servers.items())
    orch = DisaggregatedOrchestrator(RouterConfig(specs, threshold_tokens=16, control=None))
    await orch.start()
    await orch.control.stop()  # the test sets the routing knobs itself
    try:
        yield orch
    finally:
        await orch.close()


async def _two_turns(
    model: ModelConfig, servers: dict[str, WorkerServer], move_timeout_s: float = 30.0
) -> tuple[Any, int, int, int]:
    """Turn 1 on the PD prefill node, turn 2 to PrfaaS under the abundant policy; returns the
    orchestrator's counters, turn 2's length, the prefix the PD node held, and the prompt
    tokens the PrfaaS node computed."""
    first = prompt(330, salt=3)
    pf = servers["pf"].engine
    assert isinstance(pf, ReferenceEngine)
    async with _orchestrator(servers) as orch:
        orch._mover.timeout_s = move_timeout_s
        orch.control.policy = PolicyState(10_000.0, CachePolicy.SCARCE)  # turn 1: local
        tokens = await turn(orch, "turn1", first, MAX_TOKENS)
        assert orch.decisions[-1].prefill_node_id == "pdp"
        assert tokens == reference(model, first, MAX_TOKENS)
        second = [*first, *tokens, *prompt(100, salt=11)]
        held = (len(first) - 1) // TPB * TPB  # the PD node's reusable prefix of turn 2
        pdp_holds = functools.partial(
            orch.cluster.prefix.prefix_tokens, "pdp", orch.cluster.prefix.hashes_for(second)
        )
        await until(lambda: pdp_holds(time.monotonic()) >= held)
        orch.control.policy = PolicyState(16.0, CachePolicy.ABUNDANT)  # turn 2: PrfaaS
        computed_before = pf.stats.num_prompt_tokens_computed
        tokens = await turn(orch, "turn2", second, MAX_TOKENS)
        decision = orch.decisions[-1]
        assert decision.prefill_node_id == "pf" and decision.cache_move is not None
        assert decision.cache_move.tokens == held
        assert tokens == reference(model, second, MAX_TOKENS)
        computed = pf.stats.num_prompt_tokens_computed - computed_before
        return dict(orch.counters), len(second), held, computed


@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
def test_a_prefix_moves_to_the_chosen_prefill_node(model: ModelConfig) -> None:
    with reuse_workers(model, ROLES, accept_cache_moves=True) as servers:
        counters, num_tokens, held, computed = asyncio.run(_two_turns(model, servers))
    assert counters["cache_move_done"] == 1 and counters["cache_move_failed"] == 0
    # The target computed the fill leg's one token and turn 2 beyond the moved prefix
    assert computed == 1 + num_tokens - held
    assert counters["prefill_fallback"] == 0 and counters["relay_recomputed"] == 0
    print(f"turn 2: {num_tokens} tokens, {held} moved, {computed} computed on the target")


def test_a_move_past_its_deadline_is_abandoned_and_the_prefix_computed() -> None:
    """The move may take no time at all: it fails at once, both legs are cancelled (nothing
    left on the workers: the fixture's leak check), and the target computes everything."""
    with reuse_workers(TINY, ROLES, accept_cache_moves=True) as servers:
        counters, num_tokens, _, computed = asyncio.run(_two_turns(TINY, servers, 1e-4))
    assert counters["cache_move_failed"] == 1 and counters["cache_move_done"] == 0
    assert computed == num_tokens


def test_a_target_that_takes_no_moves_computes_the_prefix() -> None:
    with reuse_workers(TINY, ROLES) as servers:
        counters, num_tokens, _, computed = asyncio.run(_two_turns(TINY, servers))
    assert counters["cache_move_skipped"] == 1 and counters["cache_move_done"] == 0
    assert computed == num_tokens
