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
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.policy.controller import CachePolicy
from trtllm_prfaas.policy.route import PolicyState
from trtllm_prfaas.router.api import GenerateRequest
from trtllm_prfaas.router.orchestrator import DisaggregatedOrchestrator, RouterConfig, WorkerSpec
from trtllm_prfaas.transport import RelayConfig, RelaySecurity
from trtllm_prfaas.worker.server import WorkerConfig, WorkerRole, WorkerServer

TINY = model_preset("tiny")
MODELS = {"hybrid": TINY, "full-attn": model_preset("tiny", layer_pattern="F")}
TPB = TINY.tokens_per_block  # 16
MAX_TOKENS = 6
ROLES = {
    "pf": (WorkerRole.PREFILL, "dc-remote"),
    "pdp": (WorkerRole.PREFILL, "dc-local"),
    "dec": (WorkerRole.DECODE, "dc-local"),
}


@contextlib.contextmanager
def _workers(model: ModelConfig, accept_moves: bool) -> Iterator[dict[str, WorkerServer]]:
    """The three workers serving on threads; stopped and checked for leaks before closing."""
    relay = RelayConfig(security=RelaySecurity.insecure_plaintext())
    engine = EngineConfig(model=model, num_blocks=512, chunk_size=64, enable_block_reuse=True)
    servers: dict[str, WorkerServer] = {}
    threads: list[threading.Thread] = []
    leaks: dict[str, list[str]] = {}
    try:
        for name, (role, cluster) in ROLES.items():
            config = WorkerConfig(
                name, role, cluster, relay, engine, accept_cache_moves=accept_moves
            )
            servers[name] = WorkerServer(config)
            threads.append(threading.Thread(target=servers[name].serve, daemon=True))
            threads[-1].start()
        yield servers
        deadline = time.monotonic() + 10.0
        while any(s.engine.has_unfinished() for s in servers.values()):
            assert time.monotonic() < deadline, "workers did not go idle"
            time.sleep(0.02)
    finally:
        for server in servers.values():
            server.stop()
        for thread in threads:
            thread.join(timeout=10)
        for name, server in servers.items():
            assert isinstance(server.engine, ReferenceEngine)
            leaks[name] = server.engine.leak_report() + [f"pins {p}" for p in server._pins]
            server.close()
        assert not any(t.is_alive() for t in threads)
    assert all(not leak for leak in leaks.values()), leaks


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


def _prompt(n: int, salt: int) -> list[int]:
    return [(i * 131 + salt) % 255 + 1 for i in range(n)]


def _reference(model: ModelConfig, prompt: list[int]) -> list[int]:
    engine = ReferenceEngine(EngineConfig(model=model, num_blocks=512))
    return engine.generate([prompt], SamplingParams(MAX_TOKENS, 0.7, 9))[0]


async def _turn(orch: Any, rid: str, prompt: list[int]) -> list[int]:
    request = GenerateRequest(
        rid, prompt, MAX_TOKENS, temperature=0.7, seed=9, streaming=True, deadline_s=60.0
    )
    tokens: list[int] = []
    async for chunk in orch.generate(request):
        tokens += chunk.token_ids
    return tokens


async def _until(predicate: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.02)


async def _two_turns(
    model: ModelConfig, servers: dict[str, WorkerServer], move_timeout_s: float = 30.0
) -> tuple[Any, int, int, int]:
    """Turn 1 on the PD prefill node, turn 2 to PrfaaS under the abundant policy; returns the
    orchestrator's counters, turn 2's length, the prefix the PD node held, and the prompt
    tokens the PrfaaS node computed."""
    first = _prompt(330, salt=3)
    pf = servers["pf"].engine
    assert isinstance(pf, ReferenceEngine)
    async with _orchestrator(servers) as orch:
        orch._mover.timeout_s = move_timeout_s
        orch.control.policy = PolicyState(10_000.0, CachePolicy.SCARCE)  # turn 1: local
        tokens = await _turn(orch, "turn1", first)
        assert orch.decisions[-1].prefill_node_id == "pdp"
        assert tokens == _reference(model, first)
        second = [*first, *tokens, *_prompt(100, salt=11)]
        held = (len(first) - 1) // TPB * TPB  # the PD node's reusable prefix of turn 2
        pdp_holds = functools.partial(
            orch.cluster.prefix.prefix_tokens, "pdp", orch.cluster.prefix.hashes_for(second)
        )
        await _until(lambda: pdp_holds(time.monotonic()) >= held)
        orch.control.policy = PolicyState(16.0, CachePolicy.ABUNDANT)  # turn 2: PrfaaS
        computed_before = pf.stats.num_prompt_tokens_computed
        tokens = await _turn(orch, "turn2", second)
        decision = orch.decisions[-1]
        assert decision.prefill_node_id == "pf" and decision.cache_move is not None
        assert decision.cache_move.tokens == held
        assert tokens == _reference(model, second)
        computed = pf.stats.num_prompt_tokens_computed - computed_before
        return dict(orch.counters), len(second), held, computed


@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
def test_a_prefix_moves_to_the_chosen_prefill_node(model: ModelConfig) -> None:
    with _workers(model, accept_moves=True) as servers:
        counters, num_tokens, held, computed = asyncio.run(_two_turns(model, servers))
    assert counters["cache_move_done"] == 1 and counters["cache_move_failed"] == 0
    # The target computed the fill leg's one token and turn 2 beyond the moved prefix
    assert computed == 1 + num_tokens - held
    assert counters["prefill_fallback"] == 0 and counters["relay_recomputed"] == 0
    print(f"turn 2: {num_tokens} tokens, {held} moved, {computed} computed on the target")


def test_a_move_past_its_deadline_is_abandoned_and_the_prefix_computed() -> None:
    """The move may take no time at all: it fails at once, both legs are cancelled (nothing
    left on the workers: the fixture's leak check), and the target computes everything."""
    with _workers(TINY, accept_moves=True) as servers:
        counters, num_tokens, _, computed = asyncio.run(_two_turns(TINY, servers, 1e-4))
    assert counters["cache_move_failed"] == 1 and counters["cache_move_done"] == 0
    assert computed == num_tokens


def test_a_target_that_takes_no_moves_computes_the_prefix() -> None:
    with _workers(TINY, accept_moves=False) as servers:
        counters, num_tokens, _, computed = asyncio.run(_two_turns(TINY, servers))
    assert counters["cache_move_skipped"] == 1 and counters["cache_move_done"] == 0
    assert computed == num_tokens
