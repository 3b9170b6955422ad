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
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.kv.hashing import CacheKey
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
    prefill: ReferenceEngine, decode: ReferenceEngine, decode_rt: PrfaasRuntime, prompt: list[int]
) -> list[int]:
    """Prompt plus first token, as the router does it."""
    uuid, digest = new_uuid(), tokens_digest(prompt)
    assert decode_rt.receiver_endpoint is not None
    prefill_plan = Plan(uuid, len(prompt), digest, [decode_rt.receiver_endpoint])
    first = SamplingParams(max_tokens=1, temperature=SAMPLING.temperature, seed=SAMPLING.seed,
                           ignore_eos=True)  # fmt: skip
    prefill.add_request(prompt, first, plan=prefill_plan)
    (t1,) = _run(prefill)
    _wait_complete(decode_rt, uuid, prompt)
    rest = replace(SAMPLING, max_tokens=SAMPLING.max_tokens - 1, num_skipped_draws=1)
    decode.add_request([*prompt, t1], rest, plan=Plan(uuid, len(prompt), digest))
    return [t1, *_run(decode)]


@pytest.mark.parametrize(
    "pair", [TINY, replace(TINY, layer_pattern="F")], indirect=True, ids=["hybrid", "full-attn"]
)
def test_multi_turn_relayed_with_block_reuse_equals_single_engine(pair: tuple[Any, ...]) -> None:
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
    if model.num_linear_layers == 0:
        assert decode.stats.num_prefix_hits == 2  # relayed blocks became its prefix cache
    else:
        # A hybrid decode has no recurrent-state snapshot at a block boundary of a relayed
        # prompt (the relay carries the state after L only): its blocks cannot be resumed.
        assert decode.stats.num_prefix_hits == 0


def test_host_memory_connector_beside_block_reuse() -> None:
    """The engine's own match comes first; the host connector claims nothing on top of it
    (it only matches from zero) and the tokens stay exact."""
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
