"""Builders for KServe v2 requests the way a Triton + TensorRT-LLM client writes them, and a
helper that runs one request over a stock tritonclient stream."""

from __future__ import annotations

import queue
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

MODEL = "tensorrt_llm"
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
