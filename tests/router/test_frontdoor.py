"""Stock tritonclient against the real front door over a tiny LocalEngineOrchestrator."""

from __future__ import annotations

import itertools
import queue
import time
import urllib.request

import pytest
from tritonclient.utils import InferenceServerException

from tests.router.builders import (
    MODEL,
    ids_of,
    is_final,
    llm_inputs,
    stream,
    tensor,
    text_of,
)
from tests.router.conftest import make_engine
from trtllm_prfaas.engines.request import SamplingParams
from trtllm_prfaas.telemetry.metrics import MetricsServer

PROMPT = "Prefill-as-a-Service: KVCache of next-generation models could go cross-datacenter."


def direct(prompt: str, max_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
    """Ground truth: the same prompt run straight on a fresh engine with the same weights."""
    engine = make_engine()
    ids = engine.tokenizer.encode(prompt)
    (tokens,) = engine.generate([ids], SamplingParams(max_tokens, temperature, seed))
    assert engine.leak_report() == []
    return tokens


def test_health_and_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert client.is_model_ready("ensemble") and not client.is_model_ready("other_model")
    assert client.get_server_metadata(as_json=True)["name"] == "trtllm-prfaas"
    meta = client.get_model_metadata(MODEL, as_json=True)
    # upstream llmapi's inputs in its order (contract.LLMAPI_INPUTS), then the front door's own
    assert [i["name"] for i in meta["inputs"]][:3] == ["text_input", "image_url", "streaming"]
    assert [i["name"] for i in meta["inputs"]][-1] == "input_ids"
    assert {i["name"]: i["datatype"] for i in meta["inputs"]}["sampling_param_seed"] == "UINT64"
    assert [o["name"] for o in meta["outputs"]][:2] == ["text_output", "finish_reason"]
    assert [o["name"] for o in meta["outputs"]][-1] == "output_ids"
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["name"] == MODEL and config["backend"] == "python"
    assert config["model_transaction_policy"]["decoupled"] is True
    required = [i["name"] for i in config["input"] if not i.get("optional", False)]
    assert required == ["text_input"]  # as upstream; input_ids may stand in for it (extension)
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert info.value.status() == "StatusCode.NOT_FOUND" and "no_such_model" in info.value.message()


@pytest.mark.parametrize(("temperature", "seed"), [(None, None), (0.8, 1234)])
def test_unary_matches_engine(client, temperature, seed) -> None:
    result = client.infer(MODEL, llm_inputs(PROMPT, 24, temperature, seed))
    expected = direct(PROMPT, 24, temperature or 0.0, seed or 0)
    assert ids_of(result) == expected
    assert text_of(result) == make_engine().tokenizer.decode(expected)
    assert result.as_numpy("finish_reason") is None  # llmapi: only with return_finish_reason
    asked = [*llm_inputs(PROMPT, 24, temperature, seed), tensor("return_finish_reason", "BOOL",
                                                                  [True])]  # fmt: skip
    assert bytes(client.infer(MODEL, asked).as_numpy("finish_reason")[0]) in (b"length", b"stop")


def test_input_ids_and_int64_seed(client) -> None:
    ids = make_engine().tokenizer.encode(PROMPT)
    inputs = [tensor("input_ids", "INT32", ids), tensor("sampling_param_max_tokens", "INT32", [10]),
              tensor("sampling_param_temperature", "FP32", [0.5]),
              tensor("sampling_param_seed", "INT64", [7])]  # fmt: skip
    assert ids_of(client.infer(MODEL, inputs)) == direct(PROMPT, 10, 0.5, 7)


def test_streaming_is_cumulative_and_ends_as_unary(client) -> None:
    """llmapi streams the whole text so far in each response (``output.text``); the front door's
    ``output_ids`` carry the tokens each response adds."""
    unary = client.infer(MODEL, llm_inputs(PROMPT, 20))
    responses = stream(client, llm_inputs(PROMPT, 20, streaming=True), request_id="abc")
    assert len(responses) > 1
    assert [is_final(r) for r in responses] == [False] * (len(responses) - 1) + [True]
    assert all(r.get_response().id == "abc" for r in responses)
    assert [t for r in responses for t in ids_of(r)] == ids_of(unary)
    texts = [text_of(r) for r in responses]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert texts[-1] == text_of(unary) and len(set(texts)) > 1


def test_stream_without_streaming_flag_sends_one_final_response(client) -> None:
    (response,) = stream(client, llm_inputs(PROMPT, 8))
    assert is_final(response) and ids_of(response) == direct(PROMPT, 8)


def test_stream_carries_concurrent_requests(client) -> None:
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put(error or result))
    try:
        prompts = {f"r{i}": f"{PROMPT} #{i}" for i in range(3)}
        for rid, prompt in prompts.items():
            client.async_stream_infer(MODEL, llm_inputs(prompt, 6, streaming=True), request_id=rid)
        tokens: dict[str, list[int]] = {rid: [] for rid in prompts}
        finals = 0
        while finals < len(prompts):
            result = received.get(timeout=20)
            tokens[result.get_response().id] += ids_of(result)
            finals += is_final(result)
    finally:
        client.stop_stream()
    assert tokens == {rid: direct(prompt, 6) for rid, prompt in prompts.items()}


def test_stream_cancellation_aborts_engine_request(serve, orchestrator) -> None:
    _, client = serve(orchestrator)
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put(error or result))
    try:
        client.async_stream_infer(MODEL, llm_inputs(PROMPT, 1500, streaming=True))
        first = received.get(timeout=20)
        assert not isinstance(first, Exception) and not is_final(first)
    finally:
        client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 5
    while orchestrator.leak_report() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert orchestrator.leak_report() == []
    generated = orchestrator.call(lambda engine: engine.stats.num_generated_tokens)
    assert generated < 1500  # freed by the cancellation, not by finishing
    assert client.is_server_ready()  # and the server keeps serving
    assert ids_of(client.infer(MODEL, llm_inputs(PROMPT, 4))) == direct(PROMPT, 4)


def test_client_deadline_gives_deadline_exceeded_and_frees_blocks(serve, orchestrator) -> None:
    _, client = serve(orchestrator)
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, llm_inputs(PROMPT, 1500), client_timeout=0.3)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    deadline = time.monotonic() + 5
    while orchestrator.leak_report() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert orchestrator.leak_report() == []


def test_metrics_endpoint_serves_frontdoor_counters(client, registry) -> None:
    client.infer(MODEL, llm_inputs(PROMPT, 6))
    with pytest.raises(InferenceServerException):
        client.infer(MODEL, llm_inputs(PROMPT, 0))
    stream(client, llm_inputs(PROMPT, 6, streaming=True))
    with (
        MetricsServer(registry, port=0) as metrics,
        urllib.request.urlopen(metrics.url, timeout=5) as response,
    ):
        body = response.read().decode()
    assert (
        'prfaas_frontdoor_requests_total{model="tensorrt_llm",rpc="ModelInfer",status="OK"} 1.0'
        in body
    )
    assert 'rpc="ModelInfer",status="INVALID_ARGUMENT"} 1.0' in body
    assert 'rpc="ModelStreamInfer",status="OK"} 1.0' in body
    assert 'prfaas_ttft_seconds_count{model="tensorrt_llm"} 2.0' in body
    assert 'prfaas_tpot_seconds_count{model="tensorrt_llm"} 2.0' in body
