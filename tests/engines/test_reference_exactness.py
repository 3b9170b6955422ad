"""Bit-exact equalities of the reference engine: chunked prefill equals unchunked, batched
decode equals one-at-a-time decode, for both dtypes. These also guard the batch-invariance
facts that ``engines/kernels.py`` relies on."""

from __future__ import annotations

import pytest
import torch

from tests.builders import tiny_model
from tests.conftest import EngineFactory
from trtllm_prfaas.engines import kernels
from trtllm_prfaas.engines.batch import SequenceChunk
from trtllm_prfaas.engines.reference import HybridModel, ModelConfig
from trtllm_prfaas.engines.request import SamplingParams


def _prompt(length: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (length,), generator=gen).tolist()


def _prefill(model: HybridModel, tokens: list[int], chunk: int):
    """Prefill the engine's way: TensorRT-LLM's plain chunking, chunks of ``chunk`` tokens (a
    multiple of the block size), the last one ending at L. Chunk boundaries off the block grid
    are not bit-invariant (the linear-attention kernel works block-wise), which is why the
    remote handoff relays the prefill's whole prompt and the decode computes only t1 after it."""
    cfg = model.cfg
    num_blocks = len(tokens) // cfg.tokens_per_block + 2
    pool = torch.zeros(num_blocks, cfg.num_full_layers, 2, cfg.block_row_elems,
                       dtype=cfg.torch_dtype)  # fmt: skip
    states = torch.zeros(2, *cfg.state_shape)
    blocks = list(range(1, num_blocks))
    pos, logits = 0, None
    while pos < len(tokens):
        end = min(pos + chunk, len(tokens))
        logits = model([SequenceChunk(tokens[pos:end], pos, blocks, 1)], pool, states)
        pos = end
    return logits, pool, states


def test_linear_is_row_invariant() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=gen)
    w = torch.randn(96, 64, generator=gen)
    full = kernels.linear(x, w)
    for rows in (1, 2, 3, 5, 7, 9, 11, 16, 17, 64, 250):
        assert torch.equal(kernels.linear(x[3 : 3 + rows], w), full[3 : 3 + rows]), rows


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 31, 33, 100, 257])
def test_chunked_prefill_equals_unchunked(dtype: str, length: int) -> None:
    model = HybridModel(tiny_model(dtype=dtype))
    tokens = _prompt(length)
    want_logits, want_pool, want_states = _prefill(model, tokens, chunk=10**6)
    for chunk in (16, 32, 64):
        logits, pool, states = _prefill(model, tokens, chunk)
        assert torch.equal(logits, want_logits), (chunk, "logits")
        assert torch.equal(pool, want_pool), (chunk, "pool")
        assert torch.equal(states, want_states), (chunk, "states")


def test_default_model_chunked_prefill_equals_unchunked() -> None:
    model = HybridModel(ModelConfig())
    tokens = _prompt(700, seed=3)
    want = _prefill(model, tokens, chunk=10**6)
    got = _prefill(model, tokens, chunk=256)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_batched_decode_equals_one_at_a_time(
    make_engine: EngineFactory, dtype: str, temperature: float
) -> None:
    prompts = [_prompt(n, seed=n) for n in (5, 40, 97, 16, 130)]
    sampling = SamplingParams(max_tokens=24, temperature=temperature, seed=11, ignore_eos=True)
    batched_engine = make_engine(tiny_model(dtype=dtype))
    batched = batched_engine.generate(prompts, sampling)
    single_engine = make_engine(tiny_model(dtype=dtype), chunk_size=2048, max_num_tokens=2048)
    singles = [single_engine.generate([p], sampling)[0] for p in prompts]
    assert batched == singles
    assert all(len(t) == 24 for t in batched)


def test_staggered_arrivals_match_single_runs(make_engine: EngineFactory) -> None:
    """Requests joining while others decode (continuous batching) keep their tokens."""
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = [_prompt(n, seed=n) for n in (70, 3, 45)]
    engine = make_engine()
    got: dict[int, list[int]] = {}
    ids = [engine.add_request(prompts[0], sampling)]
    for prompt in prompts[1:]:
        for out in engine.step() + engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
        ids.append(engine.add_request(prompt, sampling))
    while engine.has_unfinished():
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.new_token_ids)
    reference = make_engine()
    assert [got[i] for i in ids] == [reference.generate([p], sampling)[0] for p in prompts]


def test_weights_are_deterministic_from_the_seed(tmp_path) -> None:
    a, b, c = HybridModel(tiny_model()), HybridModel(tiny_model()), HybridModel(tiny_model(seed=8))
    assert torch.equal(a.embed, b.embed) and torch.equal(a.lm_head, b.lm_head)
    assert not torch.equal(a.embed, c.embed)
    path = tmp_path / "weights.safetensors"
    c.save_safetensors(path)
    a.load_safetensors(path)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
