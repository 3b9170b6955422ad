"""KServe v2 codec for the served model: tensors in, ``GenerateRequest`` out, responses back.

The model looks like Triton's TensorRT-LLM ``llmapi`` model (``tensorrtllm_backend``
``all_models/llmapi/tensorrt_llm/config.pbtxt``): ``text_input`` (BYTES, the prompt),
``streaming`` (BOOL), ``sampling_param_max_tokens`` (INT32), ``sampling_param_temperature``
(FP32), ``sampling_param_seed`` (UINT64; INT64 accepted too); plus ``input_ids`` (INT32 token
ids), the alternative to ``text_input``. Outputs: ``text_output`` (BYTES), ``output_ids``
(INT32) and ``finish_reason`` (BYTES, empty until the final response).

Tensors may arrive in ``raw_input_contents`` (what tritonclient sends: little-endian values,
BYTES elements prefixed by a 4-byte little-endian length) or in typed ``contents``. Responses use
``raw_output_contents`` only (tritonclient pairs outputs with raw contents by index). Every bad
input raises ``InvalidRequestError`` naming the input; nothing here touches gRPC status codes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2

from trtllm_prfaas.errors import InvalidRequestError
from trtllm_prfaas.router.api import GenerateRequest, Orchestrator

__all__ = [
    "FINAL_RESPONSE_PARAM",
    "INPUTS",
    "OUTPUTS",
    "RequestDefaults",
    "build_generate_request",
    "infer_response",
    "model_config",
    "model_metadata",
    "requested_outputs",
]

FINAL_RESPONSE_PARAM = "triton_final_response"  # decoupled streams flag their last response
MODEL_VERSION = "1"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatypes: tuple[str, ...]  # accepted KServe datatypes; the first is the declared one
    config_type: int  # model_config_pb2 DataType
    is_scalar: bool  # exactly one element
    dims: tuple[int, ...] = (-1,)  # as declared in the model config (-1: any length)


_STRING, _BOOL = model_config_pb2.TYPE_STRING, model_config_pb2.TYPE_BOOL
_INT32, _UINT64, _FP32 = (
    model_config_pb2.TYPE_INT32,
    model_config_pb2.TYPE_UINT64,
    model_config_pb2.TYPE_FP32,
)
INPUTS: dict[str, TensorSpec] = {
    spec.name: spec
    for spec in (
        TensorSpec("text_input", ("BYTES",), _STRING, True),
        TensorSpec("input_ids", ("INT32",), _INT32, False),
        TensorSpec("streaming", ("BOOL",), _BOOL, True, (1,)),
        TensorSpec("sampling_param_max_tokens", ("INT32",), _INT32, True, (1,)),
        TensorSpec("sampling_param_temperature", ("FP32",), _FP32, True, (1,)),
        TensorSpec("sampling_param_seed", ("UINT64", "INT64"), _UINT64, True, (1,)),
    )
}
OUTPUTS: dict[str, TensorSpec] = {
    spec.name: spec
    for spec in (
        TensorSpec("text_output", ("BYTES",), _STRING, False),
        TensorSpec("output_ids", ("INT32",), _INT32, False),
        TensorSpec("finish_reason", ("BYTES",), _STRING, False),
    )
}

_NUMPY_DTYPES = {"BOOL": "?", "INT32": "<i4", "INT64": "<i8", "UINT64": "<u8", "FP32": "<f4"}
_CONTENT_FIELDS = {
    "BOOL": "bool_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "BYTES": "bytes_contents",
}


@dataclass(frozen=True)
class RequestDefaults:
    """Values used when a request leaves an optional input out."""

    max_tokens: int = 16
    temperature: float = 0.0  # greedy: the reference engine's deterministic default
    seed: int = 0


# ------------------------------------------------------------------------------ tensor decoding
def decode_inputs(request: Any) -> dict[str, list[Any]]:
    """Every input of ``request`` as a flat list of Python values, checked against ``INPUTS``."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequestError(
            f"request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents"
        )
    tensors: dict[str, list[Any]] = {}
    for index, tensor in enumerate(request.inputs):
        spec = _check_input(tensor, tensors)
        values = _decode_raw(tensor, raw[index]) if raw else _decode_typed(tensor)
        expected = math.prod(tensor.shape)
        if len(values) != expected:
            raise InvalidRequestError(
                f"input '{tensor.name}' has shape {list(tensor.shape)} ({expected} elements) "
                f"but carries {len(values)}"
            )
        if spec.is_scalar and len(values) != 1:
            raise InvalidRequestError(
                f"input '{tensor.name}' must have exactly one element, got shape "
                f"{list(tensor.shape)}"
            )
        tensors[tensor.name] = values
    return tensors


