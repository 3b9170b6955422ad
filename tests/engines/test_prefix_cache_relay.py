"""Block reuse beside the PrfaaS connector (in-process engines, real loopback relay): a
multi-turn conversation served the remote way (prefill engine relays KV, decode engine claims it)
gives single-engine tokens every turn while both engines reuse their own cached prefixes; the
decode's connector claims only what the engine does not already hold (``num_computed_tokens``)
and its load skips the reused blocks. Also the host-memory connector beside block reuse."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from tests.harness import new_uuid
from trtllm_prfaas.config import model_preset
from trtllm_prfaas.connector.base import ConnectorPair
from trtllm_prfaas.connector.host_memory import host_memory_connector
from trtllm_prfaas.connector.plans import Plan, tokens_digest
from trtllm_prfaas.connector.prfaas import PrfaasConnectorScheduler, PrfaasConnectorWorker
from trtllm_prfaas.connector.prfaas_runtime import (
    PrfaasConnectorConfig,
    PrfaasRuntime,
    Role,
    transfer_id_for,
)
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.prefix_cache import cache_key_for
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.kv.hashing import CacheKey, block_hashes
from trtllm_prfaas.transport import InboundStatus, RelayConfig, RelaySecurity

TINY = model_preset("tiny")
SAMPLING = SamplingParams(max_tokens=6, temperature=0.7, seed=3, ignore_eos=True)


def _tokens(n: int, salt: int) -> list[int]:
    return [(i * 7919 + salt * 104729) % 256 for i in range(n)]


def _engine(model: ModelConfig, role: Role) -> tuple[ReferenceEngine, PrfaasRuntime]:
    relay = RelayConfig(security=RelaySecurity.insecure_plaintext())
    config = PrfaasConnectorConfig(role, relay, transfer_timeout_s=30.0, load_timeout_s=30.0)
    runtime = PrfaasRuntime.start(config, CacheKey(model.model_id, "HND", model.dtype, 0))
    args = ReferenceEngine.llm_args_for(model, prfaas_runtime=runtime)
    pair = ConnectorPair(PrfaasConnectorScheduler(args), PrfaasConnectorWorker(args))
    engine_config = EngineConfig(
        model=model, num_blocks=256, chunk_size=64, max_num_tokens=128, enable_block_reuse=True
    )
    return ReferenceEngine(engine_config, pair, runtime.plans), runtime


def _run(engine: ReferenceEngine, timeout_s: float = 30.0) -> list[int]:
    tokens: list[int] = []
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished():
        assert time.monotonic() < deadline, "engine did not finish in time"
        for out in engine.step():
            assert out.error is None, out.error
            tokens += out.new_token_ids
    return tokens


def _wait_complete(runtime: PrfaasRuntime, uuid: str, prompt: list[int]) -> None:
    assert runtime.receiver is not None
    tid = transfer_id_for(uuid, prompt, runtime.key)
    deadline = time.monotonic() + 30.0
    while runtime.receiver.status(tid) is not InboundStatus.COMPLETE:
        assert time.monotonic() < deadline, "transfer not complete in time"
        time.sleep(0.005)


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Any, ...]]:
    model: ModelConfig = request.param
    prefill, prefill_rt = _engine(model, Role.PREFILL)
    decode, decode_rt = _engine(model, Role.DECODE)
    try:
        yield model, prefill, decode, decode_rt
    finally:
        prefill_rt.close()
        decode_rt.close()
    assert prefill.leak_report() == [] and decode.leak_report() == []


def _relayed_turn(
    prefill: ReferenceEngine,
    decode: ReferenceEngine,
    decode_rt: PrfaasRuntime,
    prompt: list[int],
    relay_from: int = 0,
) -> list[int]:
    """Prompt plus first token, as the router does it; the prefill relays ``[relay_from, L)``."""
    uuid, digest = new_uuid(), tokens_digest(prompt)
    assert decode_rt.receiver_endpoint is not None
    endpoints = [decode_rt.receiver_endpoint]
    prefill_plan = Plan(uuid, len(prompt), digest, endpoints, relay_from_tokens=relay_from)
    first = SamplingParams(max_tokens=1, temperature=SAMPLING.temperature, seed=SAMPLING.seed,
                           ignore_eos=True)  # fmt: skip
    prefill.add_request(prompt, first, plan=prefill_plan)
    (t1,) = _run(prefill)
    _wait_complete(decode_rt, uuid, prompt)
    rest = replace(SAMPLING, max_tokens=SAMPLING.max_tokens - 1, num_skipped_draws=1)
    decode_plan = Plan(uuid, len(prompt), digest, relay_from_tokens=relay_from)
    decode.add_request([*prompt, t1], rest, plan=decode_plan)
    return [t1, *_run(decode)]


def _bytes_relayed(runtime: PrfaasRuntime) -> int:
    return sum(sender.stats().bytes_acked for sender in runtime.senders.values())


def _wait_acked(runtime: PrfaasRuntime, num_bytes: int) -> int:
    """The prefill's acknowledged relay bytes once they reach ``num_bytes`` (acks trail the
    decode's load by a round trip)."""
    deadline = time.monotonic() + 10.0
    while (acked := _bytes_relayed(runtime)) < num_bytes and time.monotonic() < deadline:
        time.sleep(0.005)
    return acked


