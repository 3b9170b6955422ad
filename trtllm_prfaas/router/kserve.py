"""KServe v2 codec for the served models: tensors in, checked against a model's declared inputs;
response tensors out. What each model means by its tensors lives in ``served_models.py``.

Tensors may arrive in ``raw_input_contents`` (what tritonclient sends: little-endian values,
BYTES elements prefixed by a 4-byte little-endian length) or in typed ``contents``. Responses use
``raw_output_contents`` only (tritonclient pairs outputs with raw contents by index). Every bad
input raises ``InvalidRequestError`` naming the input, worded as Triton's core words it
(triton-inference-server/core ``Model::GetInput`` / ``InferenceRequest::Normalize``, as the
llmapi fake's docstring cites: "unexpected inference input 'X' for model 'M'", "inference input
'X' data-type is 'T', but model 'M' expects 'U'"); nothing here touches gRPC status codes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2, service_pb2

from trtllm_prfaas.deploy.contract import TensorDecl, add_tensors
from trtllm_prfaas.errors import InvalidRequestError

__all__ = [
    "FINAL_RESPONSE_PARAM",
    "MODEL_VERSION",
    "decode_inputs",
    "infer_response",
    "kserve_datatype",
    "model_config",
    "model_metadata",
    "requested_outputs",
]

FINAL_RESPONSE_PARAM = "triton_final_response"  # decoupled streams flag their last response
MODEL_VERSION = "1"

_NUMPY_DTYPES = {"BOOL": "?", "INT32": "<i4", "INT64": "<i8", "UINT64": "<u8", "FP32": "<f4",
                 "FP16": "<f2"}  # fmt: skip
_CONTENT_FIELDS = {
    "BOOL": "bool_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "BYTES": "bytes_contents",
}
_ALIASES = {"UINT64": ("INT64",)}  # a UINT64 input also takes INT64 (numpy's default int)


def kserve_datatype(decl: TensorDecl) -> str:
    """The KServe v2 datatype of a declared tensor (TYPE_STRING is BYTES on the wire)."""
    name = decl.data_type.removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


# ------------------------------------------------------------------------------ tensor decoding
def decode_inputs(request: Any, declared: Mapping[str, TensorDecl]) -> dict[str, list[Any]]:
    """Every input of ``request`` as a flat list of Python values, checked against ``declared``
    (the model's inputs): name, datatype, shape against its element count; a ``[1]`` input
    carries exactly one element (with or without a batch dimension)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequestError(
            f"request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents"
        )
    tensors: dict[str, list[Any]] = {}
    for index, tensor in enumerate(request.inputs):
        decl = _check_input(tensor, tensors, declared, request.model_name)
        values = _decode_raw(tensor, raw[index]) if raw else _decode_typed(tensor)
        expected = math.prod(tensor.shape)
        if len(values) != expected:
            raise InvalidRequestError(
                f"input '{tensor.name}' has shape {list(tensor.shape)} ({expected} elements) "
                f"but carries {len(values)}"
            )
        if decl.dims == (1,) and len(values) != 1:
            raise InvalidRequestError(
                f"input '{tensor.name}' must have exactly one element, got shape "
                f"{list(tensor.shape)}"
            )
        tensors[tensor.name] = values
    return tensors


def _check_input(
    tensor: Any, seen: dict[str, list[Any]], declared: Mapping[str, TensorDecl], model: str
) -> TensorDecl:
    decl = declared.get(tensor.name)
    if decl is None:
        raise InvalidRequestError(f"unexpected inference input '{tensor.name}' for model '{model}'")
    if tensor.name in seen:
        raise InvalidRequestError(f"input '{tensor.name}' is given twice")
    expected = kserve_datatype(decl)
    if tensor.datatype not in (expected, *_ALIASES.get(expected, ())):
        raise InvalidRequestError(
            f"inference input '{tensor.name}' data-type is '{tensor.datatype or '(none)'}', but "
            f"model '{model}' expects '{expected}'"
        )
    if any(dim < 0 for dim in tensor.shape):
        raise InvalidRequestError(f"input '{tensor.name}' has a negative dimension")
    return decl


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
    field = _CONTENT_FIELDS.get(tensor.datatype)
    if field is None:  # KServe's InferTensorContents has no field for it (FP16)
        raise InvalidRequestError(
            f"input '{tensor.name}': {tensor.datatype} must come in raw_input_contents"
        )
    return list(getattr(tensor.contents, field))


def requested_outputs(request: Any, declared: Mapping[str, TensorDecl]) -> tuple[str, ...]:
    """The outputs a response may carry: those the request names, or () for all it produces."""
    names = tuple(output.name for output in request.outputs)
    for name in names:
        if name not in declared:
            raise InvalidRequestError(
                f"unexpected inference output '{name}' for model '{request.model_name}'"
            )
    return names


# --------------------------------------------------------------------------------- responses
def infer_response(
    model_name: str,
    response_id: str,
    values: Mapping[str, tuple[list[int], list[Any]]],
    declared: Mapping[str, TensorDecl],
    wanted: tuple[str, ...] = (),
    is_final: bool | None = None,
) -> Any:
    """A ``ModelInferResponse`` with ``values`` (name -> shape, flat values) that ``wanted``
    names (all when empty); ``is_final`` (streams only) sets ``triton_final_response``."""
    response = service_pb2.ModelInferResponse(
        model_name=model_name, model_version=MODEL_VERSION, id=response_id
    )
    for name, (shape, flat) in values.items():
        if wanted and name not in wanted:
            continue
        datatype = kserve_datatype(declared[name])
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(_encode(datatype, flat))
    if is_final is not None:
        response.parameters[FINAL_RESPONSE_PARAM].bool_param = is_final
    return response


def _encode(datatype: str, flat: list[Any]) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(e)) + e for e in flat)
    return np.asarray(flat, dtype=_NUMPY_DTYPES[datatype]).tobytes()


def model_metadata(
    model_name: str,
    inputs: tuple[TensorDecl, ...],
    outputs: tuple[TensorDecl, ...],
    platform: str,
    max_batch_size: int,
) -> Any:
    """ModelMetadata as Triton reports it: a batching model's shapes start with -1."""
    batch = [-1] if max_batch_size > 0 else []

    def meta(decl: TensorDecl) -> Any:
        return service_pb2.ModelMetadataResponse.TensorMetadata(
            name=decl.name, datatype=kserve_datatype(decl), shape=batch + list(decl.dims)
        )

    return service_pb2.ModelMetadataResponse(
        name=model_name,
        versions=[MODEL_VERSION],
        platform=platform,
        inputs=[meta(decl) for decl in inputs],
        outputs=[meta(decl) for decl in outputs],
    )


def model_config(
    model_name: str,
    inputs: tuple[TensorDecl, ...],
    outputs: tuple[TensorDecl, ...],
    *,
    backend: str = "",
    platform: str = "",
    max_batch_size: int = 0,
) -> Any:
    """The model's config as the ModelConfig RPC returns it (decoupled: the front door streams)."""
    config = model_config_pb2.ModelConfig(
        name=model_name,
        backend=backend,
        platform=platform,
        max_batch_size=max_batch_size,
        model_transaction_policy=model_config_pb2.ModelTransactionPolicy(decoupled=True),
    )
    add_tensors(config, inputs, outputs)
    return config
