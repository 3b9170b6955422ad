"""The llmapi Triton fake itself, driven by the stock ``tritonclient.grpc`` client: each behaviour
the fake's docstring attributes to upstream (Triton core validation, the gRPC front end, the
``llmapi`` model.py) is what a real client sees."""

from __future__ import annotations

import itertools
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.fakes import tokenizer as fake_tokenizer
from tests.fakes.llmapi_triton import INPUTS, OUTPUTS, FakeLlmapiTriton

hf_model_dir = fake_tokenizer.hf_model_dir  # the session fixture
PROMPT = "Prefill-as-a-Service streams KV across datacenters 東京"


def _input(name: str, datatype: str, values: list[Any]) -> Any:
    dtype = {"BYTES": np.object_, "BOOL": np.bool_, "INT32": np.int32, "UINT64": np.uint64,
             "FP32": np.float32}[datatype]  # fmt: skip
    tensor = grpcclient.InferInput(name, [len(values)], datatype)
    tensor.set_data_from_numpy(np.asarray(values, dtype=dtype))
    return tensor


def _text(prompt: str = PROMPT) -> Any:
    return _input("text_input", "BYTES", [prompt.encode()])


@pytest.fixture(params=[False, True], ids=["non-decoupled", "decoupled"])
def server(request: pytest.FixtureRequest, hf_model_dir: Path) -> Iterator[FakeLlmapiTriton]:
    with FakeLlmapiTriton(hf_model_dir, decoupled=request.param) as fake:
        yield fake


def _stream(server: FakeLlmapiTriton, inputs: list[Any]) -> list[tuple[Any, Any]]:
    """Every (result, error) of one streamed request, until its final response or an error."""
    client = grpcclient.InferenceServerClient(server.address)
    got: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        client.async_stream_infer("tensorrt_llm", inputs, request_id="42")
        items = []
        while True:
            result, error = got.get(timeout=10)
            items.append((result, error))
            if error is not None:
                return items
            if result.get_response().parameters["triton_final_response"].bool_param:
                return items
    finally:
        client.stop_stream()
        client.close()


def test_config_is_upstreams(server: FakeLlmapiTriton) -> None:
    with grpcclient.InferenceServerClient(server.address) as client:
        config = client.get_model_config("tensorrt_llm").config
        assert client.is_model_ready("tensorrt_llm") and not client.is_model_ready("nope")
    assert [i.name for i in config.input] == [name for name, *_ in INPUTS]
    assert [i.name for i in config.input if not i.optional] == ["text_input"]
    assert [o.name for o in config.output] == [name for name, *_ in OUTPUTS]
    assert config.max_batch_size == 0
    assert "input_ids" not in {i.name for i in config.input}
    assert "output_ids" not in {o.name for o in config.output}


def test_core_refuses_undeclared_and_missing_inputs(hf_model_dir: Path) -> None:
    with (
        FakeLlmapiTriton(hf_model_dir, decoupled=False) as server,
        grpcclient.InferenceServerClient(server.address) as client,
    ):
        with pytest.raises(InferenceServerException) as info:
            client.infer("tensorrt_llm", [_input("input_ids", "INT32", [1, 2, 3])])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "unexpected inference input 'input_ids' for model 'tensorrt_llm'" in str(info.value)
        with pytest.raises(InferenceServerException) as info:
            client.infer("tensorrt_llm", [])
        assert (
            "[request id: <id_unknown>] expected number of inputs between 1 and 22 but got 0 "
            "inputs for model 'tensorrt_llm'. Got input(s) [], but missing required input(s) "
            "['text_input']. Please provide all required input(s)." in str(info.value)
        )
        with pytest.raises(InferenceServerException, match="data-type is 'INT32'"):
            client.infer("tensorrt_llm", [_text(), _input("streaming", "INT32", [1])])
        # Only the count is checked by the core: a request without text_input reaches the model.
        with pytest.raises(InferenceServerException, match="text_input is missing"):
            client.infer("tensorrt_llm", [_input("sampling_param_max_tokens", "INT32", [4])])


def test_non_decoupled_answers_once_and_refuses_streaming(hf_model_dir: Path) -> None:
    with (
        FakeLlmapiTriton(hf_model_dir, decoupled=False) as server,
        grpcclient.InferenceServerClient(server.address) as client,
    ):
        plain = client.infer("tensorrt_llm", [_text(), _input("sampling_param_max_tokens",
                                                               "INT32", [6])])  # fmt: skip
        assert plain.as_numpy("finish_reason") is None  # not asked for: not sent
        text = plain.as_numpy("text_output")[0].decode()
        assert text == server.llm.reference(PROMPT, 6).text
        streamed = _stream(server, [_text(), _input("streaming", "BOOL", [True])])
    ((result, error),) = streamed
    assert result is None and "Streaming is only supported in decoupled mode." in str(error)


def test_decoupled_streams_cumulative_text_and_refuses_unary(hf_model_dir: Path) -> None:
    with FakeLlmapiTriton(hf_model_dir, decoupled=True) as server:
        with grpcclient.InferenceServerClient(server.address) as client:
            with pytest.raises(InferenceServerException) as info:
                client.infer("tensorrt_llm", [_text()])
            assert info.value.status() == "StatusCode.UNIMPLEMENTED"
            assert "doesn't support models with decoupled transaction policy" in str(info.value)
        inputs = [_text(), _input("streaming", "BOOL", [True]),
                  _input("sampling_param_max_tokens", "INT32", [12]),
                  _input("return_finish_reason", "BOOL", [True])]  # fmt: skip
        items = _stream(server, inputs)
    assert all(error is None for _, error in items) and len(items) == 12
    texts = [r.as_numpy("text_output")[0].decode() for r, _ in items]
    reasons = [r.as_numpy("finish_reason")[0].decode() for r, _ in items]
    finals = [r.get_response().parameters["triton_final_response"].bool_param for r, _ in items]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # cumulative
    assert texts[-1] == server.llm.reference(PROMPT, 12).text
    assert reasons == ["None"] * 11 + ["length"]  # str(None) until the end, as upstream
    assert finals == [False] * 11 + [True]
    assert all(r.get_response().id == "42" for r, _ in items)


def test_products_contract_table_is_the_upstream_transcription() -> None:
    """``deploy/contract.py`` (what the front door serves and ``prfaas triton-repo`` renders) says
    exactly what upstream's ``llmapi/tensorrt_llm/config.pbtxt`` (0a71057), transcribed in the fake,
    declares: names, types, dims, optionality, order."""
    from trtllm_prfaas.deploy.contract import LLMAPI_INPUTS, LLMAPI_OUTPUTS

    def row(d: Any) -> tuple[str, str, tuple[int, ...]]:
        return d.name, d.data_type.removeprefix("TYPE_"), d.dims

    product_in = [(*row(d), d.optional) for d in LLMAPI_INPUTS]
    product_out = [row(d) for d in LLMAPI_OUTPUTS]
    assert product_in == list(INPUTS)
    assert product_out == list(OUTPUTS)
