"""Bad input, exhausted pools, deadlines, aborts: each a clear error from the project's tree,
and the engine keeps serving the other requests."""

from __future__ import annotations

import time

import pytest

from tests.builders import tiny_model
from tests.conftest import EngineFactory
from trtllm_prfaas.engines.engine import EngineConfig
from trtllm_prfaas.engines.reference import ModelConfig
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.errors import AdmissionRejected, ConfigError, InvalidRequestError, PrfaasError

GREEDY = SamplingParams(max_tokens=4, ignore_eos=True)


def test_empty_prompt_is_rejected(make_engine: EngineFactory) -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        make_engine().add_request([], GREEDY)


def test_prompt_over_max_length_is_rejected(make_engine: EngineFactory) -> None:
    engine = make_engine(tiny_model(max_seq_len=64))
    with pytest.raises(InvalidRequestError, match="max sequence length 64"):
        engine.add_request([1] * 62, GREEDY)


def test_token_ids_outside_vocabulary_are_rejected(make_engine: EngineFactory) -> None:
    engine = make_engine()
    with pytest.raises(InvalidRequestError, match="token id 999 at position 1"):
        engine.add_request([1, 999, 2], GREEDY)
    with pytest.raises(InvalidRequestError, match="token id -1"):
        engine.add_request([-1], GREEDY)


def test_bad_sampling_parameters_are_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_bad_configs_name_the_field() -> None:
    with pytest.raises(ConfigError, match="chunk_size"):
        EngineConfig(chunk_size=33)
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig(num_heads=3, num_kv_heads=2)
    with pytest.raises(ConfigError, match="layer_pattern"):
        ModelConfig(layer_pattern="LXF")


def test_request_larger_than_the_pool_is_rejected(make_engine: EngineFactory) -> None:
    engine = make_engine(num_blocks=4)  # 4 blocks x 16 tokens
    with pytest.raises(AdmissionRejected, match="needs 5 KV blocks; the pool has 4"):
        engine.add_request([1] * 70, GREEDY)


def test_exhausted_pool_fails_late_requests_by_deadline_and_keeps_serving(
    make_engine: EngineFactory,
) -> None:
    engine = make_engine(num_blocks=6, admission_timeout_s=0.05)
    long_running = SamplingParams(max_tokens=30, ignore_eos=True)
    first = engine.add_request([1] * 60, long_running)  # reserves all 6 blocks
    outputs = engine.step()
    second = engine.add_request([2] * 10, GREEDY)  # cannot be admitted before its deadline
    time.sleep(0.1)
    outputs += engine.step()
    failed = [o for o in outputs if o.request_id == second]
    assert failed and failed[0].finish_reason == "error"
    assert isinstance(failed[0].error, AdmissionRejected)
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() if o.request_id == first for t in o.new_token_ids]
    assert len(tokens) + sum(len(o.new_token_ids) for o in outputs if o.request_id == first) == 30
    assert engine.generate([[3] * 5], GREEDY)  # still serving


def test_waiting_request_is_admitted_when_blocks_come_back(make_engine: EngineFactory) -> None:
    engine = make_engine(num_blocks=6)
    results = engine.generate([[1] * 60, [2] * 60], GREEDY)
    assert [len(r) for r in results] == [4, 4]


def test_full_waiting_queue_rejects(make_engine: EngineFactory) -> None:
    engine = make_engine(max_waiting=1)
    engine.add_request([1, 2], GREEDY)
    with pytest.raises(AdmissionRejected, match="queue is full"):
        engine.add_request([1, 2], GREEDY)
    engine.generate([], GREEDY)  # drain what is queued
    while engine.has_unfinished():
        engine.step()


def test_abort_frees_blocks_and_other_requests_finish(make_engine: EngineFactory) -> None:
    engine = make_engine()
    victim = engine.add_request([5] * 50, SamplingParams(max_tokens=50, ignore_eos=True))
    survivor = engine.add_request([6] * 20, GREEDY)
    engine.step()
    out = engine.abort(victim)
    assert out is not None and out.finish_reason == "aborted"
    assert engine.abort(12345) is None
    produced = []
    while engine.has_unfinished():
        produced += [o for o in engine.step() if o.request_id == survivor]
    assert produced[-1].finished and produced[-1].finish_reason == "length"


def test_duplicate_request_id_is_rejected(make_engine: EngineFactory) -> None:
    engine = make_engine()
    engine.add_request([1], GREEDY, request_id=42)
    with pytest.raises(InvalidRequestError, match="already in use"):
        engine.add_request([1], GREEDY, request_id=42)
    while engine.has_unfinished():
        engine.step()


def test_errors_belong_to_the_project_tree() -> None:
    for error in (InvalidRequestError, AdmissionRejected, ConfigError):
        assert issubclass(error, PrfaasError)


def test_stop_at_eos_and_stream_decoding(make_engine: EngineFactory) -> None:
    engine = make_engine()
    tokens = engine.generate([engine.tokenizer.encode("hello")], SamplingParams(max_tokens=64))
    assert 1 <= len(tokens[0]) <= 64
    if len(tokens[0]) < 64:
        assert tokens[0][-1] == engine.tokenizer.eos_id
