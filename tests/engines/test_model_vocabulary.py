"""The reference model over a served tokenizer's vocabulary (``ModelConfig.vocab_size`` and
``eos_id``, as ``model_vocabulary(dir)`` gives them): the engine accepts every id of that
vocabulary (not only the byte tokenizer's 259), refuses the first id past it, and stops at the
model's EOS id (TensorRT-LLM stops at ``SamplingParams.end_id``, the tokenizer's EOS by default)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.builders import tiny_model
from tests.fakes import tokenizer as fake_tokenizer
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.engines.tokenizer import VOCAB_SIZE, load_tokenizer, model_vocabulary
from trtllm_prfaas.errors import ConfigError, InvalidRequestError

hf_model_dir = fake_tokenizer.hf_model_dir  # the session fixture


def _engine(**model: int) -> ReferenceEngine:
    config = EngineConfig(model=tiny_model(**model), num_blocks=64, chunk_size=32,
                          max_num_tokens=64)  # fmt: skip
    return ReferenceEngine(config)


def test_the_model_takes_the_tokenizers_vocabulary(hf_model_dir: Path) -> None:
    vocabulary = model_vocabulary(str(hf_model_dir))
    tokenizer = load_tokenizer(str(hf_model_dir))
    assert vocabulary == {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
    assert tokenizer.vocab_size > VOCAB_SIZE and model_vocabulary("") == {}
    engine = _engine(**vocabulary)
    prompt = tokenizer.encode("東京 テキスト the lazy dog")
    assert max(prompt) >= VOCAB_SIZE  # ids the byte tokenizer's check refused
    out = engine.generate([prompt, [tokenizer.vocab_size - 1]], SamplingParams(4, 0.8, 3))
    assert [len(tokens) for tokens in out] == [4, 4]
    assert all(0 <= t < tokenizer.vocab_size for tokens in out for t in tokens)
    with pytest.raises(InvalidRequestError, match=r"token id 420 at position 1 .*\[0, 420\)"):
        engine.add_request([5, tokenizer.vocab_size], SamplingParams(4))
    assert engine.leak_report() == []


def test_generation_stops_at_the_models_eos_id() -> None:
    prompt = [256, *b"stop here"]
    first = _engine(vocab_size=300).generate([prompt], SamplingParams(6))[0]
    assert first[0] != 257 and len(first) == 6  # greedy, no EOS: runs to max_tokens
    engine = _engine(vocab_size=300, eos_id=first[2])  # same weights: eos_id is not a shape
    rid = engine.add_request(prompt, SamplingParams(6))
    outputs = []
    while engine.has_unfinished():
        outputs += [out for out in engine.step() if out.request_id == rid]
    assert [t for out in outputs for t in out.new_token_ids] == first[:3]
    assert (outputs[-1].finished, outputs[-1].finish_reason) == (True, "stop")


@pytest.mark.parametrize("eos_id", [-1, 300])
def test_eos_id_must_lie_in_the_vocabulary(eos_id: int) -> None:
    with pytest.raises(ConfigError, match="eos_id"):
        tiny_model(vocab_size=300, eos_id=eos_id)