def _check_input(tensor: Any, seen: dict[str, list[Any]]) -> TensorSpec:
    spec = INPUTS.get(tensor.name)
    if spec is None:
        raise InvalidRequestError(
            f"unexpected input '{tensor.name}'; this model accepts {', '.join(INPUTS)}"
        )
    if tensor.name in seen:
        raise InvalidRequestError(f"input '{tensor.name}' is given twice")
    if tensor.datatype not in spec.datatypes:
        raise InvalidRequestError(
            f"input '{tensor.name}' has datatype {tensor.datatype or '(none)'}; expected "
            f"{' or '.join(spec.datatypes)}"
        )
    if any(dim < 0 for dim in tensor.shape):
        raise InvalidRequestError(f"input '{tensor.name}' has a negative dimension")
    return spec


def _decode_raw(tensor: Any, content: bytes) -> list[Any]:
    if tensor.datatype == "BYTES":
        return _split_bytes(tensor.name, content)
    dtype = np.dtype(_NUMPY_DTYPES[tensor.datatype])
    if len(content) % dtype.itemsize:
        raise InvalidRequestError(
            f"input '{tensor.name}': {len(content)} raw bytes is not a whole number of "
            f"{tensor.datatype} values"
        )
    values: list[Any] = np.frombuffer(content, dtype=dtype).tolist()
    return values


def _split_bytes(name: str, content: bytes) -> list[Any]:
    """BYTES elements: each a 4-byte little-endian length, then that many bytes."""
    elements: list[Any] = []
    offset = 0
    while offset < len(content):
        if offset + 4 > len(content):
            raise InvalidRequestError(f"input '{name}': truncated BYTES length prefix")
        (length,) = struct.unpack_from("<I", content, offset)
        offset += 4
        if offset + length > len(content):
            raise InvalidRequestError(f"input '{name}': BYTES element overruns the tensor")
        elements.append(content[offset : offset + length])
        offset += length
    return elements


def _decode_typed(tensor: Any) -> list[Any]:
    return list(getattr(tensor.contents, _CONTENT_FIELDS[tensor.datatype]))


# ------------------------------------------------------------------------- request building
def build_generate_request(
    request: Any,
    orchestrator: Orchestrator,
    defaults: RequestDefaults,
    request_id: str,
    deadline_s: float,
) -> GenerateRequest:
    """Validate a ``ModelInferRequest`` for the served model and turn it into a GenerateRequest."""
    tensors = decode_inputs(request)
    prompt, source = _prompt_ids(tensors, orchestrator)
    max_tokens = int(tensors.get("sampling_param_max_tokens", [defaults.max_tokens])[0])
    if max_tokens <= 0:
        raise InvalidRequestError(
            f"input 'sampling_param_max_tokens' must be > 0, got {max_tokens}"
        )
    temperature = float(tensors.get("sampling_param_temperature", [defaults.temperature])[0])
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise InvalidRequestError(
            f"input 'sampling_param_temperature' must be finite and >= 0, got {temperature}"
        )
    seed = int(tensors.get("sampling_param_seed", [defaults.seed])[0])
    if seed < 0:
        raise InvalidRequestError(f"input 'sampling_param_seed' must be >= 0, got {seed}")
    if len(prompt) + max_tokens > orchestrator.max_seq_len:
        raise InvalidRequestError(
            f"input '{source}' of {len(prompt)} tokens + sampling_param_max_tokens {max_tokens} "
            f"exceeds the max length {orchestrator.max_seq_len}"
        )
    streaming = bool(tensors.get("streaming", [False])[0])
    return GenerateRequest(request_id, prompt, max_tokens, temperature, seed, streaming, deadline_s)


