"""Builders for KServe v2 requests the way a Triton + TensorRT-LLM client writes them, a helper
that runs one request over a stock tritonclient stream, and the request the process tests (the
``prfaas router`` command, the netns and compose testbeds) serve and check against one engine."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from trtllm_prfaas.config import model_preset
from trtllm_prfaas.engines.engine import EngineConfig, ReferenceEngine
from trtllm_prfaas.engines.request import SamplingParams

MODEL = "tensorrt_llm"
SEED, TEMPERATURE = 9, 0.7  # sampled, so a token relayed or computed differently shows
_DTYPES = {"BYTES": object, "INT32": np.int32, "INT64": np.int64, "UINT64": np.uint64,
           "FP32": np.float32, "BOOL": bool}  # fmt: skip


def tensor(name: str, datatype: str, values: list[Any]) -> grpcclient.InferInput:
    array = np.array(values, dtype=_DTYPES[datatype])
    infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
    infer_input.set_data_from_numpy(array)
    return infer_input


def llm_inputs(
    text: str | None = "Prefill-as-a-Service",
    max_tokens: int | None = 12,
    temperature: float | None = None,
    seed: int | None = None,
    streaming: bool | None = None,
    input_ids: list[int] | None = None,
) -> list[grpcclient.InferInput]:
    """The llmapi model's inputs; ``None`` leaves one out."""
    inputs = []
    if text is not None:
        inputs.append(tensor("text_input", "BYTES", [text.encode()]))
    if input_ids is not None:
        inputs.append(tensor("input_ids", "INT32", input_ids))
    if max_tokens is not None:
        inputs.append(tensor("sampling_param_max_tokens", "INT32", [max_tokens]))
    if temperature is not None:
        inputs.append(tensor("sampling_param_temperature", "FP32", [temperature]))
    if seed is not None:
        inputs.append(tensor("sampling_param_seed", "UINT64", [seed]))
    if streaming is not None:
        inputs.append(tensor("streaming", "BOOL", [streaming]))
    return inputs


def text_of(result: Any) -> str:
    return bytes(result.as_numpy("text_output")[0]).decode()


def ids_of(result: Any) -> list[int]:
    return [int(t) for t in result.as_numpy("output_ids")]


def is_final(result: Any) -> bool:
    params = result.get_response().parameters
    return bool(params["triton_final_response"].bool_param)


def stream(
    client: Any, inputs: list[grpcclient.InferInput], timeout_s: float = 20.0, request_id: str = ""
) -> list[Any]:
    """Send one request on a fresh stream; every response (or error) until the final one."""
    received: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put(error or result))
    try:
        client.async_stream_infer(MODEL, inputs, request_id=request_id)
        items = []
        while True:
            item = received.get(timeout=timeout_s)
            items.append(item)
            if not hasattr(item, "get_response") or is_final(item):
                return items
    finally:
        client.stop_stream()


# ---------------------------------------------------------------------------- served and checked
def prompt(n: int) -> list[int]:
    """An ``n``-token prompt for the byte tokenizer's vocabulary (BOS first)."""
    return [256] + [(i * 131 + n) % 256 for i in range(n - 1)]


def reference(tokens: list[int], max_tokens: int, preset: str = "tiny") -> list[int]:
    """The same request on one engine (the workers' model: ``preset``, tiny by default; seed 0)."""
    engine = ReferenceEngine(EngineConfig(model=model_preset(preset), num_blocks=512))
    sampling = SamplingParams(max_tokens, TEMPERATURE, SEED, ignore_eos=False)
    return engine.generate([tokens], sampling)[0]


def ask(address: str, tokens: list[int], max_tokens: int = 8, timeout_s: float = 60.0) -> list[int]:
    """One streaming request through stock tritonclient; the tokens it returned."""
    client = grpcclient.InferenceServerClient(address)
    try:
        inputs = llm_inputs(None, max_tokens, TEMPERATURE, SEED, True, tokens)
        responses = stream(client, inputs, timeout_s=timeout_s)
    finally:
        client.close()
    assert all(hasattr(r, "get_response") for r in responses), responses
    return [t for r in responses for t in ids_of(r)]