@pytest.mark.parametrize(
    "pair", [TINY, replace(TINY, layer_pattern="F")], indirect=True, ids=["hybrid", "full-attn"]
)
def test_multi_turn_relayed_with_block_reuse_equals_single_engine(pair: tuple[Any, ...]) -> None:
    """Every turn relays everything (D = 0): the decode claims exactly L - cached, and (with
    the relayed snapshot, for a hybrid model) reuses the previous turn's prefix itself."""
    model, prefill, decode, decode_rt = pair
    history = _tokens(150, salt=1)
    for turn in range(3):
        cold = ReferenceEngine(EngineConfig(model=model, chunk_size=64)).generate(
            [history], SAMPLING
        )[0]
        claimed_before = decode.stats.num_connector_tokens
        reused_before = decode.stats.num_reused_tokens
        assert _relayed_turn(prefill, decode, decode_rt, history) == cold, f"turn {turn}"
        reused = decode.stats.num_reused_tokens - reused_before
        # The decode claims exactly what its own cache does not hold (L - cached).
        assert decode.stats.num_connector_tokens - claimed_before == len(history) - reused
        history = history + cold + _tokens(40, salt=10 + turn)
    assert prefill.stats.num_prefix_hits == 2  # turns 2 and 3 reuse the previous prompt
    # Relayed blocks became the decode's prefix cache; a hybrid model resumes them at the
    # prefill's snapshot at floor((L-1)/B)*B, relayed with the KV (issue 15 item 4).
    assert decode.stats.num_prefix_hits == 2