def _prompt_ids(tensors: dict[str, list[Any]], orchestrator: Orchestrator) -> tuple[list[int], str]:
    """The prompt's token ids and the name of the input they came from."""
    has_text, has_ids = "text_input" in tensors, "input_ids" in tensors
    if has_text == has_ids:
        which = "both" if has_text else "neither"
        raise InvalidRequestError(
            f"exactly one of inputs 'text_input' and 'input_ids' is required; got {which}"
        )
    if has_ids:
        ids = [int(t) for t in tensors["input_ids"]]
        if not ids:
            raise InvalidRequestError("input 'input_ids' is empty")
        for position, token in enumerate(ids):
            if not 0 <= token < orchestrator.vocab_size:
                raise InvalidRequestError(
                    f"input 'input_ids': token {token} at position {position} is outside the "
                    f"vocabulary [0, {orchestrator.vocab_size})"
                )
        return ids, "input_ids"
    try:
        text = bytes(tensors["text_input"][0]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"input 'text_input' is not valid UTF-8: {exc}") from exc
    if not text:
        raise InvalidRequestError("input 'text_input' is empty")
    return orchestrator.encode(text), "text_input"


def requested_outputs(request: Any) -> tuple[str, ...]:
    """The outputs a response carries: those the request names, or all of them."""
    names = tuple(output.name for output in request.outputs)
    for name in names:
        if name not in OUTPUTS:
            raise InvalidRequestError(
                f"unknown requested output '{name}'; this model produces {', '.join(OUTPUTS)}"
            )
    return names or tuple(OUTPUTS)


# --------------------------------------------------------------------------------- responses
def infer_response(
    model_name: str,
    response_id: str,
    token_ids: list[int],
    text: str,
    finish_reason: str | None,
    outputs: tuple[str, ...],
    is_final: bool | None = None,
) -> Any:
    """A ``ModelInferResponse``; ``is_final`` (streams only) sets ``triton_final_response``."""
    response = service_pb2.ModelInferResponse(
        model_name=model_name, model_version=MODEL_VERSION, id=response_id
    )
    values: dict[str, tuple[list[int], bytes]] = {
        "text_output": ([1], _join_bytes([text.encode("utf-8")])),
        "output_ids": ([len(token_ids)], np.asarray(token_ids, dtype="<i4").tobytes()),
        "finish_reason": ([1], _join_bytes([(finish_reason or "").encode("utf-8")])),
    }
    for name in outputs:
        shape, content = values[name]
        response.outputs.add(name=name, datatype=OUTPUTS[name].datatypes[0], shape=shape)
        response.raw_output_contents.append(content)
    if is_final is not None:
        response.parameters[FINAL_RESPONSE_PARAM].bool_param = is_final
    return response


def _join_bytes(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def model_metadata(model_name: str) -> Any:
    def meta(spec: TensorSpec) -> Any:
        return service_pb2.ModelMetadataResponse.TensorMetadata(
            name=spec.name, datatype=spec.datatypes[0], shape=list(spec.dims)
        )

    return service_pb2.ModelMetadataResponse(
        name=model_name,
        versions=[MODEL_VERSION],
        platform="python",
        inputs=[meta(spec) for spec in INPUTS.values()],
        outputs=[meta(spec) for spec in OUTPUTS.values()],
    )


def model_config(model_name: str) -> Any:
    """The model's config, shaped like the llmapi model's config.pbtxt (decoupled, python)."""
    config = model_config_pb2.ModelConfig(
        name=model_name,
        backend="python",
        max_batch_size=0,
        model_transaction_policy=model_config_pb2.ModelTransactionPolicy(decoupled=True),
    )
    for spec in INPUTS.values():
        config.input.add(
            name=spec.name,
            data_type=spec.config_type,
            dims=list(spec.dims),
            optional=True,  # text_input or input_ids: exactly one, checked per request
        )
    for spec in OUTPUTS.values():
        config.output.add(name=spec.name, data_type=spec.config_type, dims=list(spec.dims))
    return config