def _expected_relay_bytes(model: ModelConfig, num_tokens: int, relay_from: int) -> int:
    """Blocks [D/B, ceil(L/B)) of every full layer, the state after L of every linear layer,
    and (hybrid, when S = floor((L-1)/B)*B lies beyond D) the states after S."""
    spec, tpb = model.kv_spec, model.tokens_per_block
    num_blocks = -(-num_tokens // tpb) - relay_from // tpb
    boundary = (num_tokens - 1) // tpb * tpb
    num_states = 1 + (spec.state_bytes > 0 and boundary > relay_from)
    return num_blocks * tpb * spec.bytes_per_token + num_states * spec.state_bytes


@pytest.mark.parametrize(
    "pair", [TINY, replace(TINY, layer_pattern="F")], indirect=True, ids=["hybrid", "full-attn"]
)
def test_relay_only_what_the_decode_lacks(pair: tuple[Any, ...]) -> None:
    """Issue 15 item 4 at the engine seam: before each turn the decode pins the prefix it holds
    (D, what a slot reservation does), the prefill relays only [D, L) plus the states, and the
    decode claims L - D: single-engine tokens every turn, turns 2-3 move the new tokens' KV
    only, and the pins are given back (the fixture's leak check)."""
    model, prefill, decode, decode_rt = pair
    tpb, key = model.tokens_per_block, cache_key_for(model)
    history, sent = _tokens(150, salt=1), 0
    relayed: list[tuple[int, int, int]] = []  # (L, D, bytes) per turn
    for turn in range(3):
        cold = ReferenceEngine(EngineConfig(model=model, chunk_size=64)).generate(
            [history], SAMPLING
        )[0]
        pin_id, relay_from = decode.pin_prefix(block_hashes(history[:-1], tpb, key))
        claimed_before = decode.stats.num_connector_tokens
        try:
            tokens = _relayed_turn(prefill, decode, decode_rt, history, relay_from)
        finally:
            decode.unpin_prefix(pin_id)
        assert tokens == cold, f"turn {turn}"
        assert decode.stats.num_connector_tokens - claimed_before == len(history) - relay_from
        expected = _expected_relay_bytes(model, len(history), relay_from)
        num_bytes = _wait_acked(prefill.connector.worker.runtime, sent + expected) - sent
        sent += num_bytes
        assert num_bytes == expected, f"turn {turn}: D={relay_from}"
        relayed.append((len(history), relay_from, num_bytes))
        history = history + cold + _tokens(40, salt=10 + turn)
    assert relayed[0][1] == 0
    for num_tokens, relay_from, _ in relayed[1:]:
        # The previous prompt's whole blocks, up to the last block boundary before its end
        assert relay_from > 0 and relay_from % tpb == 0 and relay_from < num_tokens
    full = [_expected_relay_bytes(model, n, 0) for n, _, _ in relayed]
    print("relay bytes per turn (L, D, bytes, bytes with D=0):",
          [(*r, f) for r, f in zip(relayed, full, strict=True)])  # fmt: skip


def test_pinned_prefix_lost_falls_back_to_local_compute() -> None:
    """The decode's plan says the transfer starts at D, but its engine holds less at admission
    (no pin: nothing cached): the connector claims nothing and the decode computes the prompt
    itself (counted), with single-engine tokens."""
    model = TINY
    prefill, prefill_rt = _engine(model, Role.PREFILL)
    decode, decode_rt = _engine(model, Role.DECODE)
    try:
        prompt = _tokens(150, salt=4)
        cold = ReferenceEngine(EngineConfig(model=model, chunk_size=64)).generate(
            [prompt], SAMPLING
        )[0]
        assert _relayed_turn(prefill, decode, decode_rt, prompt, relay_from=64) == cold
        assert decode.stats.num_connector_tokens == 0
        assert decode.stats.num_prompt_tokens_computed == len(prompt) + 1
        assert decode_rt.counts["relay_prefix_missing"] == 1
    finally:
        prefill_rt.close()
        decode_rt.close()
    assert prefill.leak_report() == [] and decode.leak_report() == []


def test_host_memory_connector_beside_block_reuse() -> None:
    """The engine's own match comes first; the host connector claims nothing on top of it
    here (the device holds 192 tokens, the host has no state at 199) and the tokens stay exact.
    The host tier supplying what the device evicted: tests/connector/test_host_memory_tier.py."""
    model = TINY
    pair_, _store = host_memory_connector(model, num_blocks=64, num_states=8)
    engine = ReferenceEngine(
        EngineConfig(model=model, num_blocks=128, chunk_size=64, enable_block_reuse=True), pair_
    )
    prompt = _tokens(200, salt=2)
    cold = ReferenceEngine(EngineConfig(model=model, chunk_size=64)).generate([prompt], SAMPLING)
    assert engine.generate([prompt], SAMPLING) == cold
    assert engine.generate([prompt], SAMPLING) == cold
    assert engine.stats.num_reused_tokens == 192 and engine.stats.num_connector_tokens == 0
    assert engine.leak_report() == []
